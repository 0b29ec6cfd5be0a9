"""Batched inner-loop update (MAML / Meta-SGD), docs/kernel-math.md section 2.

T tasks share initial parameters theta [P] (every parameter tensor flattened into
one buffer). One inner step for all tasks at once:

    out[t, p] = theta[p] - alpha * g[t, p]          alpha: [] (one learning rate),
                                                           [P] (Meta-SGD), or [T, P]
Backward, given go = dL/d out [T, P]:
    d_theta[p] = sum_t go[t, p]                      (reduced over T in the kernel)
    d_g[t, p]  = -alpha * go[t, p]
    d_alpha    = -sum of g * go over alpha's broadcast dimensions

The backward is itself an op with an autograd formula, so the update stays
differentiable to any order (second-order MAML builds g with create_graph=True and
differentiates through this backward).

Ops: torch.ops.fastmeta.inner_update, torch.ops.fastmeta.inner_update_backward.
Backends: reference (here), cpu and cuda (csrc/), triton (fastmeta/kernels/).
"""

import torch
from torch import Tensor

from fastmeta.ops._checks import (
    check_floating,
    check_same_dtype_device,
    check_tensor,
    on_one_device,
    shape_str,
)
from fastmeta.ops._scalars import scalar_tensor
from fastmeta.ops.declaration import ANY_ORDER, Kernels, OpDeclaration, every_backend


def _check_alpha_and_g(name: str, alpha: Tensor, g: Tensor, **others: Tensor) -> None:
    for arg, value in (*others.items(), ("alpha", alpha), ("g", g)):
        check_tensor(name, arg, value)
        check_floating(name, arg, value)
    if g.dim() != 2:
        raise ValueError(
            f"{name}: g must be [T, P] (one gradient row per task), got shape {shape_str(g)}"
        )
    T, P = g.shape
    if alpha.shape not in ((), (P,), (T, P)):
        raise ValueError(
            f"{name}: alpha must be a scalar [], [P] = [{P}] or [T, P] = "
            f"[{T}, {P}] for g {shape_str(g)}, got shape {shape_str(alpha)}"
        )
    check_same_dtype_device(name, "g", g, **others, alpha=alpha)


def check_inner_update_args(theta: Tensor, alpha: Tensor, g: Tensor) -> None:
    """Raises a clear error unless theta [P], alpha ([], [P] or [T, P]) and g [T, P] fit."""
    name = "fastmeta.inner_update"
    _check_alpha_and_g(name, alpha, g, theta=theta)
    if theta.shape != g.shape[1:]:
        raise ValueError(
            f"{name}: theta must be [P] = [{g.shape[1]}] to match g "
            f"{shape_str(g)}, got shape {shape_str(theta)}"
        )


def check_inner_update_backward_args(grad_out: Tensor, alpha: Tensor, g: Tensor) -> None:
    """Raises a clear error unless grad_out [T, P], alpha and g [T, P] fit."""
    name = "fastmeta.inner_update_backward"
    _check_alpha_and_g(name, alpha, g, grad_out=grad_out)
    if grad_out.shape != g.shape:
        raise ValueError(
            f"{name}: grad_out must be {shape_str(g)} like g, got shape {shape_str(grad_out)}"
        )


def reduce_to_alpha(alpha: Tensor, per_element: Tensor) -> Tensor:
    """Sums a [T, P] tensor over the dimensions alpha was broadcast along."""
    if alpha.dim() == 0:
        return per_element.sum()
    if alpha.dim() == 1:
        return per_element.sum(0)
    return per_element


# ---------------------------------------------------------------- reference


def inner_update_forward_reference(theta: Tensor, alpha: Tensor, g: Tensor) -> Tensor:
    return (theta - alpha * g).contiguous()  # like the kernels (and the fake), whatever g's strides


def inner_update_backward_reference(
    grad_out: Tensor, alpha: Tensor, g: Tensor, need_g: bool, need_alpha: bool
):
    d_theta = grad_out.sum(0)
    d_g = (-alpha * grad_out).contiguous() if need_g else g.new_empty(0)
    d_alpha = -reduce_to_alpha(alpha, g * grad_out) if need_alpha else g.new_empty(0)
    return d_theta, d_g, d_alpha


# ---------------------------------------------------------------- declaration

INNER_UPDATE = OpDeclaration(
    name="inner_update",
    forward=Kernels(
        every_backend(
            inner_update_forward_reference, "inner_update_forward", "inner_update_triton"
        ),
        device_from=2,
    ),
    backward=Kernels(
        every_backend(
            inner_update_backward_reference, "inner_update_backward", "inner_update_triton"
        ),
        device_from=2,
    ),
    differentiable=ANY_ORDER,  # the backward op has its own autograd formula
)


