// Cosine similarities between queries and prototypes, CUDA kernels.
//
//   s[b, m, k] = (q_bm . c_bk) / (max(||q_bm||, eps) max(||c_bk||, eps))
//                                     queries [B, M, D], prototypes [B, C, D] -> [B, M, C]
// The products come from one batched GEMM (at::bmm, cuBLAS), the squared row norms
// from the warp-per-row kernel of protonet_cuda.cuh (B M + B C of them), and one
// epilogue kernel scales every entry in the op-math type. Each norm is clamped, not
// its square, so a row of norm below eps is divided by eps and a zero row gives
// exactly 0, never NaN. (The backward is plain differentiable torch ops, in Python.)
//
// epilogue: a flat grid-stride loop over the B*M*C entries, one entry per thread,
//           int64 indices; every entry has one writer and no reduction: deterministic.
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

// max(sqrt(squared), eps); a NaN norm stays NaN (fmax would drop it), as in torch's
// clamp_min.
template <typename acc_t>
__device__ __forceinline__ acc_t clamped_norm(acc_t squared, acc_t eps) {
  const acc_t norm = sqrt(squared);
  return norm < eps ? eps : norm;
}

// sim [B, M, C] holds q . c on entry and the cosine similarities on exit.
// qn [B * M], cn [B * C]: squared row norms of q [B * M, D] and c [B * C, D].
template <typename scalar_t>
__global__ void cosine_epilogue_kernel(scalar_t* __restrict__ sim,
                                       const at::opmath_type<scalar_t>* __restrict__ qn,
                                       const at::opmath_type<scalar_t>* __restrict__ cn,
                                       at::opmath_type<scalar_t> eps, int64_t M, int64_t C,
                                       int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q_row = e / C;                    // b * M + m
    const int64_t c_row = (q_row / M) * C + e % C;  // b * C + k
    // two divisions, not one by the product: eps^2 may underflow for a small eps
    sim[e] = static_cast<scalar_t>(acc_t(sim[e]) / clamped_norm(qn[q_row], eps) /
                                   clamped_norm(cn[c_row], eps));
  }
}

}  // namespace

at::Tensor cosine_similarities_forward_cuda(const at::Tensor& queries, const at::Tensor& prototypes,
                                            double eps) {
  const EpisodeShape shape =
      check_queries_prototypes("cosine_similarities_forward", c10::kCUDA, queries, prototypes);
  const int64_t B = shape.B, M = shape.M, C = shape.C;
  const c10::cuda::CUDAGuard guard(queries.device());
  at::Tensor sim = at::bmm(queries, prototypes.transpose(1, 2));  // q . c, [B, M, C]
  const int64_t total = B * M * C;
  if (total == 0) return sim;
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "cosine_similarities_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor qn = row_squared_norms<scalar_t>(queries);     // [B, M]
    const at::Tensor cn = row_squared_norms<scalar_t>(prototypes);  // [B, C]
    cosine_epilogue_kernel<scalar_t>
        <<<grid_blocks(total, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            sim.mutable_data_ptr<scalar_t>(), qn.const_data_ptr<acc_t>(),
            cn.const_data_ptr<acc_t>(), static_cast<acc_t>(eps), M, C, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return sim;
}

TORCH_LIBRARY_IMPL(fastmeta_C, CUDA, m) {
  m.impl("cosine_similarities_forward", &cosine_similarities_forward_cuda);
}

}  // namespace fastmeta
