"""Conv2d -> BatchNorm2d (batch statistics) -> ReLU -> MaxPool2d(2) as one op.

For convolutions with few input taps (a network's first layer on 1- or 3-channel
images) ATen's convolution and the three memory-bound passes over the
full-resolution activation [N, C, Hc, Wc] dominate a conv4 step on CPU; the fused
kernel recomputes the cheap convolution instead of storing it. Math and gradients:
csrc/cpu/conv_block_cpu.cpp.

    x [N, Cin, H, W], weight [C, Cin, KH, KW], bias, gamma, beta [C]
      -> (out [N, C, Hc // 2, Wc // 2], mean [C], rstd [C], window, c_max),
    Hc = H + 2 pad_h - KH + 1; window [N, C, Hc // 2, Wc // 2] uint8 is where in each
    2x2 window the maximum is (row * 2 + column), c_max the convolution there: the
    backward without d_x needs only those (no recomputation).

Differentiable once (w.r.t. x, weight, bias, gamma, beta): fastmeta uses it only
where no second derivative is taken (MAML's query pass, first-order inner steps).

Ops: torch.ops.fastmeta.conv_block, torch.ops.fastmeta.conv_block_backward.
Backends: reference (here), cpu (csrc/cpu/conv_block_cpu.cpp).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmeta.ops._checks import (
    check_eps,
    check_floating,
    check_same_dtype_device,
    check_tensor,
    on_one_device,
    shape_str,
)
from fastmeta.ops.declaration import FLOAT32_64, ONCE, Kernels, OpDeclaration, compiled, contiguous

NAME = "fastmeta.conv_block"


def conv_size(x_shape, weight_shape, padding) -> tuple[int, int]:
    """(Hc, Wc): the stride-1 convolution's output size."""
    return tuple(x_shape[2 + d] + 2 * padding[d] - weight_shape[2 + d] + 1 for d in (0, 1))


def check_conv_block_args(
    x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor, padding: list[int]
) -> None:
    """Raises a clear error unless the shapes fit a stride-1 conv and a 2x2 pool."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("gamma", gamma), ("beta", beta)):
        check_tensor(NAME, name, t)
        check_floating(NAME, name, t)
    check_same_dtype_device(NAME, "x", x, weight=weight, bias=bias, gamma=gamma, beta=beta)
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{NAME}: x must be [N, Cin, H, W] and weight [C, Cin, KH, KW] with "
            f"the same Cin, got x {shape_str(x)} and weight {shape_str(weight)}"
        )
    if min(x.shape[1:]) < 1 or min(weight.shape[2:]) < 1:
        raise ValueError(
            f"{NAME}: x [N, Cin, H, W] and weight [C, Cin, KH, KW] need Cin, H, W, KH, KW "
            f">= 1, got x {shape_str(x)} and weight {shape_str(weight)}"
        )
    C = weight.shape[0]
    for name, t in (("bias", bias), ("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) != (C,):
            raise ValueError(
                f"{NAME}: {name} must be [C] = [{C}] for weight "
                f"{shape_str(weight)}, got {shape_str(t)}"
            )
    hc, wc = conv_size(x.shape, weight.shape, padding)
    if len(padding) != 2 or min(padding) < 0 or hc < 2 or wc < 2:
        raise ValueError(
            f"{NAME}: padding {padding} with x {shape_str(x)} and weight "
            f"{shape_str(weight)} gives a {hc}x{wc} convolution; the 2x2 pool "
            f"needs at least 2x2"
        )


# ---------------------------------------------------------------- reference


def _conv_bn(x, weight, bias, padding, mean, rstd):
    """(c, xhat) for given statistics: c = conv2d(x), xhat = (c - mean) * rstd."""
    c = F.conv2d(x, weight, bias, padding=padding)
    return c, (c - mean[:, None, None]) * rstd[:, None, None]


def conv_block_forward_reference(x, weight, bias, gamma, beta, pad_h, pad_w, eps):
    c = F.conv2d(x, weight, bias, padding=(pad_h, pad_w))
    var, mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
    rstd = torch.rsqrt(var + eps)
    xhat = (c - mean[:, None, None]) * rstd[:, None, None]
    y = xhat * gamma[:, None, None] + beta[:, None, None]
    out, where = F.max_pool2d(torch.relu(y), 2, return_indices=True)
    wc = c.shape[3]
    window = ((where // wc) % 2 * 2 + where % wc % 2).to(torch.uint8)
    c_max = c.flatten(2).gather(2, where.flatten(2)).view_as(out)
    return out.contiguous(), mean, rstd, window.contiguous(), c_max.contiguous()


def conv_block_backward_reference(
    grad_out, x, weight, bias, gamma, beta, mean, rstd, window, c_max, pad_h, pad_w, need_x
):
    # The formulas of csrc/cpu/conv_block_cpu.cpp written with ATen ops (an op's body runs
    # below autograd, so it cannot differentiate its forward).
    padding = (pad_h, pad_w)
    c, xhat = _conv_bn(x, weight, bias, padding, mean, rstd)
    y = xhat * gamma[:, None, None] + beta[:, None, None]
    _, where = F.max_pool2d(torch.relu(y), 2, return_indices=True)
    dr = torch.zeros_like(c).flatten(2).scatter_(2, where.flatten(2), grad_out.flatten(2))
    dy = dr.view_as(c) * (y > 0)
    d_beta, d_gamma = dy.sum((0, 2, 3)), (dy * xhat).sum((0, 2, 3))
    count = c.numel() // c.shape[1]
    d_c = (gamma * rstd)[:, None, None] * (
        dy - (d_beta / count)[:, None, None] - xhat * (d_gamma / count)[:, None, None]
    )
    d_weight = torch.nn.grad.conv2d_weight(x, weight.shape, d_c, padding=padding)
    d_x = (
        torch.nn.grad.conv2d_input(x.shape, weight, d_c, padding=padding)
        if need_x
        else x.new_empty(0)
    )
    return d_x, d_weight, d_c.sum((0, 2, 3)), d_gamma, d_beta


# ---------------------------------------------------------------- declaration

CONV_BLOCK = OpDeclaration(
    name="conv_block",
    forward=Kernels(
        {"reference": conv_block_forward_reference, "cpu": compiled("conv_block_forward")}
    ),
    backward=Kernels(
        {"reference": conv_block_backward_reference, "cpu": compiled("conv_block_backward")},
        device_from=1,
    ),
    dtypes={"cpu": FLOAT32_64},
    differentiable=ONCE,
)


# ---------------------------------------------------------------- ops


@torch.library.custom_op("fastmeta::conv_block", mutates_args=())
def conv_block_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    gamma: Tensor,
    beta: Tensor,
    padding: list[int],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_conv_block_args(x, weight, bias, gamma, beta, padding)
    check_eps(NAME, eps)
    return CONV_BLOCK.run_forward(*contiguous(x, weight, bias, gamma, beta), *padding, eps)


@conv_block_op.register_fake
@on_one_device(conv_block_op)
def _(x, weight, bias, gamma, beta, padding, eps):
    check_conv_block_args(x, weight, bias, gamma, beta, padding)
    hc, wc = conv_size(x.shape, weight.shape, padding)
    C = weight.shape[0]
    pooled = (x.shape[0], C, hc // 2, wc // 2)
    return (
        x.new_empty(pooled),
        x.new_empty(C),
        x.new_empty(C),
        x.new_empty(pooled, dtype=torch.uint8),
        x.new_empty(pooled),
    )


@torch.library.custom_op("fastmeta::conv_block_backward", mutates_args=())
def conv_block_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    rstd: Tensor,
    window: Tensor,
    c_max: Tensor,
    padding: list[int],
    need_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (d_x or empty, d_weight, d_bias, d_gamma, d_beta)."""
    return CONV_BLOCK.run_backward(
        *contiguous(grad_out, x, weight, bias, gamma, beta),
        mean,
        rstd,
        window,
        c_max,
        *padding,
        need_x,
    )


