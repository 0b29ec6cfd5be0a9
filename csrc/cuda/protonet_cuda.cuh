// Helpers shared by the Prototypical-Networks CUDA kernels (class_prototypes_cuda.cu,
// squared_distances_cuda.cu, prototypical_cross_entropy_cuda.cu).
//
// Everything here sits in an anonymous namespace: each .cu gets its own copy of the
// kernels (internal linkage), so no two translation units register one kernel stub.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace fastmeta {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;  // threads per block; a multiple of kWarpSize
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridX = INT32_MAX;
constexpr int64_t kMaxGridY = 65535;  // also the limit of gridDim.z

// ceil(work / per_block) blocks, at least 1 and at most max_blocks (kernels that
// take the result loop grid-stride, so the cap is only a launch limit).
inline unsigned grid_blocks(int64_t work, int64_t per_block, int64_t max_blocks = kMaxGridX) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((work + per_block - 1) / per_block, 1, max_blocks));
}

// Sum over the 32 lanes of a warp (all lanes active). The butterfly has a fixed
// order, and since IEEE addition is commutative every lane ends with the same bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

// norms[r] = sum_j x[r, j]^2 over the `rows` rows of a contiguous [rows, D] array:
// one warp per row, lanes strided over D, a warp_sum at the end.
template <typename scalar_t>
__global__ void row_squared_norms_kernel(const scalar_t* __restrict__ x,
                                         at::opmath_type<scalar_t>* __restrict__ norms,
                                         int64_t rows, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
       r < rows; r += warps) {
    const scalar_t* row = x + r * D;
    acc_t sum = 0;
    for (int64_t j = lane; j < D; j += kWarpSize) sum += acc_t(row[j]) * acc_t(row[j]);
    sum = warp_sum(sum);
    if (lane == 0) norms[r] = sum;
  }
}

// Squared row norms of a contiguous CUDA [B, N, D] tensor: [B, N] in the op-math
// dtype, on the current stream (the caller holds the device guard).
template <typename scalar_t>
at::Tensor row_squared_norms(const at::Tensor& x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0) * x.size(1);
  at::Tensor norms =
      at::empty({x.size(0), x.size(1)}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (rows == 0) return norms;
  row_squared_norms_kernel<scalar_t>
      <<<grid_blocks(rows, kWarpsPerBlock), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), norms.mutable_data_ptr<acc_t>(), rows, x.size(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norms;
}

}  // namespace
}  // namespace fastmeta
