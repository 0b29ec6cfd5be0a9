// Helpers shared by the Prototypical-Networks CUDA kernels (class_prototypes_cuda.cu,
// squared_distances_cuda.cu, prototypical_cross_entropy_cuda.cu): launch sizes, warp sums,
// squared row norms and the refined squared distances (squared_distances_cuda.cu's
// epilogue, which the euclidean cross-entropy reuses).
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

#include "../protonet.h"

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

// dist [B, M, C] (contiguous, on the current device) holds Q C^T on entry and ||q - c||^2
// on exit, with the entries that cancel (protonet.h's kRefine) recomputed directly; qn
// [B, M] and cn [B, C] are the squared row norms (row_squared_norms).
template <typename scalar_t>
void refine_squared_distances(at::Tensor& dist, const at::Tensor& queries,
                              const at::Tensor& prototypes, const at::Tensor& qn,
                              const at::Tensor& cn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = dist.numel();
  if (total == 0) return;
  distances_epilogue_kernel<scalar_t>
      <<<grid_blocks(total, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          dist.mutable_data_ptr<scalar_t>(), qn.const_data_ptr<acc_t>(), cn.const_data_ptr<acc_t>(),
          queries.const_data_ptr<scalar_t>(), prototypes.const_data_ptr<scalar_t>(),
          queries.size(1), prototypes.size(1), queries.size(2), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastmeta
