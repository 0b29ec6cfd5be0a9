"""Prototypical cross-entropy: distances, log-softmax and cross-entropy, fused.

Logits z[b, m, k] = -tau ||q_bm - c_bk||^2. Since tau ||q_bm||^2 is the same for
every class it cancels in the softmax, so the kernels use
    z'[b, m, k] = tau (2 q_bm . c_bk - ||c_bk||^2)       (one GEMM + epilogue)
    loss[b, m]  = logsumexp_k z'[b, m, :] - z'[b, m, y_bm]
Never builds [B, M, C, D]; holds [B, M, C] (the softmax) for the backward.
Backward, with G = (softmax - onehot(y)) * dL/dloss [B, M, C]:
    d_q   = 2 tau G C
    d_c   = 2 tau (G^T Q - colsum(G) c)
    d_tau = sum(G * (2 Q C^T - ||c||^2)) = 2 sum_m q_m . (G C)_m - colsum(G) . ||c||^2
Under create_graph (second-order meta-learning through a ProtoNet head) the
backward recomputes the softmax from the inputs with differentiable torch ops, so
grad-of-grad is exact; otherwise it runs the fused backward op.

Ops: torch.ops.fastmeta.prototypical_cross_entropy (-> losses [B, M], predictions
[B, M], softmax [B, M, C]) and ..._backward. Backends: reference (here), cpu and
cuda (csrc/{cpu,cuda}/prototypical_cross_entropy_*), triton (fastmeta/kernels/protonet_triton.py).
"""

import torch
from torch import Tensor

from fastmeta.ops._checks import (
    check_episode_pair,
    check_floating,
    check_labels,
    check_same_dtype_device,
    check_tensor,
    on_one_device,
    shape_str,
)
from fastmeta.ops._opmath import math_dtype, opmath
from fastmeta.ops.declaration import (
    ANY_ORDER,
    FLOAT32,
    FLOAT32_64,
    HALF,
    Kernels,
    OpDeclaration,
    every_backend,
    register_float32_autocast,
)
from fastmeta.ops.eager import eager_function, eager_path
from fastmeta.validation import Labels, check_label_values


def check_query_args(name: str, queries: Tensor, labels: Tensor, tau: Tensor) -> None:
    """queries [B, M, D] (checked by the caller), integer query_labels [B, M] on the
    queries' device (values: see fastmeta.validation), tau a floating 0-d tensor of
    the queries' dtype and device."""
    check_tensor(name, "tau", tau)
    check_floating(name, "tau", tau)
    if tau.dim() != 0:
        raise ValueError(f"{name}: tau must be a scalar, got shape {shape_str(tau)}")
    check_same_dtype_device(name, "queries", queries, tau=tau)
    check_labels(name, "query_labels", labels, queries.shape[:2])
    if labels.device != queries.device:
        raise ValueError(
            f"{name}: query_labels is on {labels.device} but queries is on {queries.device}"
        )


def check_prototypical_cross_entropy_args(
    queries: Tensor, prototypes: Tensor, labels: Tensor, tau: Tensor
) -> None:
    name = "fastmeta.prototypical_cross_entropy"
    check_episode_pair(name, "queries", queries, "prototypes", prototypes)
    if prototypes.shape[1] == 0:  # no class to predict: neither a loss nor an argmax
        raise ValueError(
            f"{name}: prototypes must hold at least one class, got shape {shape_str(prototypes)}"
        )
    check_same_dtype_device(name, "queries", queries, prototypes=prototypes)
    check_query_args(name, queries, labels, tau)


def _logits(queries: Tensor, prototypes: Tensor, tau: Tensor) -> Tensor:
    """z' = tau (2 Q C^T - ||c||^2) [B, M, C] (logits up to a per-row constant)."""
    products = torch.bmm(queries, prototypes.transpose(1, 2))
    return tau * (2 * products - prototypes.pow(2).sum(-1)[:, None, :])


def prototypical_cross_entropy_forward_reference(queries, prototypes, labels, tau):
    q, c, t = opmath(queries, prototypes, tau)
    logits = _logits(q, c, t)
    log_probs = torch.log_softmax(logits, dim=-1)
    losses = -log_probs.gather(-1, labels[..., None]).squeeze(-1)
    return losses.to(queries.dtype), logits.argmax(-1), log_probs.exp()  # softmax: math dtype


def prototypical_cross_entropy_backward_reference(
    grad_losses, queries, prototypes, labels, tau, softmax
):
    """The backward formulas in torch ops (differentiable when softmax is)."""
    go, q, c, t, p = opmath(grad_losses, queries, prototypes, tau, softmax)
    classes = torch.arange(c.shape[1], device=labels.device)
    onehot = (labels[..., None] == classes).to(p.dtype)  # one_hot() would read the labels
    G = (p - onehot) * go[..., None]
    GC = torch.bmm(G, c)
    colsum = G.sum(1)  # [B, C]
    d_queries = 2 * t * GC
    d_prototypes = 2 * t * (torch.bmm(G.transpose(1, 2), q) - colsum[..., None] * c)
    d_tau = 2 * (q * GC).sum() - (colsum * c.pow(2).sum(-1)).sum()
    if G.numel() == 0 or q.shape[2] == 0:  # no term: zeros, not 0 * an infinite prototype
        d_prototypes, d_tau = torch.zeros_like(d_prototypes), torch.zeros_like(d_tau)
    return d_queries.to(queries.dtype), d_prototypes.to(prototypes.dtype), d_tau.to(tau.dtype)


