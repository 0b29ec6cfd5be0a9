"""Meta Networks' memory read fused with the fast branch of an augmented layer
(docs/kernel-math.md section 3).

Query j of episode b reads the fast weights W*_j = sum_i a_ji W*_i of the N stored
support examples and applies them to its L input rows (L = 1 for a linear layer,
the H*W patches of a convolution):
    out[b, j, l, o] = sum_i a[b, j, i] sum_k W[b, i, o, k] x[b, j, l, k]
    attention [B, M, N], fast_weights [B, N, O, K], x [B, M, L, K] -> [B, M, L, O].
The kernels never hold all M mixed weights [M, O, K] at once (the plain form does).

Backward, with G[b, j] = dout[b, j]^T x[b, j]  [O, K]:
    d_attention[b, j, i] = <W[b, i], G[b, j]>
    d_fast_weights[b, i] = sum_j a[b, j, i] G[b, j]
    d_x[b, j]            = dout[b, j] W*_j
Differentiable once: a second derivative raises (the backward op has no formula of
its own).

Ops: torch.ops.fastmeta.attention_read, torch.ops.fastmeta.attention_read_backward.
Backends: reference (here), cpu and cuda (csrc/attention_read.cpp: query
chunks through ATen's GEMMs), triton (fastmeta/kernels/metanet_triton.py). On CUDA the
forward and the backward each race cuda against triton per shape bucket
(fastmeta/race.py): which is faster depends on the shape.
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
from fastmeta.ops.declaration import FLOAT32, ONCE, Kernels, OpDeclaration, every_backend


def check_attention_read_args(attention: Tensor, fast_weights: Tensor, x: Tensor) -> None:
    """attention [B, M, N], fast_weights [B, N, O, K], x [B, M, L, K]: one dtype, device."""
    name = "fastmeta.attention_read"
    for arg, value in (("attention", attention), ("fast_weights", fast_weights), ("x", x)):
        check_tensor(name, arg, value)
        check_floating(name, arg, value)
    check_same_dtype_device(name, "x", x, attention=attention, fast_weights=fast_weights)
    got = (
        f"attention {shape_str(attention)}, fast_weights {shape_str(fast_weights)}, "
        f"x {shape_str(x)}"
    )
    if attention.dim() != 3 or fast_weights.dim() != 4 or x.dim() != 4:
        raise ValueError(
            f"{name}: expected attention [B, M, N], fast_weights [B, N, O, K] and "
            f"x [B, M, L, K], got {got}"
        )
    B, M, N = attention.shape
    if (
        fast_weights.shape[:2] != (B, N)
        or x.shape[:2] != (B, M)
        or x.shape[3] != fast_weights.shape[3]
    ):
        raise ValueError(f"{name}: B, M, N and K disagree: {got}")


def attention_read_forward_reference(attention, fast_weights, x):
    """The plain form: every query's mixed weights [B, M, O, K], then one matmul."""
    mixed = torch.einsum("bmn,bnok->bmok", attention, fast_weights)
    return x @ mixed.transpose(-1, -2)


def attention_read_backward_reference(
    grad_out, attention, fast_weights, x, need_attention, need_weights, need_x
):
    if x.shape[2] == 0:  # L = 0: an empty output; zero gradients, not 0 * inf
        attention, fast_weights = torch.zeros_like(attention), torch.zeros_like(fast_weights)
    g = grad_out.transpose(-1, -2) @ x  # [B, M, O, K]
    d_attention = (
        torch.einsum("bmok,bnok->bmn", g, fast_weights) if need_attention else x.new_empty(0)
    )
    d_weights = torch.einsum("bmn,bmok->bnok", attention, g) if need_weights else x.new_empty(0)
    d_x = (
        grad_out @ torch.einsum("bmn,bnok->bmok", attention, fast_weights)
        if need_x
        else x.new_empty(0)
    )
    return d_attention, d_weights, d_x


ATTENTION_READ = OpDeclaration(
    name="attention_read",
    forward=Kernels(
        every_backend(attention_read_forward_reference, "attention_read_forward", "metanet_triton"),
        race_on=(0, 1, 2),
    ),
    backward=Kernels(
        every_backend(
            attention_read_backward_reference, "attention_read_backward", "metanet_triton"
        ),
        race_on=(1, 2, 3, 4, 5, 6),
    ),
    dtypes={"triton": FLOAT32},
    differentiable=ONCE,
)


@torch.library.custom_op("fastmeta::attention_read", mutates_args=())
def attention_read_op(attention: Tensor, fast_weights: Tensor, x: Tensor) -> Tensor:
    check_attention_read_args(attention, fast_weights, x)
    return ATTENTION_READ.run_forward(
        attention.contiguous(), fast_weights.contiguous(), x.contiguous()
    )


@attention_read_op.register_fake
@on_one_device(attention_read_op)
def _(attention, fast_weights, x):
    return x.new_empty(*x.shape[:3], fast_weights.shape[2])


@torch.library.custom_op("fastmeta::attention_read_backward", mutates_args=())
def attention_read_backward_op(
    grad_out: Tensor,
    attention: Tensor,
    fast_weights: Tensor,
    x: Tensor,
    need_attention: bool,
    need_weights: bool,
    need_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return ATTENTION_READ.run_backward(
        grad_out.contiguous(),
        attention.contiguous(),
        fast_weights.contiguous(),
        x.contiguous(),
        need_attention,
        need_weights,
        need_x,
    )


@attention_read_backward_op.register_fake
@on_one_device(attention_read_backward_op)
def _(grad_out, attention, fast_weights, x, need_attention, need_weights, need_x):
    return tuple(
        torch.empty_like(t) if need else x.new_empty(0)
        for t, need in ((attention, need_attention), (fast_weights, need_weights), (x, need_x))
    )


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    need = ctx.needs_input_grad[:3]
    grads = attention_read_backward_op(grad_out, *ctx.saved_tensors, *need)
    return tuple(g if wanted else None for g, wanted in zip(grads, need))


attention_read_op.register_autograd(_backward, setup_context=_setup)
ATTENTION_READ.apply_second_derivative_policy(attention_read_backward_op)


def attention_read(attention: Tensor, fast_weights: Tensor, x: Tensor) -> Tensor:
    """sum_i attention[b, j, i] (fast_weights[b, i] applied to the rows of x[b, j]):
    attention [B, M, N], fast_weights [B, N, O, K], x [B, M, L, K] -> [B, M, L, O]."""
    return attention_read_op(attention, fast_weights, x)
