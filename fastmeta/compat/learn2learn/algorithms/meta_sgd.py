"""learn2learn.algorithms.meta_sgd: MetaSGD and meta_sgd_update (see
fastmeta.compat.learn2learn)."""

from torch import Tensor, nn

from fastmeta.compat.learn2learn.algorithms.maml import _gradients
from fastmeta.maml import wrappers
from fastmeta.maml.module_tree import sgd_step

__all__ = ["MetaSGD", "meta_sgd_update"]


def _check_rates(op: str, lrs, model: nn.Module) -> None:
    """lrs: a list (or ParameterList) of floating tensors, one per parameter of the
    model, each broadcastable to its parameter's shape."""
    named = list(model.named_parameters())
    if isinstance(lrs, Tensor) or not isinstance(lrs, (list, tuple, nn.ParameterList)):
        raise TypeError(
            f"{op}: lrs must be a list of tensors, one per model parameter, "
            f"got {type(lrs).__name__}"
        )
    if len(lrs) != len(named):
        raise ValueError(
            f"{op}: lrs holds {len(lrs)} rates, the model has {len(named)} parameters "
            f"({[n for n, _ in named]})"
        )
    for i, (lr, (name, p)) in enumerate(zip(lrs, named)):
        if not isinstance(lr, Tensor) or not lr.is_floating_point():
            got = f"a {lr.dtype} tensor" if isinstance(lr, Tensor) else type(lr).__name__
            raise TypeError(f"{op}: lrs[{i}] must be a floating-point tensor, got {got}")
        if lr.dim() > p.dim() or any(
            a not in (1, b) for a, b in zip(lr.shape[::-1], p.shape[::-1])
        ):
            raise ValueError(
                f"{op}: lrs[{i}] has shape {list(lr.shape)}, which does not broadcast to "
                f"parameter {name!r} of shape {list(p.shape)}"
            )


class MetaSGD(wrappers.MetaSGD):
    """learn2learn's MetaSGD(model, lr=1.0, first_order=False, lrs=None), on
    fastmeta's MetaSGD: a learnable rate per element of every model parameter,
    initialised to lr, in `lrs` (or the given lrs: one tensor per parameter,
    broadcastable to its shape, kept as given: a ParameterList is registered, a plain
    list is not, as in learn2learn). clone() and adapt() as for MAML; the rates get
    meta-gradients, first order too."""

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None):
        # fastmeta's MetaSGD makes rates for the adapted parameters only; learn2learn
        # makes one per parameter: set up the shared part, then the rates.
        wrappers._MetaLearner.__init__(self, model, first_order, None, False, 1, None, "auto", True)
        self.per_step = False
        self.rated = [name for name, _ in model.named_parameters()]
        if lrs is None:
            lrs = wrappers.initial_rates(model, self.rated, lr, ())
        else:
            _check_rates("MetaSGD", lrs, model)
        self.lrs = lrs


def meta_sgd_update(model: nn.Module, lrs=None, grads=None) -> nn.Module:
    """p <- p - lr * g for each parameter p of `model` with a gradient g, lr its rate
    (lrs: one tensor per parameter, broadcastable to it; grads: one per parameter, None
    for none, default the parameters' .grad), differentiably in p, lr and g, on
    fastmeta's fused inner_update. The module is updated in place and returned."""
    if lrs is None:
        raise ValueError("meta_sgd_update: lrs is required: one rate tensor per parameter")
    params, grads = _gradients("meta_sgd_update", model, grads)
    _check_rates("meta_sgd_update", lrs, model)
    return sgd_step(model, params, grads, list(lrs))
