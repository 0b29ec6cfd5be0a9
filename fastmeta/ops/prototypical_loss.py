"""The ProtoNet loss of whole episodes as one op: class prototypes, then the
prototypical cross-entropy (the math and the kernels are in class_prototypes.py and
prototypical_cross_entropy.py). One op instead of two halves the Python dispatch, autograd
nodes and argument checks of a training step, which is most of the time of small
episodes: support [B, S, D], support_labels [B, S], queries [B, M, D],
query_labels [B, M], num_classes C, tau a 0-d tensor, distance one of
prototypical_cross_entropy.DISTANCES (default "squared_euclidean").

    forward : prototypes = class_prototypes(support, support_labels, C)       [B, C, D]
              losses, predictions, softmax = prototypical_cross_entropy(queries, prototypes,
                                                                        query_labels, tau,
                                                                        distance)
    backward: d_queries, d_prototypes, d_tau = prototypical_cross_entropy_backward(...)
              d_support[b, i] = d_prototypes[b, y_bi] / n_{b, y_bi}
Under create_graph the backward recomputes prototypes and softmax with differentiable
ops instead, so grad of grad is exact. With float16/bfloat16 embeddings the prototypes
and softmax (saved for the backward) are float32 (math_dtype); losses and gradients
come in the embeddings' dtype.

Ops: torch.ops.fastmeta.prototypical_loss (-> losses [B, M], predictions [B, M],
prototypes [B, C, D], softmax [B, M, C]) and ..._backward. Each half runs on the
backend its own op selects (and records): class_prototypes and
prototypical_cross_entropy.
"""

from typing import Callable

import torch
from torch import Tensor

from fastmeta.ops._checks import (
    check_episode_pair,
    check_labels,
    check_same_dtype_device,
    on_one_device,
    shape_str,
)
from fastmeta.ops._opmath import math_dtype
from fastmeta.ops.class_prototypes import (
    CLASS_PROTOTYPES,
    check_class_prototypes_args,
    class_prototypes_backward_op,
    class_prototypes_op,
)
from fastmeta.ops.declaration import register_float32_autocast
from fastmeta.ops.eager import eager_function, eager_path
from fastmeta.ops.prototypical_cross_entropy import (
    DISTANCES,
    PROTOTYPICAL_CROSS_ENTROPY,
    check_query_args,
    distance_code,
    prototypical_cross_entropy_backward_differentiable,
)
from fastmeta.validation import Labels, check_label_values

NAME = "fastmeta.prototypical_loss"


def check_prototypical_loss_args(
    support: Tensor,
    support_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    tau: Tensor,
    distance: str,
) -> int:
    """The checks; returns the distance's code."""
    code = distance_code(NAME, distance)
    check_class_prototypes_args(support, support_labels, num_classes, NAME, "support_labels")
    check_episode_pair(NAME, "support", support, "queries", queries)
    check_same_dtype_device(NAME, "support", support, queries=queries)
    check_query_args(NAME, queries, query_labels, tau)
    return code


def prototypical_loss_forward(
    support: Tensor,
    support_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    tau: Tensor,
    distance: str = "squared_euclidean",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    code = check_prototypical_loss_args(
        support, support_labels, queries, query_labels, num_classes, tau, distance
    )
    check_label_values(
        NAME,
        Labels("support_labels", support_labels, num_classes, every_class=True),
        Labels("query_labels", query_labels, num_classes),
    )
    prototypes = CLASS_PROTOTYPES.run_forward(  # float32 for half support: math_dtype
        support.to(math_dtype(support.dtype)).contiguous(),
        support_labels.long().contiguous(),
        num_classes,
    )
    losses, predictions, softmax = PROTOTYPICAL_CROSS_ENTROPY.run_forward(
        queries.contiguous(), prototypes, query_labels.long().contiguous(), tau, code
    )
    return losses, predictions, prototypes, softmax


prototypical_loss_op = torch.library.custom_op("fastmeta::prototypical_loss", mutates_args=())(
    prototypical_loss_forward
)


@prototypical_loss_op.register_fake
@on_one_device(prototypical_loss_op)
def _(
    support, support_labels, queries, query_labels, num_classes, tau, distance="squared_euclidean"
):
    distance_code(NAME, distance)
    B, M = queries.shape[:2]
    return (
        queries.new_empty(B, M),
        queries.new_empty(B, M, dtype=torch.int64),
        support.new_empty(B, num_classes, support.shape[2], dtype=math_dtype(support.dtype)),
        queries.new_empty(B, M, num_classes, dtype=math_dtype(queries.dtype)),
    )


def check_prototypical_loss_backward_args(
    grad_losses: Tensor,
    support_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    tau: Tensor,
    prototypes: Tensor,
    softmax: Tensor,
    distance: str,
) -> int:
    """Host-side checks of the backward op's arguments (the label values were checked
    by the forward); returns the distance's code."""
    code = distance_code(NAME, distance)
    check_episode_pair(NAME, "queries", queries, "prototypes", prototypes)
    check_same_dtype_device(NAME, "queries", queries, grad_losses=grad_losses)
    saved = math_dtype(queries.dtype)
    for name, t in (("prototypes", prototypes), ("softmax", softmax)):
        if t.dtype != saved or t.device != queries.device:
            raise TypeError(
                f"{NAME}: {name} must be {saved} on {queries.device}, got {t.dtype} on {t.device}"
            )
    B, M = queries.shape[:2]
    C = prototypes.shape[1]
    check_labels(NAME, "support_labels", support_labels, (B, support_labels.shape[-1]))
    check_query_args(NAME, queries, query_labels, tau)
    for name, t, shape in (("grad_losses", grad_losses, (B, M)), ("softmax", softmax, (B, M, C))):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{NAME}: {name} must be [{', '.join(map(str, shape))}], got {shape_str(t)}"
            )
    return code