PROTOTYPICAL_CROSS_ENTROPY = OpDeclaration(
    name="prototypical_cross_entropy",
    forward=Kernels(
        every_backend(
            prototypical_cross_entropy_forward_reference,
            "prototypical_cross_entropy_forward",
            "protonet_triton",
        ),
        race_on=(0, 1),
        float32_outputs=(2,),  # the softmax
    ),
    backward=Kernels(
        every_backend(
            prototypical_cross_entropy_backward_reference,
            "prototypical_cross_entropy_backward",
            "protonet_triton",
        ),
        device_from=1,
        race_on=(1, 2),
    ),
    dtypes={"cpu": FLOAT32_64 + HALF, "cuda": FLOAT32_64 + HALF, "triton": FLOAT32 + HALF},
    upcast=("cpu", "cuda"),
    # under create_graph the backward is recomputed with differentiable torch ops
    differentiable=ANY_ORDER,
)


def prototypical_cross_entropy_backward_differentiable(
    grad_losses, queries, prototypes, labels, tau
):
    """The backward for create_graph: the softmax recomputed from the inputs and the
    formulas in differentiable torch ops, so grad of grad is exact."""
    softmax = torch.softmax(_logits(*opmath(queries, prototypes, tau)), dim=-1)
    return prototypical_cross_entropy_backward_reference(
        grad_losses, queries, prototypes, labels.long(), tau, softmax
    )


def prototypical_cross_entropy_forward(
    queries: Tensor, prototypes: Tensor, labels: Tensor, tau: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    check_prototypical_cross_entropy_args(queries, prototypes, labels, tau)
    check_label_values(
        "fastmeta.prototypical_cross_entropy",
        Labels("query_labels", labels, prototypes.shape[1]),
    )
    return PROTOTYPICAL_CROSS_ENTROPY.run_forward(
        queries.contiguous(), prototypes.contiguous(), labels.long().contiguous(), tau
    )


prototypical_cross_entropy_op = torch.library.custom_op(
    "fastmeta::prototypical_cross_entropy", mutates_args=()
)(prototypical_cross_entropy_forward)


@prototypical_cross_entropy_op.register_fake
@on_one_device(prototypical_cross_entropy_op)
def _(queries, prototypes, labels, tau):
    B, M = queries.shape[:2]
    return (
        queries.new_empty(B, M),
        queries.new_empty(B, M, dtype=torch.int64),
        queries.new_empty(B, M, prototypes.shape[1], dtype=math_dtype(queries.dtype)),
    )


@torch.library.custom_op("fastmeta::prototypical_cross_entropy_backward", mutates_args=())
def prototypical_cross_entropy_backward_op(
    grad_losses: Tensor,
    queries: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    tau: Tensor,
    softmax: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    check_prototypical_cross_entropy_args(queries, prototypes, labels, tau)
    return PROTOTYPICAL_CROSS_ENTROPY.run_backward(
        grad_losses.contiguous(),
        queries.contiguous(),
        prototypes.contiguous(),
        labels.long().contiguous(),
        tau,
        softmax.contiguous(),
    )


@prototypical_cross_entropy_backward_op.register_fake
@on_one_device(prototypical_cross_entropy_backward_op)
def _(grad_losses, queries, prototypes, labels, tau, softmax):
    return (
        queries.new_empty(queries.shape),
        prototypes.new_empty(prototypes.shape),
        tau.new_empty(()),
    )


def _setup(ctx, inputs, output):
    queries, prototypes, labels, tau = inputs
    _, predictions, softmax = output
    ctx.mark_non_differentiable(predictions, softmax)
    ctx.save_for_backward(queries, prototypes, labels, tau, softmax)


def _backward(ctx, grad_losses, _grad_predictions, _grad_softmax):
    queries, prototypes, labels, tau, softmax = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: recompute differentiably
        grads = prototypical_cross_entropy_backward_differentiable(
            grad_losses, queries, prototypes, labels, tau
        )
    else:
        grads = prototypical_cross_entropy_backward_op(
            grad_losses, queries, prototypes, labels, tau, softmax
        )
    d_queries, d_prototypes, d_tau = grads
    return d_queries, d_prototypes, None, d_tau if ctx.needs_input_grad[3] else None


prototypical_cross_entropy_op.register_autograd(_backward, setup_context=_setup)
register_float32_autocast(prototypical_cross_entropy_op)
_Eager = eager_function(
    "prototypical_cross_entropy", prototypical_cross_entropy_forward, _setup, _backward
)


def prototypical_cross_entropy(
    queries: Tensor, prototypes: Tensor, labels: Tensor, tau: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The op (losses [B, M], predictions [B, M], softmax [B, M, C]), on its eager fast
    path where one applies (fastmeta/ops/eager.py)."""
    if eager_path(queries, prototypes, labels, tau):
        return _Eager.apply(queries, prototypes, labels, tau)
    return prototypical_cross_entropy_op(queries, prototypes, labels, tau)
