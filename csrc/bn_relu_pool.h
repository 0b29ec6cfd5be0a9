// The rest of a conv4 block after a convolution ATen computes, as one op:
// BatchNorm2d with batch statistics -> ReLU -> MaxPool2d(2) on c [N, C, H, W].
//   mean_c, rstd_c over (N, H, W) (biased variance);  k = gamma rstd
//   y = (c - mean) k + beta,  out = maxpool2(relu(y)) [N, C, H/2, W/2]
// The forward records where each 2x2 window's first maximum is (window, uint8
// row * 2 + column) instead of writing y and relu(y). Backward (M = N H W; dy = the
// pooled gradient at each window's maximum where y > 0, zero elsewhere):
//   d_beta = sum dy,  d_gamma = sum dy xhat        (over the pooled positions only)
//   d_c = k (dy - d_beta / M - xhat d_gamma / M)
//       = a + b c everywhere, plus k dy at the window maxima,
//   with b = -k rstd d_gamma / M and a = -k d_beta / M - b mean: one dense pass
// reading c and writing d_c. Parallel over channels (deterministic).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastmeta {

// (out [N, C, H/2, W/2], mean [C], rstd [C], window [N, C, H/2, W/2] uint8).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_forward_cpu(
    const at::Tensor& c, const at::Tensor& gamma, const at::Tensor& beta, double eps);

// (d_c [N, C, H, W], d_gamma [C], d_beta [C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& c, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& window);

}  // namespace fastmeta
