"""Argument checks that give users errors naming the argument and its shape."""

import functools
import inspect
import math
from typing import Callable

import torch


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype} "
            f"(shape {shape_str(t)})"
        )


def check_same_dtype_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor):
    """Every tensor in `others` must have ref's dtype and device."""
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_labels(op: str, name: str, labels: torch.Tensor, shape: tuple):
    """labels: an integer tensor of `shape` (host-side; the values, which must lie in
    [0, num_classes), are checked by fastmeta.validation.check_label_values)."""
    check_tensor(op, name, labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"{op}: {name} must be an integer tensor of class indices, got dtype "
            f"{labels.dtype} (shape {shape_str(labels)})"
        )
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(
            f"{op}: {name} must have shape [{', '.join(map(str, shape))}], got {shape_str(labels)}"
        )


def check_num_classes(op: str, num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{op}: num_classes must be a positive int, got {num_classes!r}")
    if num_classes > torch.iinfo(torch.int64).max:
        raise ValueError(f"{op}: num_classes must fit in int64, got {num_classes}")
    return num_classes


def check_eps(op: str, eps) -> float:
    """A batch-norm epsilon: a finite number >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_episode_pair(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor):
    """Two floating [B, N, D] tensors of the same episodes: equal B and D."""
    for name, x in ((name_a, a), (name_b, b)):
        check_tensor(op, name, x)
        check_floating(op, name, x)
        if x.dim() != 3:
            raise ValueError(
                f"{op}: {name} must be [B, N, D] (or [N, D] unbatched), got shape {shape_str(x)}"
            )
    for dim, what in ((0, "numbers of episodes B"), (2, "embedding sizes D")):
        if a.shape[dim] != b.shape[dim]:
            raise ValueError(
                f"{op}: {name_a} {shape_str(a)} and {name_b} {shape_str(b)} have different {what}"
            )


def on_one_device(op) -> Callable:
    """Decorates the fake kernel of custom op `op`: raises unless its tensor arguments
    share one device. torch dispatches a call with one meta argument among real ones to
    the fake kernel, which would return uninitialized memory as the result; plain torch
    ops raise there, and so does this."""
    name = op._qualname.replace("::", ".")

    def decorate(fake: Callable) -> Callable:
        parameters = list(inspect.signature(fake).parameters)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            out = fake(*args, **kwargs)  # its own checks first: their errors are sharper
            tensors = [(p, a) for p, a in zip(parameters, args) if isinstance(a, torch.Tensor)]
            if len({t.device for _, t in tensors}) > 1:
                where = ", ".join(f"{p} on {t.device}" for p, t in tensors)
                raise ValueError(f"{name}: the tensor arguments must share a device, got {where}")
            return out

        return checked

    return decorate
