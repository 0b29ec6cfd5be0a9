"""learn2learn.algorithms.maml: MAML and maml_update (see fastmeta.compat.learn2learn)."""

import numbers

from torch import Tensor, nn

from fastmeta.maml import wrappers
from fastmeta.maml.module_tree import sgd_step

__all__ = ["MAML", "maml_update"]


class MAML(wrappers.MAML):
    """learn2learn's MAML(model, lr, first_order=False, allow_unused=None,
    allow_nograd=False), on fastmeta's MAML: clone() gives a fastmeta.maml.Learner
    (an nn.Module with `.module`, adapt(loss, first_order=None, allow_unused=None,
    allow_nograd=None) and clone()), whose inner step is fastmeta's fused
    inner_update. adapt_batch(support_x, support_y, loss_fn, steps=1) adapts T tasks
    at once (fastmeta's own addition)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
    ):
        super().__init__(model, lr, first_order, allow_unused, allow_nograd)


def _step_rate(lr) -> float | Tensor:
    """maml_update's lr: a finite number, or a one-element tensor (kept as a tensor,
    so a learnable one gets its gradient)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"maml_update: lr must be a number or a one-element floating tensor, "
                f"got a {lr.dtype} tensor of shape {list(lr.shape)}"
            )
        return lr.reshape(())
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"maml_update: lr must be a number, got {type(lr).__name__} {lr!r}")
    return float(lr)


def _gradients(op: str, model: nn.Module, grads) -> tuple[list[Tensor], list]:
    """The model's parameters and one gradient (or None) for each: `grads` as given,
    or the parameters' .grad."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be an nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    grads = [p.grad for p in params] if grads is None else list(grads)
    if len(grads) != len(params):
        raise ValueError(
            f"{op}: grads holds {len(grads)} tensors, the model has {len(params)} "
            f"parameters (one gradient, or None, per parameter)"
        )
    return params, grads


def maml_update(model: nn.Module, lr, grads=None) -> nn.Module:
    """p <- p - lr * g for each parameter p of `model` with a gradient g (grads: one
    per parameter, in model.parameters()' order, None for none; default: the
    parameters' .grad), differentiably, on fastmeta's fused inner_update. The module
    is updated in place (its dicts, not its tensors) and returned."""
    params, grads = _gradients("maml_update", model, grads)
    return sgd_step(model, params, grads, _step_rate(lr))
