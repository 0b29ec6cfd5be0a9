// Squared Euclidean distances between queries and prototypes, CUDA kernels.
//
//   d[b, m, k] = ||q_bm||^2 + ||c_bk||^2 - 2 q_bm . c_bk        queries [B, M, D],
//                                                            prototypes [B, C, D] -> [B, M, C]
// The products come from one batched GEMM (at::bmm, cuBLAS), the norms from the
// warp-per-row kernel of protonet_cuda.cuh, and one epilogue kernel adds them up.
// Where the three terms cancel (d <= ratio (||q||^2 + ||c||^2), ratio 1e-2 in float
// and 1e-6 in double: nearly identical points) the epilogue recomputes the entry
// directly as sum_j (q_j - c_j)^2 in the op-math type, so identical points give
// exactly 0 and no entry is negative. (The backward is plain torch GEMMs, in Python.)
//
// epilogue: a flat grid-stride loop over the B*M*C entries, one entry per thread;
//           the loop is block-uniform, so each warp ballots its entries that need
//           the direct form and computes them one after another cooperatively
//           (lanes strided over D, coalesced, then a fixed-order warp_sum).
//           Every entry has one writer and a fixed summation order: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../protonet.h"
#include "protonet_cuda.cuh"

namespace fastmeta {
at::Tensor squared_distances_forward_cuda(const at::Tensor& queries, const at::Tensor& prototypes) {
  check_queries_prototypes("squared_distances_forward", c10::kCUDA, queries, prototypes);
  const c10::cuda::CUDAGuard guard(queries.device());
  at::Tensor dist = at::bmm(queries, prototypes.transpose(1, 2));  // q . c, [B, M, C]
  if (dist.numel() == 0) return dist;
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "squared_distances_forward_cuda", [&] {
    refine_squared_distances<scalar_t>(dist, queries, prototypes,
                                       row_squared_norms<scalar_t>(queries),
                                       row_squared_norms<scalar_t>(prototypes));
  });
  return dist;
}

TORCH_LIBRARY_IMPL(fastmeta_C, CUDA, m) {
  m.impl("squared_distances_forward", &squared_distances_forward_cuda);
}

}  // namespace fastmeta
