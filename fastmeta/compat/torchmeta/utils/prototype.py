"""torchmeta.utils.prototype on fastmeta's kernels: the same names, arguments and
numbers (gradients included).

get_num_samples(targets [B, S], num_classes, dtype=None)     -> counts [B, C]
get_prototypes(embeddings [B, S, D], targets [B, S], num_classes) -> [B, C, D]
prototypical_loss(prototypes [B, C, D], embeddings [B, M, D], targets [B, M],
                  **kwargs)                                   -> F.cross_entropy's result

As torchmeta has them:
* get_prototypes: each class's sum of its support embeddings divided by its count
  clamped to >= 1, so a class absent from the support set gets a zero prototype
  (torch ops: scatter_add and a division, as torchmeta computes it; float32 results
  equal torchmeta's bit for bit on the CPU).
* prototypical_loss: F.cross_entropy(-d, targets, **kwargs) with d [B, C, M] the
  squared distances, so every keyword of F.cross_entropy works (weight, ignore_index,
  reduction, label_smoothing), and targets may be class probabilities [B, C, M].
  The distances come from fastmeta's fused squared_distances, without the [B, C, M, D]
  tensor torchmeta's expand-subtract builds; with integer targets and no keyword but
  reduction and ignore_index, the whole loss is fastmeta's fused prototypical
  cross-entropy (ignored targets masked out, the mean over the others, as
  F.cross_entropy takes it). Equal to torchmeta's to rounding (fastmeta computes
  the distances as ||q||^2 + ||c||^2 - 2 q . c, in one GEMM).

What differs from torchmeta: bad input raises a ValueError or TypeError naming the
argument and its shape where torchmeta raises torch's index or shape errors (or, on
CUDA, a device-side assert): a target outside [0, num_classes) other than
ignore_index, embeddings that are not [B, N, D], targets of the wrong shape, tensors
on different devices, num_classes < 1. Label values are checked as fastmeta checks
them (fastmeta.validation: on CUDA without a sync, raised after the call; off with
fastmeta.set_validate_args(False)). Integer targets of any integer dtype are taken
(torchmeta needs int64); prototypes and embeddings of different float dtypes are
promoted to a common one, as torchmeta's subtraction does.
"""

import operator

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastmeta.functional import _class_means
from fastmeta.ops._checks import (
    check_episode_pair,
    check_floating,
    check_labels,
    check_num_classes,
    check_tensor,
    shape_str,
)
from fastmeta.ops._scalars import scalar_tensor
from fastmeta.ops.prototypical_cross_entropy import (
    prototypical_cross_entropy as fused_prototypical_cross_entropy,
)
from fastmeta.ops.squared_distances import squared_distances as fused_squared_distances
from fastmeta.validation import Labels, check_label_values

__all__ = ["get_num_samples", "get_prototypes", "prototypical_loss"]

_NAME = "fastmeta.compat.torchmeta"
_FUSED_KWARGS = frozenset({"reduction", "ignore_index"})  # the fused loss implements these
_REDUCTIONS = ("mean", "sum", "none")


def _num_classes(op: str, num_classes) -> int:
    """A positive int; anything with __index__ (a NumPy integer) is taken as one."""
    if not isinstance(num_classes, (bool, int)) and hasattr(num_classes, "__index__"):
        num_classes = operator.index(num_classes)
    return check_num_classes(op, num_classes)


def _check_episodes(op: str, name: str, x: Tensor) -> None:
    check_tensor(op, name, x)
    check_floating(op, name, x)
    if x.dim() != 3:
        raise ValueError(
            f"{op}: {name} must be [B, N, D] (batch_size, num_examples, embedding_size), "
            f"got shape {shape_str(x)}"
        )


def _check_targets(op: str, targets: Tensor, shape: tuple, like: Tensor, like_name: str):
    check_labels(op, "targets", targets, shape)
    if targets.device != like.device:
        raise ValueError(
            f"{op}: targets is on {targets.device} but {like_name} is on {like.device}"
        )


