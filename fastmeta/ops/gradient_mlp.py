"""A small MLP applied to every coordinate of a loss gradient (Meta Networks' fast-weight
generators m and d; docs/kernel-math.md section 3).

Each gradient element g is preprocessed (Andrychowicz et al. 2016, with p):
    u(g) = (log|g| / p, sign g)   if |g| >= e^-p
           (-1, e^p g)            otherwise
and mapped by the same 2 -> H -> 1 MLP:
    s = W1 u + b1 [H],   h = relu(s),   y = w2 . h + b2.
Over N examples x P coordinates that is N*P independent tiny MLPs; the kernels keep
s and h in registers (the backward recomputes them) instead of storing [N, P, H].

Backward, with dy the incoming gradient and m = [not s <= 0] (relu's backward in
torch: a NaN s passes the gradient, a closed unit passes exactly 0, even of an inf):
    d_w2 = sum dy h,   d_b2 = sum dy,   dh = dy w2 * m,
    d_W1 = sum dh u^T, d_b1 = sum dh,   du = W1^T dh,
    d_g  = du_0 / (p g)  if |g| >= e^-p  else  du_1 e^p     (sign g has zero slope)
where the sums run over all coordinates. Differentiable once: a second derivative
raises (the backward op has no formula of its own).

Ops: torch.ops.fastmeta.gradient_mlp, torch.ops.fastmeta.gradient_mlp_backward.
Backends: reference (here), cpu (csrc/cpu/gradient_mlp_cpu.cpp),
triton (fastmeta/kernels/metanet_triton.py).
"""

import math

import torch
from torch import Tensor

from fastmeta.ops._checks import (
    check_floating,
    check_same_dtype_device,
    check_tensor,
    on_one_device,
    shape_str,
)
from fastmeta.ops.declaration import (
    FLOAT32,
    FLOAT32_64,
    ONCE,
    Kernels,
    OpDeclaration,
    compiled,
    contiguous,
    triton,
)


