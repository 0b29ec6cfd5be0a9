"""A small LSTM run over the examples of an episode for every coordinate of their loss
gradients (Meta Networks' task-level generator d as the paper has it, section 3;
Andrychowicz et al. 2016's coordinate-wise LSTM; docs/kernel-math.md section 3).

grads [B, N, ...]: N examples' gradients for each of B episodes. For every episode b
and coordinate q, one LSTM with H hidden units (the same for all coordinates) reads
the N examples' preprocessed gradients u_t (fastmeta.ops.gradient_mlp.preprocess) in
order, from zero state, and a linear output of its last hidden state is the fast
weight: out [B, ...].
    z_t = W_ih u_t + W_hh h_{t-1} + b          [4H], split (i, f, g, o) as torch.nn.LSTM
    i, f, o = sigmoid(z_i, z_f, z_o),  g = tanh(z_g)
    c_t = f c_{t-1} + i g,   h_t = o tanh(c_t),   h_0 = c_0 = 0
    y = w_out . h_N + b_out
Over B x P coordinates that is B*P independent LSTMs of N steps; the kernels keep the
state in registers (cache on the CPU) instead of storing [B, N, P, 4H] gates.

Backward (through time), with dy the incoming gradient: d_b_out = sum dy,
d_w_out = sum dy h_N, dh = dy w_out, dc = 0; for t = N .. 1, with tau = tanh(c_t):
    dc  <- dc + dh o (1 - tau^2)
    dz   = (dc g i (1 - i), dc c_{t-1} f (1 - f), dc i (1 - g^2), dh tau o (1 - o))
    d_b += dz,  d_W_ih += dz u_t^T,  d_W_hh += dz h_{t-1}^T
    du_t = W_ih^T dz  ->  d_grads_t (gradient_mlp's preprocessing backward)
    dh  <- W_hh^T dz,  dc <- dc f
where the sums run over all coordinates. The kernels recompute the forward of a
block of coordinates, keep its N steps' states, then run this. Differentiable once:
a second derivative raises (the backward op has no formula of its own).

Ops: torch.ops.fastmeta.gradient_lstm, torch.ops.fastmeta.gradient_lstm_backward.
Backends: reference (here), cpu (csrc/cpu/gradient_lstm_cpu.cpp),
triton (fastmeta/kernels/gradient_lstm_triton.py).
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
from fastmeta.ops.gradient_mlp import preprocess, preprocess_backward

NAME = "fastmeta.gradient_lstm"


def check_gradient_lstm_args(
    grads: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor, w_out: Tensor, b_out: Tensor, p: float
) -> None:
    """grads [B, N, ...]; w_ih [4H, 2], w_hh [4H, H], b [4H], w_out [H], b_out [] of
    grads' dtype and device."""
    tensors = (("grads", grads), ("w_ih", w_ih), ("w_hh", w_hh), ("b", b), ("w_out", w_out))
    for arg, value in (*tensors, ("b_out", b_out)):
        check_tensor(NAME, arg, value)
    check_floating(NAME, "grads", grads)
    check_same_dtype_device(
        NAME, "grads", grads, w_ih=w_ih, w_hh=w_hh, b=b, w_out=w_out, b_out=b_out
    )
    if grads.dim() < 2:
        raise ValueError(
            f"{NAME}: grads must be [B, N, ...] (episodes, examples, coordinates), got "
            f"{shape_str(grads)}"
        )
    hidden = w_hh.shape[1] if w_hh.dim() == 2 else -1
    if w_hh.dim() != 2 or hidden < 1 or w_hh.shape[0] != 4 * hidden:
        raise ValueError(f"{NAME}: w_hh must be [4H, H] with H >= 1, got {shape_str(w_hh)}")
    expected = (
        ("w_ih", w_ih, (4 * hidden, 2)),
        ("b", b, (4 * hidden,)),
        ("w_out", w_out, (hidden,)),
    )
    for arg, value, shape in expected:
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{NAME}: {arg} must be [{', '.join(map(str, shape))}] for H={hidden} of w_hh "
                f"{shape_str(w_hh)}, got {shape_str(value)}"
            )
    if b_out.dim() != 0:
        raise ValueError(f"{NAME}: b_out must be a 0-d tensor, got {shape_str(b_out)}")
    if not (isinstance(p, (int, float)) and p > 0 and math.isfinite(p)):
        raise ValueError(f"{NAME}: p must be a positive number, got {p!r}")


def lstm_step(u: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor):
    """One step on inputs u [..., 2] from state h, c [..., H]: (h, c, (i, f, g, o))."""
    i, f, g, o = (u @ w_ih.T + h @ w_hh.T + b).chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c, (i, f, g, o)


def _zero_state(grads: Tensor, w_hh: Tensor) -> Tensor:
    """h_0 = c_0 = 0: [B, ..., H]."""
    return grads.new_zeros(grads.shape[0], *grads.shape[2:], w_hh.shape[1])


def gradient_lstm_forward_reference(grads, w_ih, w_hh, b, w_out, b_out, p):
    """The plain PyTorch form: builds every step's [B, ..., 4H] gates (differentiable)."""
    h = c = _zero_state(grads, w_hh)
    for u in preprocess(grads, p).unbind(1):
        h, c, _ = lstm_step(u, h, c, w_ih, w_hh, b)
    return h @ w_out + b_out