def get_num_samples(targets: Tensor, num_classes: int, dtype: torch.dtype | None = None) -> Tensor:
    """The number of examples of each class: targets [B, S] -> [B, num_classes], of
    `dtype` (default: targets'). Not differentiable (torchmeta counts under no_grad)."""
    op = f"{_NAME}.get_num_samples"
    check_tensor(op, "targets", targets)
    if targets.dim() != 2:
        raise ValueError(f"{op}: targets must be [B, S], got shape {shape_str(targets)}")
    num_classes = _num_classes(op, num_classes)
    check_labels(op, "targets", targets, tuple(targets.shape))
    labels = targets.long()
    check_label_values(op, Labels("targets", labels, num_classes))
    with torch.no_grad():
        ones = torch.ones_like(targets, dtype=dtype)
        counts = ones.new_zeros(targets.shape[0], num_classes)
        return counts.scatter_add_(1, labels, ones)


def get_prototypes(embeddings: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """The prototype (mean embedding) of each class of each task: embeddings
    [B, S, D], targets [B, S] -> [B, num_classes, D]; a class with no example in
    targets gets a zero prototype."""
    op = f"{_NAME}.get_prototypes"
    _check_episodes(op, "embeddings", embeddings)
    num_classes = _num_classes(op, num_classes)
    _check_targets(op, targets, tuple(embeddings.shape[:2]), embeddings, "embeddings")
    labels = targets.long()
    check_label_values(op, Labels("targets", labels, num_classes))
    return _class_means(embeddings, labels, num_classes)


def prototypical_loss(prototypes: Tensor, embeddings: Tensor, targets: Tensor, **kwargs) -> Tensor:
    """The cross-entropy of the logits -||embedding - prototype||^2: prototypes
    [B, C, D], embeddings [B, M, D] (the queries), targets [B, M] class indices (or
    [B, C, M] class probabilities); kwargs go to F.cross_entropy (default: the mean
    over all B * M queries)."""
    op = f"{_NAME}.prototypical_loss"
    for name, x in (("prototypes", prototypes), ("embeddings", embeddings)):
        _check_episodes(op, name, x)
    check_episode_pair(op, "prototypes", prototypes, "embeddings", embeddings)
    if prototypes.device != embeddings.device:
        raise ValueError(
            f"{op}: embeddings is on {embeddings.device} but prototypes is on {prototypes.device}"
        )
    B, C = prototypes.shape[:2]
    M = embeddings.shape[1]
    if C == 0:
        raise ValueError(f"{op}: prototypes {shape_str(prototypes)} holds no class (C = 0)")
    if prototypes.dtype != embeddings.dtype:
        dtype = torch.promote_types(prototypes.dtype, embeddings.dtype)
        prototypes, embeddings = prototypes.to(dtype), embeddings.to(dtype)
    check_tensor(op, "targets", targets)
    if targets.is_floating_point():  # class probabilities, laid out like the logits
        if tuple(targets.shape) != (B, C, M):
            raise ValueError(
                f"{op}: class-probability targets must be [B, C, M] = [{B}, {C}, {M}] "
                f"(prototypes {shape_str(prototypes)}, embeddings {shape_str(embeddings)}), "
                f"got {shape_str(targets)}"
            )
    else:
        _check_targets(op, targets, (B, M), embeddings, "embeddings")
        targets = targets.long()
        ignore_index = kwargs.get("ignore_index", -100)
        if isinstance(ignore_index, int):
            ignored = targets == ignore_index
            labels = targets.masked_fill(ignored, 0)  # in [0, C) unless a target is bad
            check_label_values(op, Labels("targets", labels, C))
            if kwargs.keys() <= _FUSED_KWARGS and kwargs.get("reduction", "mean") in _REDUCTIONS:
                return _fused_loss(prototypes, embeddings, labels, ignored, kwargs)
    distances = fused_squared_distances(embeddings.contiguous(), prototypes.contiguous())
    return TF.cross_entropy(-distances.transpose(1, 2), targets, **kwargs)


def _fused_loss(prototypes, embeddings, labels, ignored, kwargs) -> Tensor:
    """F.cross_entropy's reductions of the fused per-query losses, the queries whose
    target is ignore_index (`ignored`; label 0 in `labels`) contributing 0 and left
    out of the mean's count."""
    tau = scalar_tensor(1.0, embeddings.dtype, embeddings.device)
    losses, _, _ = fused_prototypical_cross_entropy(embeddings, prototypes, labels, tau)
    losses = losses.masked_fill(ignored, 0)
    reduction = kwargs.get("reduction", "mean")
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (~ignored).sum()
