// Batched inner-loop update: what the CPU and CUDA kernels share (the math, the
// argument check).
//
//   forward : out[t, p] = theta[p] - alpha * g[t, p]
//   backward: d_theta[p] = sum_t go[t, p]
//             d_g[t, p]  = -alpha * go[t, p]
//             d_alpha    = -sum over alpha's broadcast dims of g * go
//
// alpha is a 0-d tensor (one learning rate), [P] (Meta-SGD) or [T, P].
// All tensors are contiguous and share dtype and device; the Python op checks
// shapes and dtypes and gives users the error messages, these kernels repeat the
// checks with TORCH_CHECK only so that they never index out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastmeta {

// How alpha broadcasts against g [T, P].
enum class AlphaKind : int { kScalar = 0, kPerElement = 1, kPerTaskElement = 2 };

// Validates g [T, P] and a tensor `other` that must be [P] (theta) or [T, P]
// (grad_out), all on one device with one dtype; returns how alpha broadcasts.
AlphaKind check_inner_update(const at::Tensor& other, const at::Tensor& alpha, const at::Tensor& g);

}  // namespace fastmeta