def prototypical_loss_backward(
    grad_losses: Tensor,
    support_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    tau: Tensor,
    prototypes: Tensor,
    softmax: Tensor,
    distance: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_support [B, S, D], d_queries [B, M, D], d_tau []) from the forward's inputs
    and its prototypes [B, C, D] and softmax [B, M, C] (unchecked: the eager path
    passes what the forward saved, and the distance's code; the backward op checks
    first)."""
    d_queries, d_prototypes, d_tau = PROTOTYPICAL_CROSS_ENTROPY.run_backward(
        grad_losses.contiguous(),
        queries.contiguous(),
        prototypes.contiguous(),
        query_labels.long().contiguous(),
        tau,
        softmax.contiguous(),
        distance,
    )
    d_support = CLASS_PROTOTYPES.run_backward(d_prototypes, support_labels.long().contiguous())
    return d_support.to(queries.dtype), d_queries, d_tau


@torch.library.custom_op("fastmeta::prototypical_loss_backward", mutates_args=())
def prototypical_loss_backward_op(
    grad_losses: Tensor,
    support_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    tau: Tensor,
    prototypes: Tensor,
    softmax: Tensor,
    distance: str = "squared_euclidean",
) -> tuple[Tensor, Tensor, Tensor]:
    args = (grad_losses, support_labels, queries, query_labels, tau, prototypes, softmax)
    code = check_prototypical_loss_backward_args(*args, distance)
    return prototypical_loss_backward(*args, code)


@prototypical_loss_backward_op.register_fake
@on_one_device(prototypical_loss_backward_op)
def _(
    grad_losses,
    support_labels,
    queries,
    query_labels,
    tau,
    prototypes,
    softmax,
    distance="squared_euclidean",
):
    distance_code(NAME, distance)
    B, S = support_labels.shape
    return (
        queries.new_empty(B, S, queries.shape[2]),
        queries.new_empty(queries.shape),
        tau.new_empty(()),
    )


def _setup(ctx, inputs, output):
    support, support_labels, queries, query_labels, num_classes, tau, ctx.distance = inputs
    _, predictions, prototypes, softmax = output
    ctx.mark_non_differentiable(predictions, prototypes, softmax)
    ctx.num_classes = num_classes
    ctx.save_for_backward(support, support_labels, queries, query_labels, tau, prototypes, softmax)


def _autograd_formula(backward: Callable, by_code: bool) -> Callable:
    """The autograd formula, with `backward` (the backward op, or its implementation
    on the eager path, which takes the distance's code when `by_code`) for a first
    derivative."""

    def formula(ctx, grad_losses, _grad_predictions, _grad_prototypes, _grad_softmax):
        saved = ctx.saved_tensors
        support, support_labels, queries, query_labels, tau, _, _ = saved
        code = DISTANCES.index(ctx.distance)
        if torch.is_grad_enabled():  # create_graph: every step differentiable
            prototypes = class_prototypes_op(support, support_labels, ctx.num_classes)
            d_queries, d_prototypes, d_tau = prototypical_cross_entropy_backward_differentiable(
                grad_losses, queries, prototypes, query_labels, tau, code
            )
            d_support = class_prototypes_backward_op(d_prototypes, support_labels)
        else:  # saved[1:]: support_labels, queries, query_labels, tau, prototypes, softmax
            distance = code if by_code else ctx.distance
            d_support, d_queries, d_tau = backward(grad_losses, *saved[1:], distance)
        d_tau = d_tau if ctx.needs_input_grad[5] else None
        return d_support, None, d_queries, None, None, d_tau, None

    return formula


prototypical_loss_op.register_autograd(
    _autograd_formula(prototypical_loss_backward_op, by_code=False), setup_context=_setup
)
register_float32_autocast(prototypical_loss_op)
_Eager = eager_function(
    "prototypical_loss",
    prototypical_loss_forward,
    _setup,
    _autograd_formula(prototypical_loss_backward, by_code=True),
)


def prototypical_loss(
    support: Tensor,
    support_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    tau: Tensor,
    distance: str = "squared_euclidean",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op (losses [B, M], predictions [B, M], prototypes [B, C, D], softmax
    [B, M, C]), on its eager fast path where one applies (fastmeta/ops/eager.py)."""
    args = (support, support_labels, queries, query_labels, num_classes, tau, distance)
    if eager_path(support, support_labels, queries, query_labels, tau):
        return _Eager.apply(*args)
    return prototypical_loss_op(*args)
