// A deterministic final reduction: one block sums n doubles in a fixed order.
// In an anonymous namespace: each .cu that includes it gets its own kernel.
#pragma once

#include <cstdint>

namespace fastmeta {
namespace {

constexpr int kSumThreads = 1024;  // launch sum_to_scalar_kernel as <<<1, kSumThreads>>>

// out[0] = sign * sum(values[0:n]): each thread sums a strided slice, then a tree
// over the block; the order depends only on n, so the result is reproducible.
template <typename scalar_t>
__global__ void sum_to_scalar_kernel(const double* __restrict__ values, int64_t n, double sign,
                                     scalar_t* __restrict__ out) {
  __shared__ double buf[kSumThreads];
  double sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += values[i];
  buf[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<scalar_t>(sign * buf[0]);
}

}  // namespace
}  // namespace fastmeta
