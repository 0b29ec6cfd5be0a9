// Batched inner-loop update, CUDA kernels.
//
// forward : out[t, p] = theta[p] - alpha * g[t, p]; a 2-D grid (columns x tasks),
//           each thread handling kUnroll coalesced elements of one row.
// backward: one thread per column p loops over the T tasks, so d_theta[p] and a
//           [P] d_alpha are reduced in registers, in order. A scalar d_alpha is
//           reduced (in double) per block into partials[blocks], then by a single
//           block in a fixed order: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../inner_update.h"
#include "sum_to_scalar.cuh"

namespace fastmeta {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t, AlphaKind kKind>
__global__ void forward_kernel(const scalar_t* __restrict__ theta,
                               const scalar_t* __restrict__ alpha, const scalar_t* __restrict__ g,
                               scalar_t* __restrict__ out, int64_t T, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t a0 = kKind == AlphaKind::kScalar ? acc_t(alpha[0]) : acc_t(0);
  const int64_t tile = int64_t(blockDim.x) * kUnroll;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    for (int64_t base = blockIdx.x * tile + threadIdx.x; base < P; base += gridDim.x * tile) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t p = base + int64_t(u) * blockDim.x;
        if (p < P) {
          const int64_t i = t * P + p;
          acc_t a = a0;
          if constexpr (kKind == AlphaKind::kPerElement) a = acc_t(alpha[p]);
          if constexpr (kKind == AlphaKind::kPerTaskElement) a = acc_t(alpha[i]);
          out[i] = acc_t(theta[p]) - a * acc_t(g[i]);
        }
      }
    }
  }
}

// d_g and d_alpha may be null (not needed). partials[gridDim.x] receives each
// block's sum of g * go when alpha is a scalar.
template <typename scalar_t, AlphaKind kKind>
__global__ void backward_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ alpha,
                                const scalar_t* __restrict__ g, scalar_t* __restrict__ d_theta,
                                scalar_t* __restrict__ d_g, scalar_t* __restrict__ d_alpha,
                                double* __restrict__ partials, int64_t T, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double block_sum[kThreads];
  const acc_t a0 = kKind == AlphaKind::kScalar ? acc_t(alpha[0]) : acc_t(0);
  double thread_g_go = 0;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P;
       p += int64_t(gridDim.x) * blockDim.x) {
    acc_t a = kKind == AlphaKind::kPerElement ? acc_t(alpha[p]) : a0;
    acc_t sum_go = 0, sum_g_go = 0;
#pragma unroll 4
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = t * P + p;
      const acc_t go_i = acc_t(go[i]);
      sum_go += go_i;
      if constexpr (kKind == AlphaKind::kPerTaskElement) a = acc_t(alpha[i]);
      if (d_g != nullptr) d_g[i] = -a * go_i;
      if (d_alpha != nullptr) {
        const acc_t prod = acc_t(g[i]) * go_i;
        if constexpr (kKind == AlphaKind::kPerTaskElement) d_alpha[i] = -prod;
        else sum_g_go += prod;
      }
    }
    d_theta[p] = sum_go;
    if constexpr (kKind == AlphaKind::kPerElement) {
      if (d_alpha != nullptr) d_alpha[p] = -sum_g_go;
    }
    thread_g_go += sum_g_go;
  }
  if constexpr (kKind == AlphaKind::kScalar) {
    block_sum[threadIdx.x] = thread_g_go;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) block_sum[threadIdx.x] += block_sum[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = block_sum[0];
  }
}

// Calls fn with the AlphaKind as a compile-time constant.
template <typename Fn>
void with_alpha_kind(AlphaKind kind, Fn&& fn) {
  switch (kind) {
    case AlphaKind::kScalar:
      return fn(std::integral_constant<AlphaKind, AlphaKind::kScalar>{});
    case AlphaKind::kPerElement:
      return fn(std::integral_constant<AlphaKind, AlphaKind::kPerElement>{});
    case AlphaKind::kPerTaskElement:
      return fn(std::integral_constant<AlphaKind, AlphaKind::kPerTaskElement>{});
  }
}

}  // namespace

at::Tensor inner_update_forward_cuda(const at::Tensor& theta, const at::Tensor& alpha,
                                     const at::Tensor& g) {
  const AlphaKind kind = check_inner_update_forward(c10::kCUDA, theta, alpha, g);
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor out = at::empty_like(g);
  const int64_t T = g.size(0), P = g.size(1);
  if (T == 0 || P == 0) return out;
  const int64_t tile = int64_t(kThreads) * kUnroll;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((P + tile - 1) / tile, INT32_MAX)),
                  static_cast<unsigned>(std::min(T, kMaxGridY)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "inner_update_forward_cuda", [&] {
    with_alpha_kind(kind, [&](auto k) {
      forward_kernel<scalar_t, decltype(k)::value><<<grid, kThreads, 0, stream>>>(
          theta.const_data_ptr<scalar_t>(), alpha.const_data_ptr<scalar_t>(),
          g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), T, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inner_update_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& alpha, const at::Tensor& g, bool need_g,
    bool need_alpha) {
  const AlphaKind kind = check_inner_update_backward(c10::kCUDA, grad_out, alpha, g);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t T = g.size(0), P = g.size(1);
  at::Tensor d_theta = at::empty({P}, g.options());
  at::Tensor d_g = need_g ? at::empty_like(g) : at::empty({0}, g.options());
  at::Tensor d_alpha = need_alpha ? at::empty_like(alpha) : at::empty({0}, g.options());
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((P + kThreads - 1) / kThreads, INT32_MAX));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "inner_update_backward_cuda", [&] {
    const bool reduce_scalar = need_alpha && kind == AlphaKind::kScalar;
    at::Tensor partials = at::empty({reduce_scalar ? blocks : 0}, g.options().dtype(at::kDouble));
    with_alpha_kind(kind, [&](auto k) {
      backward_kernel<scalar_t, decltype(k)::value><<<blocks, kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), alpha.const_data_ptr<scalar_t>(),
          g.const_data_ptr<scalar_t>(), d_theta.mutable_data_ptr<scalar_t>(),
          need_g ? d_g.mutable_data_ptr<scalar_t>() : nullptr,
          need_alpha ? d_alpha.mutable_data_ptr<scalar_t>() : nullptr,
          reduce_scalar ? partials.mutable_data_ptr<double>() : nullptr, T, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (reduce_scalar) {
      sum_to_scalar_kernel<scalar_t><<<1, kSumThreads, 0, stream>>>(
          partials.const_data_ptr<double>(), blocks, -1.0, d_alpha.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {d_theta, d_g, d_alpha};
}

TORCH_LIBRARY_IMPL(fastmeta_C, CUDA, m) {
  m.impl("inner_update_forward", &inner_update_forward_cuda);
  m.impl("inner_update_backward", &inner_update_backward_cuda);
}

}  // namespace fastmeta
