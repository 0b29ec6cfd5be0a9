// Meta Networks kernels (docs/kernel-math.md section 3; math in fastmeta/ops/
// gradient_mlp.py and fastmeta/ops/attention_read.py).
//
// The Python ops check arguments and give users the error messages; these kernels
// repeat cheap checks with TORCH_CHECK only so that they never index out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace fastmeta {

// y = w2 . relu(w1 u(g) + b1) + b2 for every element g of grads (any shape), with
// u(g) the (log|g|/p, sign g) / (-1, e^p g) preprocessing. w1 [H, 2], b1 [H],
// w2 [H], b2 [].
at::Tensor gradient_mlp_forward_cpu(const at::Tensor& grads, const at::Tensor& w1,
                                    const at::Tensor& b1, const at::Tensor& w2,
                                    const at::Tensor& b2, double p);
// (d_grads (empty unless need_grads), d_w1, d_b1, d_w2, d_b2); the parameter
// gradients are summed per fixed chunk of coordinates in double, then the chunks in
// order, so results do not depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_mlp_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grads, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, double p, bool need_grads);

// out[b, j, l, o] = sum_i attention[b, j, i] sum_k w[b, i, o, k] x[b, j, l, k];
// attention [B, M, N], w [B, N, O, K], x [B, M, L, K] -> [B, M, L, O]. CPU and CUDA.
at::Tensor attention_read_forward(const at::Tensor& attention, const at::Tensor& w,
                                  const at::Tensor& x);
// (d_attention, d_w, d_x); each is empty unless asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_read_backward(
    const at::Tensor& grad_out, const at::Tensor& attention, const at::Tensor& w,
    const at::Tensor& x, bool need_attention, bool need_w, bool need_x);

}  // namespace fastmeta
