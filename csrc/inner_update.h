// Batched inner-loop update: what the CPU and CUDA kernels share (the math, the
// entry guards).
//
//   forward : out[t, p] = theta[p] - alpha * g[t, p]
//   backward: d_theta[p] = sum_t go[t, p]
//             d_g[t, p]  = -alpha * go[t, p]
//             d_alpha    = -sum over alpha's broadcast dims of g * go
//
// alpha is a 0-d tensor (one learning rate), [P] (Meta-SGD) or [T, P].
// All tensors are contiguous and share dtype (float, double, half or bfloat16) and
// device; the Python op checks them and gives users the error messages, the kernels
// check them again (checks.h) so that a direct call never indexes out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

namespace fastmeta {

// How alpha broadcasts against g [T, P].
enum class AlphaKind : int { kScalar = 0, kPerElement = 1, kPerTaskElement = 2 };

// theta [P], alpha, g [T, P] on one device of the kernel's `type`; returns how alpha
// broadcasts.
AlphaKind check_inner_update_forward(c10::DeviceType type, const at::Tensor& theta,
                                     const at::Tensor& alpha, const at::Tensor& g);

// grad_out [T, P], alpha, g [T, P], likewise.
AlphaKind check_inner_update_backward(c10::DeviceType type, const at::Tensor& grad_out,
                                      const at::Tensor& alpha, const at::Tensor& g);

}  // namespace fastmeta
