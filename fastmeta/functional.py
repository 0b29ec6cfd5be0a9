"""Functional API. Episodes are batched [B, ...]; 2-D (unbatched) input works too.

class_prototypes(support [B,S,D], labels [B,S], num_classes,
                 empty_classes="error")                             -> [B, C, D]
squared_distances(queries [B,M,D], prototypes [B,C,D])              -> [B, M, C]
cosine_similarities(queries [B,M,D], prototypes [B,C,D], eps=1e-8)  -> [B, M, C]
prototypical_loss(support, support_labels, queries, query_labels,
                  num_classes, tau=1.0, reduction="mean",
                  empty_classes="error", distance="squared_euclidean")
                                                                    -> (loss, accuracy)
prototypical_cross_entropy(prototypes, queries, query_labels, tau=1.0,
                           reduction="mean", distance="squared_euclidean")
                                                                    -> loss
    distance (DISTANCES), logits z = tau f with tau the scale (a learnable 0-d tensor
    gets its gradient):
      "squared_euclidean"  f = -||q - c||^2  (ProtoNets as fastmeta has always had it)
      "euclidean"          f = -||q - c||    (the seed's distance; the subgradient 0 at
                                              q = c, as torch.cdist)
      "cosine"             f = q . c / (max(||q||, 1e-8) max(||c||, 1e-8))  (a zero
                                              row gives 0)
get_prototypes = class_prototypes (torchmeta's name and argument order; torchmeta's
                 zero prototype for an absent class: empty_classes="zero", or
                 fastmeta.compat.torchmeta for torchmeta's functions as they are)
inner_update(theta [P], alpha, g [T,P])                             -> [T, P]
"""

from torch import Tensor

from fastmeta.ops._checks import (
    check_floating,
    check_labels,
    check_num_classes,
    check_tensor,
    shape_str,
)
from fastmeta.ops._opmath import opmath
from fastmeta.ops._scalars import scalar_tensor
from fastmeta.ops.class_prototypes import class_prototypes as fused_class_prototypes
from fastmeta.ops.class_prototypes import class_sums
from fastmeta.ops.cosine_similarities import cosine_similarities as fused_cosine_similarities
from fastmeta.ops.inner_update import inner_update
from fastmeta.ops.prototypical_cross_entropy import (
    DISTANCES,
    distance_code,
)
from fastmeta.ops.prototypical_cross_entropy import (
    prototypical_cross_entropy as fused_prototypical_cross_entropy,
)
from fastmeta.ops.prototypical_loss import prototypical_loss as fused_prototypical_loss
from fastmeta.ops.squared_distances import squared_distances as fused_squared_distances
from fastmeta.validation import Labels, check_label_values

REDUCTIONS = ("mean", "sum", "none")
EMPTY_CLASSES = ("error", "zero")


def _batched(op: str, name: str, x: Tensor, unbatched_dim: int) -> Tensor:
    check_tensor(op, name, x)
    return x.unsqueeze(0) if x.dim() == unbatched_dim else x


def class_prototypes(
    support: Tensor, labels: Tensor, num_classes: int, empty_classes: str = "error"
) -> Tensor:
    """Per-class mean of the support embeddings: [B, S, D], [B, S] -> [B, C, D]
    (or [S, D], [S] -> [C, D]). Labels in any order; shots may differ per class.
    A class with no support example raises a ValueError (empty_classes="error"), or
    gets a zero prototype (empty_classes="zero", torchmeta's get_prototypes: the sums
    divided by the counts clamped to >= 1; torch ops instead of the fused kernel)."""
    op = "fastmeta.class_prototypes"
    if _check_empty_classes(op, empty_classes) == "zero":
        return _class_prototypes_zero_empty(op, support, labels, num_classes)
    batched = _batched(op, "support", support, 2)
    out = fused_class_prototypes(batched, _batched(op, "labels", labels, 1), num_classes)
    return out if support.dim() == 3 else out[0]


def _check_empty_classes(op: str, empty_classes: str) -> str:
    if empty_classes not in EMPTY_CLASSES:
        raise ValueError(
            f"{op}: empty_classes must be one of {EMPTY_CLASSES}, got {empty_classes!r}"
        )
    return empty_classes


