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
namespace {

// dist [B, M, C] holds q . c on entry and the squared distances on exit.
// qn [B * M], cn [B * C]: squared row norms of q [B * M, D] and c [B * C, D].
template <typename scalar_t>
__global__ void distances_epilogue_kernel(scalar_t* __restrict__ dist,
                                          const at::opmath_type<scalar_t>* __restrict__ qn,
                                          const at::opmath_type<scalar_t>* __restrict__ cn,
                                          const scalar_t* __restrict__ q,
                                          const scalar_t* __restrict__ c, int64_t M, int64_t C,
                                          int64_t D, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t ratio = static_cast<acc_t>(kRefine<scalar_t>);
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < total;
       base += int64_t(gridDim.x) * blockDim.x) {  // block-uniform: full warps below
    const int64_t e = base + threadIdx.x;
    int64_t q_row = 0, c_row = 0;
    acc_t value = 0;
    bool refine = false;
    if (e < total) {
      q_row = e / C;                             // b * M + m
      c_row = (q_row / M) * C + e % C;           // b * C + k
      const acc_t scale = qn[q_row] + cn[c_row];
      value = scale - acc_t(2) * acc_t(dist[e]);
      refine = value <= ratio * scale;           // cancellation (NaN: no)
    }
    for (unsigned pending = __ballot_sync(kFullMask, refine); pending != 0;
         pending &= pending - 1) {
      const int src = __ffs(pending) - 1;
      const scalar_t* qr = q + __shfl_sync(kFullMask, q_row, src) * D;
      const scalar_t* cr = c + __shfl_sync(kFullMask, c_row, src) * D;
      acc_t sum = 0;
      for (int64_t j = lane; j < D; j += kWarpSize) {
        const acc_t diff = acc_t(qr[j]) - acc_t(cr[j]);
        sum += diff * diff;
      }
      sum = warp_sum(sum);
      if (lane == src) value = sum;
    }
    if (e < total) dist[e] = static_cast<scalar_t>(value);
  }
}

}  // namespace

at::Tensor squared_distances_forward_cuda(const at::Tensor& queries, const at::Tensor& prototypes) {
  const EpisodeShape shape =
      check_queries_prototypes("squared_distances_forward", c10::kCUDA, queries, prototypes);
  const int64_t B = shape.B, M = shape.M, C = shape.C, D = shape.D;
  const c10::cuda::CUDAGuard guard(queries.device());
  at::Tensor dist = at::bmm(queries, prototypes.transpose(1, 2));  // q . c, [B, M, C]
  const int64_t total = B * M * C;
  if (total == 0) return dist;
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "squared_distances_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor qn = row_squared_norms<scalar_t>(queries);
    const at::Tensor cn = row_squared_norms<scalar_t>(prototypes);
    distances_epilogue_kernel<scalar_t>
        <<<grid_blocks(total, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            dist.mutable_data_ptr<scalar_t>(), qn.const_data_ptr<acc_t>(),
            cn.const_data_ptr<acc_t>(), queries.const_data_ptr<scalar_t>(),
            prototypes.const_data_ptr<scalar_t>(), M, C, D, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dist;
}

TORCH_LIBRARY_IMPL(fastmeta_C, CUDA, m) {
  m.impl("squared_distances_forward", &squared_distances_forward_cuda);
}

}  // namespace fastmeta
