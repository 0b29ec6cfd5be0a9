"""BatchNorm2d (batch statistics) -> ReLU -> MaxPool2d(2) on an activation, as one op.

The rest of a conv4 block after a convolution ATen computes (layers 2-4 of conv4): the
three ops read and write the full-resolution activation five times and keep relu(y)
and int64 pool indices for the backward; the fused op reads c twice and keeps a uint8
record of each window's maximum. Math and gradients: csrc/cpu/bn_relu_pool_cpu.cpp.

    c [N, C, H, W], gamma, beta [C]
      -> (out [N, C, H // 2, W // 2], mean [C], rstd [C], window [N, C, H // 2, W // 2]
          uint8: where in each 2x2 window the maximum is, row * 2 + column)

Differentiable once (w.r.t. c, gamma, beta): fastmeta uses it only where no second
derivative is taken (MAML's query pass, first-order inner steps).

Ops: torch.ops.fastmeta.bn_relu_pool, torch.ops.fastmeta.bn_relu_pool_backward.
Backends: reference (here), cpu (csrc/cpu/bn_relu_pool_cpu.cpp).
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
from fastmeta.ops.declaration import FLOAT32_64, ONCE, Kernels, OpDeclaration, compiled

NAME = "fastmeta.bn_relu_pool"


def check_bn_relu_pool_args(c: Tensor, gamma: Tensor, beta: Tensor) -> None:
    """Raises a clear error unless c is [N, C, H, W] (H, W >= 2) and gamma, beta [C]."""
    for name, t in (("c", c), ("gamma", gamma), ("beta", beta)):
        check_tensor(NAME, name, t)
        check_floating(NAME, name, t)
    check_same_dtype_device(NAME, "c", c, gamma=gamma, beta=beta)
    if c.dim() != 4 or c.shape[2] < 2 or c.shape[3] < 2:
        raise ValueError(
            f"{NAME}: c must be [N, C, H, W] with H, W >= 2 for the 2x2 pool, got {shape_str(c)}"
        )
    for name, t in (("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) != (c.shape[1],):
            raise ValueError(
                f"{NAME}: {name} must be [C] = [{c.shape[1]}] for c "
                f"{shape_str(c)}, got {shape_str(t)}"
            )


# ---------------------------------------------------------------- reference


def _normalized(c, gamma, beta, mean, rstd):
    """(xhat, y) for given statistics."""
    xhat = (c - mean[:, None, None]) * rstd[:, None, None]
    return xhat, xhat * gamma[:, None, None] + beta[:, None, None]


def bn_relu_pool_forward_reference(c, gamma, beta, eps):
    var, mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
    rstd = torch.rsqrt(var + eps)
    _, y = _normalized(c, gamma, beta, mean, rstd)
    out, where = F.max_pool2d(torch.relu(y), 2, return_indices=True)
    width = c.shape[3]
    window = ((where // width) % 2 * 2 + where % width % 2).to(torch.uint8)
    return out.contiguous(), mean, rstd, window.contiguous()


def bn_relu_pool_backward_reference(grad_out, c, gamma, beta, mean, rstd, window):
    # csrc/cpu/bn_relu_pool_cpu.cpp written with ATen ops (an op's body runs below autograd).
    xhat, y = _normalized(c, gamma, beta, mean, rstd)
    Ho, Wo = grad_out.shape[2:]
    rows = 2 * torch.arange(Ho, device=c.device)[:, None] + window.long() // 2
    cols = 2 * torch.arange(Wo, device=c.device) + window.long() % 2
    where = (rows * c.shape[3] + cols).flatten(2)
    dy = torch.zeros_like(c).flatten(2).scatter_(2, where, grad_out.flatten(2)).view_as(c)
    dy = dy * (y > 0)
    d_beta, d_gamma = dy.sum((0, 2, 3)), (dy * xhat).sum((0, 2, 3))
    count = c.numel() // c.shape[1]
    d_c = (gamma * rstd)[:, None, None] * (
        dy - (d_beta / count)[:, None, None] - xhat * (d_gamma / count)[:, None, None]
    )
    return d_c, d_gamma, d_beta


# ---------------------------------------------------------------- declaration

BN_RELU_POOL = OpDeclaration(
    name="bn_relu_pool",
    forward=Kernels(
        {"reference": bn_relu_pool_forward_reference, "cpu": compiled("bn_relu_pool_forward")}
    ),
    backward=Kernels(
        {"reference": bn_relu_pool_backward_reference, "cpu": compiled("bn_relu_pool_backward")},
        device_from=1,
    ),
    dtypes={"cpu": FLOAT32_64},
    differentiable=ONCE,
)


# ---------------------------------------------------------------- ops


@torch.library.custom_op("fastmeta::bn_relu_pool", mutates_args=())
def bn_relu_pool_op(
    c: Tensor, gamma: Tensor, beta: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_bn_relu_pool_args(c, gamma, beta)
    check_eps(NAME, eps)
    return BN_RELU_POOL.run_forward(c.contiguous(), gamma.contiguous(), beta.contiguous(), eps)


@bn_relu_pool_op.register_fake
@on_one_device(bn_relu_pool_op)
def _(c, gamma, beta, eps):
    check_bn_relu_pool_args(c, gamma, beta)
    N, C, H, W = c.shape
    pooled = (N, C, H // 2, W // 2)
    return (
        c.new_empty(pooled),
        c.new_empty(C),
        c.new_empty(C),
        c.new_empty(pooled, dtype=torch.uint8),
    )


@torch.library.custom_op("fastmeta::bn_relu_pool_backward", mutates_args=())
def bn_relu_pool_backward_op(
    grad_out: Tensor,
    c: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    rstd: Tensor,
    window: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (d_c, d_gamma, d_beta)."""
    return BN_RELU_POOL.run_backward(
        grad_out.contiguous(),
        c.contiguous(),
        gamma.contiguous(),
        beta.contiguous(),
        mean,
        rstd,
        window,
    )


@bn_relu_pool_backward_op.register_fake
@on_one_device(bn_relu_pool_backward_op)
def _(grad_out, c, gamma, beta, mean, rstd, window):
    return torch.empty_like(c), torch.empty_like(gamma), torch.empty_like(beta)


def _setup_forward(ctx, inputs, output):
    c, gamma, beta, _eps = inputs
    ctx.save_for_backward(c, gamma, beta, output[1], output[2], output[3])


def _backward_forward(ctx, grad_out, *_grad_statistics):
    return (*bn_relu_pool_backward_op(grad_out, *ctx.saved_tensors), None)


bn_relu_pool_op.register_autograd(_backward_forward, setup_context=_setup_forward)
BN_RELU_POOL.apply_second_derivative_policy(bn_relu_pool_backward_op)


def bn_relu_pool_with_statistics(
    c: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """bn_relu_pool's output and the batch statistics of c: (out, mean [C],
    rstd [C] = 1 / sqrt(biased variance + eps))."""
    return bn_relu_pool_op(c, gamma, beta, float(eps))[:3]


def bn_relu_pool(c: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """maxpool2(relu(batch_norm(c))) with batch statistics: c [N, C, H, W] ->
    [N, C, H // 2, W // 2]; gamma, beta [C]."""
    return bn_relu_pool_with_statistics(c, gamma, beta, eps)[0]
