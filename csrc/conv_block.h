// A conv4 block in one op: Conv2d (stride 1) -> BatchNorm2d with batch statistics
// -> ReLU -> MaxPool2d(2), for convolutions with few input taps (Cin*KH*KW small,
// e.g. a network's first layer on 1- or 3-channel images), where ATen's convolution
// and the three memory-bound passes over the full-resolution activation dominate.
//
// Shapes: x [N, Cin, H, W], weight [C, Cin, KH, KW], bias/gamma/beta [C];
// conv output c [N, C, Hc, Wc] with Hc = H + 2 ph - KH + 1 (never stored: each
// kernel recomputes the part of c it needs), out [N, C, Hc/2, Wc/2].
//   mean_c, rstd_c = batch statistics of c over (N, Hc, Wc) (biased variance), from
//   the mean pbar [taps] and covariance Sigma [taps, taps] of the input patches:
//   mean_c = bias_c + w_c . pbar,  var_c = w_c^T Sigma w_c
//   y = (c - mean) * rstd * gamma + beta,   out = maxpool2(relu(y))
// Backward (M = N*Hc*Wc per channel; dy = the pooled gradient routed to each
// window's first maximum, times [y > 0]; xhat = (c - mean) * rstd):
//   d_beta = sum dy,  d_gamma = sum dy * xhat
//   d_c = gamma * rstd * (dy - d_beta / M - xhat * d_gamma / M)
//   d_weight[c, ci, i, j] = sum_n,h,w d_c[n, c, h, w] x[n, ci, h + i - ph, w + j - pw]
//   d_bias = sum d_c,  d_x = the transposed convolution of d_c with weight
// Without d_x, dy is nonzero only at each window's maximum, so the forward's record
// of where (window, uint8 offset 0..3 = row * 2 + column) and of c there (c_max)
// gives d_beta, d_gamma and the sparse part of d_weight in one pass over the pooled
// outputs; the dense terms of d_weight need only the same patch moments, shared by all
// channels (M' = N Hc Wc conv positions):
//   sum_hw x_tap = M' pbar[tap],  sum_hw xhat x_tap = M' rstd (Sigma w)[tap].
// The forward is parallel over images (statistics first, so nothing is reduced across
// threads), the parameter gradients over channels within chunks of images, d_x over
// images: all deterministic.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace fastmeta {

// (out [N, C, Hc/2, Wc/2], mean [C], rstd [C], window [N, C, Hc/2, Wc/2] uint8,
//  c_max [N, C, Hc/2, Wc/2]).
using ConvBlockForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
ConvBlockForward conv_block_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, const at::Tensor& gamma,
                                        const at::Tensor& beta, int64_t pad_h, int64_t pad_w,
                                        double eps);

// Returns (d_x [N, Cin, H, W] or empty, d_weight, d_bias, d_gamma, d_beta); window and
// c_max are the forward's (used when need_x is false).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& window,
    const at::Tensor& c_max, int64_t pad_h, int64_t pad_w, bool need_x);

}  // namespace fastmeta
