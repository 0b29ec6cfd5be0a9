// Class prototypes (per-class means of support embeddings), CUDA kernels.
//
//   forward : prototypes[b, k] = (1 / n_bk) sum_{i : y_bi = k} support[b, i]
//             support [B, S, D], labels [B, S] int64 in [0, C) -> [B, C, D]
//   backward: d_support[b, i] = grad[b, y_bi] / n_{b, y_bi}      grad [B, C, D] -> [B, S, D]
//
// Label values are checked by the Python op (fastmeta/validation.py) without a sync;
// these kernels never read a label as an index unless it lies in [0, C), so bad
// labels (validation off) give NaN or wrong numbers, never an out-of-bounds access.
// No host reads: nothing here synchronizes.
//
// segments: at::sort(labels, stable, dim 1) gives each episode's support indices
//           grouped by class, in support order; one thread per (episode, k in
//           [0, C]) binary-searches the sorted labels for offsets[b, k], the start
//           of class k's segment (so n_bk = offsets[b, k + 1] - offsets[b, k]).
//           Labels outside [0, C) fall outside every segment.
// forward : one block row per (episode, class), x over the B*C rows and y over
//           column tiles of D; each thread sums its column over the class's
//           segment in support order (no float atomics: deterministic, and the
//           same order as the CPU kernel), then scales by 1 / n (an empty class: NaN).
// backward: n_bk by integer atomics (order-independent, no sort); then one block row
//           per support row (b, i), same column tiling; reads grad[b, y_bi] and
//           scales by 1 / n (a label outside [0, C): NaN).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../protonet.h"
#include "protonet_cuda.cuh"

namespace fastmeta {
namespace {

// First index of the sorted y[0, n) with y[index] >= value.
__device__ int64_t lower_bound(const int64_t* y, int64_t n, int64_t value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (y[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// sorted [B, S] (each row ascending) -> offsets [B, C + 1]: offsets[b, j] is the first
// index of episode b's sorted labels with a label >= j.
__global__ void segments_kernel(const int64_t* __restrict__ sorted, int64_t* __restrict__ offsets,
                                int64_t B, int64_t S, int64_t C) {
  const int64_t slots = C + 1;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < B * slots;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / slots, j = t % slots;
    offsets[t] = lower_bound(sorted + b * S, S, j);
  }
}

// counts [B, C] (zeroed) += the number of labels[b, :] equal to k, for k in [0, C).
__global__ void counts_kernel(const int64_t* __restrict__ labels, int64_t* __restrict__ counts,
                              int64_t S, int64_t C, int64_t n) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = labels[t];
    if (k >= 0 && k < C) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + (t / S) * C + k), 1ull);
    }
  }
}

// Class k of episode b is support rows perm[b, offsets[b, k] : offsets[b, k + 1]].
struct Segments {
  at::Tensor perm;     // [B, S] int64
  at::Tensor offsets;  // [B, C + 1] int64
};