@conv_block_backward_op.register_fake
@on_one_device(conv_block_backward_op)
def _(grad_out, x, weight, bias, gamma, beta, mean, rstd, window, c_max, padding, need_x):
    return (
        x.new_empty(x.shape if need_x else (0,)),
        torch.empty_like(weight),
        torch.empty_like(bias),
        torch.empty_like(gamma),
        torch.empty_like(beta),
    )


def _setup_forward(ctx, inputs, output):
    x, weight, bias, gamma, beta, padding, _eps = inputs
    ctx.padding = padding
    ctx.save_for_backward(x, weight, bias, gamma, beta, *output[1:])


def _backward_forward(ctx, grad_out, *_grad_statistics):
    need_x = ctx.needs_input_grad[0]
    grads = conv_block_backward_op(grad_out, *ctx.saved_tensors, ctx.padding, need_x)
    d_x = grads[0] if need_x else None
    return (d_x, *grads[1:], None, None)


conv_block_op.register_autograd(_backward_forward, setup_context=_setup_forward)
CONV_BLOCK.apply_second_derivative_policy(conv_block_backward_op)


def conv_block_with_statistics(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor | None,
    beta: Tensor | None,
    padding=(1, 1),
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """conv_block's output and the batch statistics of the convolution: (out, mean [C],
    rstd [C] = 1 / sqrt(biased variance + eps))."""
    check_tensor(NAME, "weight", weight)
    C = weight.shape[0]
    bias = weight.new_zeros(C) if bias is None else bias
    gamma = weight.new_ones(C) if gamma is None else gamma
    beta = weight.new_zeros(C) if beta is None else beta
    return conv_block_op(x, weight, bias, gamma, beta, [int(p) for p in padding], float(eps))[:3]


def conv_block(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor | None,
    beta: Tensor | None,
    padding=(1, 1),
    eps: float = 1e-5,
) -> Tensor:
    """maxpool2(relu(batch_norm(conv2d(x, weight, bias, padding)))) with batch
    statistics: x [N, Cin, H, W], weight [C, Cin, KH, KW] -> [N, C, Hc // 2, Wc // 2].
    bias, gamma, beta: [C] or None (zeros, ones, zeros)."""
    return conv_block_with_statistics(x, weight, bias, gamma, beta, padding, eps)[0]