def _class_means(support: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """support [B, S, D], int64 labels [B, S] in [0, num_classes) -> [B, C, D]: the sum
    of each class's examples in support order (scatter_add) divided by its count
    clamped to >= 1, so a class with no example gets 0. Unchecked; computes in
    support's dtype; no host sync; torch ops, differentiable to any order."""
    sums, counts = class_sums(support, labels, num_classes)
    return sums / counts.clamp_min_(1)[..., None]


def _class_prototypes_zero_empty(op: str, support: Tensor, labels: Tensor, num_classes: int):
    """class_prototypes with empty_classes="zero": checks, then _class_means (float16 and
    bfloat16 computed in float32, as the fused op does)."""
    check_tensor(op, "support", support)
    check_floating(op, "support", support)
    if support.dim() not in (2, 3):
        raise ValueError(
            f"{op}: support must be [B, S, D] (or [S, D] unbatched), got shape {shape_str(support)}"
        )
    check_num_classes(op, num_classes)
    check_labels(op, "labels", labels, support.shape[:-1])
    if labels.device != support.device:
        raise ValueError(f"{op}: labels is on {labels.device} but support is on {support.device}")
    batched = support.dim() == 3
    x = support if batched else support[None]
    y = (labels if batched else labels[None]).long()
    check_label_values(op, Labels("labels", y, num_classes))
    (math,) = opmath(x)
    out = _class_means(math, y, num_classes).to(support.dtype)
    return out if batched else out[0]


get_prototypes = class_prototypes


def squared_distances(queries: Tensor, prototypes: Tensor) -> Tensor:
    """||q - c||^2 for every query and prototype: [B, M, D], [B, C, D] -> [B, M, C]
    (or 2-D -> [M, C]). Exactly 0 for identical points, never negative."""
    op = "fastmeta.squared_distances"
    out = fused_squared_distances(
        _batched(op, "queries", queries, 2), _batched(op, "prototypes", prototypes, 2)
    )
    return out if queries.dim() == 3 else out[0]


def cosine_similarities(queries: Tensor, prototypes: Tensor, eps: float = 1e-8) -> Tensor:
    """q . c / (max(||q||, eps) max(||c||, eps)) for every query and prototype:
    [B, M, D], [B, C, D] -> [B, M, C] (or 2-D -> [M, C]). A zero row gives 0."""
    op = "fastmeta.cosine_similarities"
    out = fused_cosine_similarities(
        _batched(op, "queries", queries, 2), _batched(op, "prototypes", prototypes, 2), float(eps)
    )
    return out if queries.dim() == 3 else out[0]


def _tau_tensor(tau, like: Tensor) -> Tensor:
    if isinstance(tau, Tensor):
        return tau.reshape(()) if tau.numel() == 1 else tau
    return scalar_tensor(tau, like.dtype, like.device)


def _reduce(losses: Tensor, reduction: str, batched: bool, op: str) -> Tensor:
    if reduction == "mean":
        if losses.numel() == 0:  # the mean of nothing: NaN in torch; an error here
            raise ValueError(
                f"{op}: reduction='mean' over no query (losses of shape "
                f"{list(losses.shape)}: B = 0 episodes or M = 0 queries)"
            )
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses if batched else losses[0]


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def prototypical_cross_entropy(
    prototypes: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    tau=1.0,
    reduction: str = "mean",
    distance: str = "squared_euclidean",
) -> Tensor:
    """Cross-entropy of logits tau f(q, c) (f: -||q - c||^2 by default, see `distance`
    in the module docstring), fused: prototypes [B, C, D], queries [B, M, D],
    query_labels [B, M] -> loss (reduction "mean", "sum" or "none" -> [B, M]). Same
    arguments as torchmeta's prototypical_loss."""
    op = "fastmeta.prototypical_cross_entropy"
    _check_reduction(op, reduction)
    distance_code(op, distance)
    batched = queries.dim() == 3
    q = _batched(op, "queries", queries, 2)
    losses, _, _ = fused_prototypical_cross_entropy(
        q,
        _batched(op, "prototypes", prototypes, 2),
        _batched(op, "query_labels", query_labels, 1),
        _tau_tensor(tau, q),
        distance,
    )
    return _reduce(losses, reduction, batched, op)


def prototypical_loss(
    support: Tensor,
    support_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    tau=1.0,
    reduction: str = "mean",
    empty_classes: str = "error",
    distance: str = "squared_euclidean",
) -> tuple[Tensor, Tensor]:
    """ProtoNet loss of whole episodes, fused: prototypes, distances, log-softmax,
    cross-entropy. support [B, S, D], support_labels [B, S], queries [B, M, D],
    query_labels [B, M] (or all unbatched) -> (loss, accuracy). tau may be a
    learnable 0-d tensor (it gets its gradient). Differentiable twice.
    empty_classes="zero" gives a class with no support example a zero prototype
    instead of the ValueError (class_prototypes; then the fused cross-entropy).
    distance: "squared_euclidean" (logits -tau ||q - c||^2), "euclidean"
    (-tau ||q - c||) or "cosine" (tau cos(q, c)); see the module docstring."""
    op = "fastmeta.prototypical_loss"
    _check_reduction(op, reduction)
    distance_code(op, distance)
    if _check_empty_classes(op, empty_classes) == "zero":
        prototypes = _class_prototypes_zero_empty(op, support, support_labels, num_classes)
        return _cross_entropy_and_accuracy(
            op, prototypes, queries, query_labels, tau, reduction, distance
        )
    check_num_classes(op, num_classes)
    batched = support.dim() == 3
    q = _batched(op, "queries", queries, 2)
    y_query = _batched(op, "query_labels", query_labels, 1)
    losses, predictions, _, _ = fused_prototypical_loss(
        _batched(op, "support", support, 2),
        _batched(op, "support_labels", support_labels, 1),
        q,
        y_query,
        num_classes,
        _tau_tensor(tau, q),
        distance,
    )
    accuracy = predictions.eq(y_query).mean(dtype=q.dtype)
    return _reduce(losses, reduction, batched, op), accuracy


def _cross_entropy_and_accuracy(op, prototypes, queries, query_labels, tau, reduction, distance):
    batched = queries.dim() == 3
    q = _batched(op, "queries", queries, 2)
    y_query = _batched(op, "query_labels", query_labels, 1)
    losses, predictions, _ = fused_prototypical_cross_entropy(
        q, _batched(op, "prototypes", prototypes, 2), y_query, _tau_tensor(tau, q), distance
    )
    accuracy = predictions.eq(y_query).mean(dtype=q.dtype)
    return _reduce(losses, reduction, batched, op), accuracy


__all__ = [
    "DISTANCES",
    "class_prototypes",
    "cosine_similarities",
    "get_prototypes",
    "inner_update",
    "prototypical_cross_entropy",
    "prototypical_loss",
    "squared_distances",
]