def check_gradient_mlp_args(
    grads: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: float
) -> None:
    """grads of any shape; w1 [H, 2], b1 [H], w2 [H], b2 [] of grads' dtype and device."""
    name = "fastmeta.gradient_mlp"
    for arg, value in (("grads", grads), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        check_tensor(name, arg, value)
    check_floating(name, "grads", grads)
    check_same_dtype_device(name, "grads", grads, w1=w1, b1=b1, w2=w2, b2=b2)
    hidden = w1.shape[0] if w1.dim() == 2 else -1
    if w1.dim() != 2 or w1.shape[1] != 2 or hidden < 1:
        raise ValueError(f"{name}: w1 must be [H, 2], got {shape_str(w1)}")
    for arg, value in (("b1", b1), ("w2", w2)):
        if tuple(value.shape) != (hidden,):
            raise ValueError(
                f"{name}: {arg} must be [H={hidden}] like w1 {shape_str(w1)}, got "
                f"{shape_str(value)}"
            )
    if b2.dim() != 0:
        raise ValueError(f"{name}: b2 must be a 0-d tensor, got {shape_str(b2)}")
    if not (isinstance(p, (int, float)) and p > 0 and math.isfinite(p)):
        raise ValueError(f"{name}: p must be a positive number, got {p!r}")


def preprocess(grads: Tensor, p: float) -> Tensor:
    """The two inputs of each coordinate, [..., 2] (reference math)."""
    small = grads.abs() < math.exp(-p)
    log_part = torch.where(small, -1.0, torch.log(grads.abs().clamp_min(math.exp(-p))) / p)
    sign_part = torch.where(small, math.exp(p) * grads, torch.sign(grads))
    return torch.stack((log_part, sign_part), -1)


def preprocess_backward(du: Tensor, grads: Tensor, p: float) -> Tensor:
    """d_grads [...] from the gradient du [..., 2] w.r.t. preprocess(grads, p)."""
    small = grads.abs() < math.exp(-p)
    return torch.where(small, du[..., 1] * math.exp(p), du[..., 0] / (p * grads))


def gradient_mlp_forward_reference(grads, w1, b1, w2, b2, p):
    """The plain PyTorch form: builds the [..., H] hidden layer (differentiable)."""
    hidden = torch.relu(preprocess(grads, p) @ w1.T + b1)
    return hidden @ w2 + b2


def gradient_mlp_backward_reference(grad_out, grads, w1, b1, w2, p, need_grads):
    """The module docstring's formulas on the [..., H] hidden layer."""
    u = preprocess(grads, p)  # [..., 2]
    s = u @ w1.T + b1  # [..., H]
    dy = grad_out[..., None]
    dh = torch.where(s <= 0, 0, dy * w2)  # m of the docstring
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    d_w1 = flat(dh).T @ flat(u)
    d_grads = grads.new_empty(0)
    if need_grads:
        d_grads = preprocess_backward(dh @ w1, grads, p)
    return (d_grads, d_w1, flat(dh).sum(0), flat(dy * torch.relu(s)).sum(0), grad_out.sum())


GRADIENT_MLP = OpDeclaration(
    name="gradient_mlp",
    forward=Kernels(
        {
            "reference": gradient_mlp_forward_reference,
            "cpu": compiled("gradient_mlp_forward"),
            "triton": triton("metanet_triton", "gradient_mlp_forward"),
        }
    ),
    backward=Kernels(
        {
            "reference": gradient_mlp_backward_reference,
            "cpu": compiled("gradient_mlp_backward"),
            "triton": triton("metanet_triton", "gradient_mlp_backward"),
        },
        device_from=1,
    ),
    dtypes={"cpu": FLOAT32_64, "triton": FLOAT32},
    differentiable=ONCE,
)


@torch.library.custom_op("fastmeta::gradient_mlp", mutates_args=())
def gradient_mlp_op(
    grads: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: float
) -> Tensor:
    check_gradient_mlp_args(grads, w1, b1, w2, b2, p)
    return GRADIENT_MLP.run_forward(*contiguous(grads, w1, b1, w2, b2), p)


@gradient_mlp_op.register_fake
@on_one_device(gradient_mlp_op)
def _(grads, w1, b1, w2, b2, p):
    return torch.empty_like(grads, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastmeta::gradient_mlp_backward", mutates_args=())
def gradient_mlp_backward_op(
    grad_out: Tensor, grads: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, p: float, need_grads: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return GRADIENT_MLP.run_backward(*contiguous(grad_out, grads, w1, b1, w2), p, need_grads)


@gradient_mlp_backward_op.register_fake
@on_one_device(gradient_mlp_backward_op)
def _(grad_out, grads, w1, b1, w2, p, need_grads):
    d_grads = torch.empty_like(grads) if need_grads else grads.new_empty(0)
    return (
        d_grads,
        torch.empty_like(w1),
        torch.empty_like(b1),
        torch.empty_like(w2),
        w2.new_empty(()),
    )


def _setup(ctx, inputs, output):
    grads, w1, b1, w2, _, p = inputs
    ctx.p = p
    ctx.save_for_backward(grads, w1, b1, w2)


def _backward(ctx, grad_out):
    grads, w1, b1, w2 = ctx.saved_tensors
    need_grads = ctx.needs_input_grad[0]
    d_grads, d_w1, d_b1, d_w2, d_b2 = gradient_mlp_backward_op(
        grad_out, grads, w1, b1, w2, ctx.p, need_grads
    )
    return (d_grads if need_grads else None), d_w1, d_b1, d_w2, d_b2, None


gradient_mlp_op.register_autograd(_backward, setup_context=_setup)
GRADIENT_MLP.apply_second_derivative_policy(gradient_mlp_backward_op)


def gradient_mlp(
    grads: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: float = 10.0
) -> Tensor:
    """Coordinate-wise MLP on preprocessed gradients: grads [...] -> [...] (same shape);
    w1 [H, 2], b1 [H], w2 [H], b2 []. See the module docstring for the math."""
    return gradient_mlp_op(grads, w1, b1, w2, b2, float(p))