# ---------------------------------------------------------------- ops


@torch.library.custom_op("fastmeta::inner_update", mutates_args=())
def inner_update_op(theta: Tensor, alpha: Tensor, g: Tensor) -> Tensor:
    check_inner_update_args(theta, alpha, g)
    return INNER_UPDATE.run_forward(theta.contiguous(), alpha.contiguous(), g.contiguous())


@inner_update_op.register_fake
@on_one_device(inner_update_op)
def _(theta, alpha, g):
    check_inner_update_args(theta, alpha, g)
    return g.new_empty(g.shape)


@torch.library.custom_op("fastmeta::inner_update_backward", mutates_args=())
def inner_update_backward_op(
    grad_out: Tensor, alpha: Tensor, g: Tensor, need_g: bool, need_alpha: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (d_theta [P], d_g [T, P] or empty, d_alpha like alpha or empty)."""
    check_inner_update_backward_args(grad_out, alpha, g)
    return INNER_UPDATE.run_backward(
        grad_out.contiguous(), alpha.contiguous(), g.contiguous(), need_g, need_alpha
    )


@inner_update_backward_op.register_fake
@on_one_device(inner_update_backward_op)
def _(grad_out, alpha, g, need_g, need_alpha):
    check_inner_update_backward_args(grad_out, alpha, g)
    return (
        g.new_empty(g.shape[1:]),
        g.new_empty(g.shape if need_g else (0,)),
        alpha.new_empty(alpha.shape if need_alpha else (0,)),
    )


def _setup_forward(ctx, inputs, output):
    _, alpha, g = inputs
    ctx.save_for_backward(alpha, g)


def _backward_forward(ctx, grad_out):
    alpha, g = ctx.saved_tensors
    need_theta, need_alpha, need_g = ctx.needs_input_grad
    d_theta, d_g, d_alpha = inner_update_backward_op(grad_out, alpha, g, need_g, need_alpha)
    return (
        d_theta if need_theta else None,
        d_alpha if need_alpha else None,
        d_g if need_g else None,
    )


inner_update_op.register_autograd(_backward_forward, setup_context=_setup_forward)


def _setup_backward(ctx, inputs, output):
    grad_out, alpha, g, need_g, need_alpha = inputs
    ctx.need_g, ctx.need_alpha = need_g, need_alpha
    ctx.save_for_backward(grad_out, alpha, g)


def _backward_backward(ctx, gd_theta, gd_g, gd_alpha):
    # Outputs: d_theta = sum_t go, d_g = -alpha * go, d_alpha = -reduce(g * go).
    # Their cotangents (gd_*) flow back to go, alpha and g:
    #   go    <- gd_theta - alpha * gd_g - gd_alpha * g    (first two terms: inner_update)
    #   alpha <- -reduce(go * gd_g)
    #   g     <- -gd_alpha * go
    grad_out, alpha, g = ctx.saved_tensors
    need_go, need_alpha, need_g = ctx.needs_input_grad[:3]
    gg_out = gg_alpha = gg_g = None
    if need_go:
        gg_out = (
            inner_update_op(gd_theta, alpha, gd_g)
            if ctx.need_g
            else gd_theta.expand(grad_out.shape).contiguous()
        )
        if ctx.need_alpha:
            gg_out = gg_out - gd_alpha * g
    if need_alpha and ctx.need_g:
        gg_alpha = -reduce_to_alpha(alpha, grad_out * gd_g)
    if need_g and ctx.need_alpha:
        gg_g = -gd_alpha * grad_out
    return gg_out, gg_alpha, gg_g, None, None


inner_update_backward_op.register_autograd(_backward_backward, setup_context=_setup_backward)


def inner_update(theta: Tensor, alpha, g: Tensor) -> Tensor:
    """One inner-loop step for T tasks at once: theta [P] - alpha * g [T, P] -> [T, P].

    alpha is a float, a 0-d tensor, a [P] tensor (Meta-SGD) or a [T, P] tensor, in
    theta's dtype. Differentiable in theta, alpha and g, to any order.
    """
    check_tensor("fastmeta.inner_update", "theta", theta)
    check_tensor("fastmeta.inner_update", "g", g)
    if not isinstance(alpha, torch.Tensor):
        dtype = theta.dtype if theta.is_floating_point() else torch.get_default_dtype()
        alpha = scalar_tensor(alpha, dtype, theta.device)
    return inner_update_op(theta, alpha, g)