// The segments of the contiguous int64 CUDA labels [B, S] (no host read).
Segments class_segments(const at::Tensor& labels, int64_t C) {
  const int64_t B = labels.size(0), S = labels.size(1);
  const auto [sorted, perm] = at::sort(labels, /*stable=*/true, /*dim=*/1);
  at::Tensor offsets = at::empty({B, C + 1}, labels.options());
  if (B == 0) return {perm, offsets};
  segments_kernel<<<grid_blocks(B * (C + 1), kThreads), kThreads, 0,
                    c10::cuda::getCurrentCUDAStream()>>>(
      sorted.const_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>(), B, S, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {perm, offsets};
}

// n_bk [B, C] int64 of the contiguous int64 CUDA labels [B, S] (no sort, no host read).
at::Tensor class_counts(const at::Tensor& labels, int64_t C) {
  const int64_t B = labels.size(0), S = labels.size(1);
  at::Tensor counts = at::zeros({B, C}, labels.options());
  if (labels.numel() == 0 || C == 0) return counts;
  counts_kernel<<<grid_blocks(B * S, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      labels.const_data_ptr<int64_t>(), counts.mutable_data_ptr<int64_t>(), S, C, B * S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

// Launch shape of the column-tiled kernels: x over `rows`, y over tiles of D.
struct ColumnGrid {
  dim3 grid;
  unsigned threads;
};

ColumnGrid column_grid(int64_t rows, int64_t D) {
  const int64_t threads = std::min<int64_t>(kThreads, (D + kWarpSize - 1) / kWarpSize * kWarpSize);
  return {dim3(grid_blocks(rows, 1), grid_blocks(D, threads, kMaxGridY)),
          static_cast<unsigned>(threads)};
}

// support [B, S, D], (perm, offsets) from class_segments -> out [B, C, D].
template <typename scalar_t>
__global__ void prototypes_forward_kernel(const scalar_t* __restrict__ support,
                                          const int64_t* __restrict__ perm,
                                          const int64_t* __restrict__ offsets,
                                          scalar_t* __restrict__ out, int64_t S, int64_t C,
                                          int64_t D, int64_t rows) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // r = b * C + k
    const int64_t b = r / C;
    const int64_t* segment = offsets + r + b;                // offsets[b, k]
    const int64_t start = segment[0], end = segment[1];
    const acc_t count = acc_t(end - start);
    const int64_t* index = perm + b * S;
    const scalar_t* x = support + b * S * D;
    for (int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; j < D;
         j += int64_t(gridDim.y) * blockDim.x) {
      acc_t sum = 0;
      for (int64_t i = start; i < end; ++i) sum += acc_t(x[index[i] * D + j]);
      out[r * D + j] = static_cast<scalar_t>(sum / count);
    }
  }
}

// grad [B, C, D], labels [B, S], counts [B, C] -> d_support [B, S, D].
template <typename scalar_t>
__global__ void prototypes_backward_kernel(const scalar_t* __restrict__ grad,
                                           const int64_t* __restrict__ labels,
                                           const int64_t* __restrict__ counts,
                                           scalar_t* __restrict__ d_support, int64_t S, int64_t C,
                                           int64_t D, int64_t rows) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // r = b * S + i
    const int64_t b = r / S, k = labels[r];
    const bool valid = k >= 0 && k < C;
    const acc_t count = valid ? acc_t(counts[b * C + k]) : acc_t(1);
    const scalar_t* src = grad + (b * C + k) * D;  // read only when valid
    scalar_t* dst = d_support + r * D;
    for (int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; j < D;
         j += int64_t(gridDim.y) * blockDim.x) {
      dst[j] = valid ? static_cast<scalar_t>(acc_t(src[j]) / count)
                     : std::numeric_limits<scalar_t>::quiet_NaN();
    }
  }
}

}  // namespace

at::Tensor class_prototypes_forward_cuda(const at::Tensor& support, const at::Tensor& labels,
                                         int64_t num_classes) {
  check_class_prototypes_forward(c10::kCUDA, support, labels, num_classes);
  const int64_t B = support.size(0), S = support.size(1), D = support.size(2);
  const int64_t C = num_classes;
  const c10::cuda::CUDAGuard guard(support.device());
  const Segments segments = class_segments(labels, C);
  at::Tensor out = at::empty({B, C, D}, support.options());
  if (out.numel() == 0) return out;
  const ColumnGrid launch = column_grid(B * C, D);
  AT_DISPATCH_FLOATING_TYPES(support.scalar_type(), "class_prototypes_forward_cuda", [&] {
    prototypes_forward_kernel<scalar_t>
        <<<launch.grid, launch.threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            support.const_data_ptr<scalar_t>(), segments.perm.const_data_ptr<int64_t>(),
            segments.offsets.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), S, C, D,
            B * C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor class_prototypes_backward_cuda(const at::Tensor& grad, const at::Tensor& labels) {
  check_class_prototypes_backward(c10::kCUDA, grad, labels);
  const int64_t B = grad.size(0), C = grad.size(1), D = grad.size(2), S = labels.size(1);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor counts = class_counts(labels, C);
  at::Tensor d_support = at::empty({B, S, D}, grad.options());
  if (d_support.numel() == 0) return d_support;
  const ColumnGrid launch = column_grid(B * S, D);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "class_prototypes_backward_cuda", [&] {
    prototypes_backward_kernel<scalar_t>
        <<<launch.grid, launch.threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            grad.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
            counts.const_data_ptr<int64_t>(), d_support.mutable_data_ptr<scalar_t>(), S, C, D,
            B * S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d_support;
}

TORCH_LIBRARY_IMPL(fastmeta_C, CUDA, m) {
  m.impl("class_prototypes_forward", &class_prototypes_forward_cuda);
  m.impl("class_prototypes_backward", &class_prototypes_backward_cuda);
}

}  // namespace fastmeta