def gradient_lstm_backward_reference(grad_out, grads, w_ih, w_hh, b, w_out, p, need_grads):
    """The module docstring's formulas on the states of a recomputed forward."""
    u = preprocess(grads, p)  # [B, N, ..., 2]
    hs, cs, gates = [_zero_state(grads, w_hh)], [_zero_state(grads, w_hh)], []
    for t in range(grads.shape[1]):
        h, c, gate = lstm_step(u[:, t], hs[-1], cs[-1], w_ih, w_hh, b)
        hs.append(h), cs.append(c), gates.append(gate)
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    dy = grad_out[..., None]
    d_w_out = flat(dy * hs[-1]).sum(0)
    dh, dc = dy * w_out, torch.zeros_like(cs[0])
    d_w_ih, d_w_hh, d_b = torch.zeros_like(w_ih), torch.zeros_like(w_hh), torch.zeros_like(b)
    du = torch.zeros_like(u)
    for t in reversed(range(grads.shape[1])):
        i, f, g, o = gates[t]
        tau = torch.tanh(cs[t + 1])
        dc = dc + dh * o * (1 - tau * tau)
        dz = torch.cat(
            (
                dc * g * i * (1 - i),
                dc * cs[t] * f * (1 - f),
                dc * i * (1 - g * g),
                dh * tau * o * (1 - o),
            ),
            -1,
        )
        d_b += flat(dz).sum(0)
        d_w_ih += flat(dz).T @ flat(u[:, t])
        d_w_hh += flat(dz).T @ flat(hs[t])
        du[:, t] = dz @ w_ih
        dh, dc = dz @ w_hh, dc * f
    d_grads = preprocess_backward(du, grads, p) if need_grads else grads.new_empty(0)
    return d_grads, d_w_ih, d_w_hh, d_b, d_w_out, grad_out.sum()


GRADIENT_LSTM = OpDeclaration(
    name="gradient_lstm",
    forward=Kernels(
        {
            "reference": gradient_lstm_forward_reference,
            "cpu": compiled("gradient_lstm_forward"),
            "triton": triton("gradient_lstm_triton", "gradient_lstm_forward"),
        }
    ),
    backward=Kernels(
        {
            "reference": gradient_lstm_backward_reference,
            "cpu": compiled("gradient_lstm_backward"),
            "triton": triton("gradient_lstm_triton", "gradient_lstm_backward"),
        },
        device_from=1,
    ),
    dtypes={"cpu": FLOAT32_64, "triton": FLOAT32},
    differentiable=ONCE,
)


@torch.library.custom_op("fastmeta::gradient_lstm", mutates_args=())
def gradient_lstm_op(
    grads: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor, w_out: Tensor, b_out: Tensor, p: float
) -> Tensor:
    check_gradient_lstm_args(grads, w_ih, w_hh, b, w_out, b_out, p)
    return GRADIENT_LSTM.run_forward(*contiguous(grads, w_ih, w_hh, b, w_out, b_out), p)


@gradient_lstm_op.register_fake
@on_one_device(gradient_lstm_op)
def _(grads, w_ih, w_hh, b, w_out, b_out, p):
    return grads.new_empty(grads.shape[0], *grads.shape[2:])


@torch.library.custom_op("fastmeta::gradient_lstm_backward", mutates_args=())
def gradient_lstm_backward_op(
    grad_out: Tensor,
    grads: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b: Tensor,
    w_out: Tensor,
    p: float,
    need_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    tensors = contiguous(grad_out, grads, w_ih, w_hh, b, w_out)
    return GRADIENT_LSTM.run_backward(*tensors, p, need_grads)


@gradient_lstm_backward_op.register_fake
@on_one_device(gradient_lstm_backward_op)
def _(grad_out, grads, w_ih, w_hh, b, w_out, p, need_grads):
    d_grads = torch.empty_like(grads) if need_grads else grads.new_empty(0)
    parameters = (torch.empty_like(t) for t in (w_ih, w_hh, b, w_out))
    return (d_grads, *parameters, w_out.new_empty(()))


def _setup(ctx, inputs, output):
    grads, w_ih, w_hh, b, w_out, _, p = inputs
    ctx.p = p
    ctx.save_for_backward(grads, w_ih, w_hh, b, w_out)


def _backward(ctx, grad_out):
    need_grads = ctx.needs_input_grad[0]
    d_grads, *d_parameters = gradient_lstm_backward_op(
        grad_out, *ctx.saved_tensors, ctx.p, need_grads
    )
    return (d_grads if need_grads else None), *d_parameters, None


gradient_lstm_op.register_autograd(_backward, setup_context=_setup)
GRADIENT_LSTM.apply_second_derivative_policy(gradient_lstm_backward_op)


def gradient_lstm(
    grads: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b: Tensor,
    w_out: Tensor,
    b_out: Tensor,
    p: float = 10.0,
) -> Tensor:
    """Coordinate-wise LSTM over the examples: grads [B, N, ...] -> [B, ...]; w_ih [4H, 2],
    w_hh [4H, H], b [4H], w_out [H], b_out []. See the module docstring for the math."""
    return gradient_lstm_op(grads, w_ih, w_hh, b, w_out, b_out, float(p))
