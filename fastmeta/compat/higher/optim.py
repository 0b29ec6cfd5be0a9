"""higher.optim (see fastmeta.compat.higher): differentiable versions of torch
optimizers and the functions that make them.

get_diff_optim(opt, reference_params, fmodel=None, device=None, override=None,
               track_higher_grads=True, grad_callback=None)   from an existing optimizer
create_diff_optim(opt_type, opt_kwargs=None, params=None, fmodel=None, ...)   a new one
register_optim(optim_type, diff_optim_type)     a differentiable version of your own
get_trainable_opt_params(opt, device=None)      an override dict of learnable tensors
apply_trainable_opt_params(opt, override)       writes learned values back into opt

Covered: torch.optim.SGD, Adam and AdamW (DifferentiableSGD, DifferentiableAdam,
DifferentiableAdamW; _rules.py), and any registered DifferentiableOptimizer subclass.
"""

import torch
from torch import Tensor

from fastmeta.compat.higher._optimizer import DifferentiableOptimizer
from fastmeta.compat.higher._rules import (
    DifferentiableAdam,
    DifferentiableAdamW,
    DifferentiableSGD,
)
from fastmeta.compat.higher.utils import flatten

__all__ = [
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableOptimizer",
    "DifferentiableSGD",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
]

_opt_mapping: dict[type, type[DifferentiableOptimizer]] = {
    torch.optim.SGD: DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
}


def _diff_type(opt_type, caller: str) -> type[DifferentiableOptimizer]:
    found = _opt_mapping.get(opt_type)
    if found is None:
        have = ", ".join(t.__name__ for t in _opt_mapping)
        raise ValueError(
            f"{caller}: no differentiable version of {getattr(opt_type, '__name__', opt_type)}: "
            f"fastmeta.compat.higher has {have} (higher's Adadelta, Adagrad, Adamax, ASGD, "
            f"RMSprop and Rprop are not covered); add one with register_optim"
        )
    return found


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params,
    fmodel=None,
    device=None,
    override: dict | None = None,
    track_higher_grads: bool = True,
    **kwargs,
) -> DifferentiableOptimizer:
    """A differentiable copy of `opt` (its hyperparameters, groups and state now)
    stepping fast weights that correspond to reference_params (the parameters of
    the model opt tracks, as model.parameters() gives them). fmodel: the patched
    model whose fast weights step() updates. kwargs: grad_callback."""
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"get_diff_optim: opt must be a torch.optim.Optimizer, got {opt!r}")
    return _diff_type(type(opt), "get_diff_optim")(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def _zeros_like_groups(params) -> tuple[list, list[Tensor]]:
    """Stand-in leaves shaped like params (tensors, or group dicts of them), for
    building a torch optimizer: (what to give it, the leaves in order)."""
    params = list(params)
    if not params or not isinstance(params[0], dict):
        leaves = [torch.zeros_like(p, requires_grad=True) for p in params]
        return leaves, leaves
    groups, leaves = [], []
    for group in params:
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        zeros = [torch.zeros_like(p, requires_grad=True) for p in tensors]
        groups.append({**group, "params": zeros})
        leaves += zeros
    return groups, leaves


def create_diff_optim(
    opt_type: type,
    opt_kwargs: dict | None = None,
    params=None,
    fmodel=None,
    device=None,
    override: dict | None = None,
    track_higher_grads: bool = True,
    **kwargs,
) -> DifferentiableOptimizer:
    """A differentiable optimizer of type opt_type (torch.optim.SGD, ...) made from
    scratch with opt_kwargs, for fast weights shaped like `params` (tensors or
    parameter-group dicts) or like fmodel's; step() then takes params=[...] of those
    shapes, or updates fmodel."""
    diff_type = _diff_type(opt_type, "create_diff_optim")
    if params is None:
        if fmodel is None:
            raise ValueError("create_diff_optim: give params (the fast weights' shapes) or fmodel")
        params = fmodel.parameters()
    given, reference = _zeros_like_groups(params)
    opt = opt_type(given, **(opt_kwargs or {}))
    return diff_type(
        opt,
        reference,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def register_optim(optim_type: type, diff_optim_type: type) -> None:
    """Makes get_diff_optim / innerloop_ctx use diff_optim_type (a
    DifferentiableOptimizer subclass implementing _update) for optim_type."""
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(
            f"register_optim: optim_type must be an Optimizer class, got {optim_type!r}"
        )
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            f"register_optim: diff_optim_type must be a DifferentiableOptimizer subclass, "
            f"got {diff_optim_type!r}"
        )
    _opt_mapping[optim_type] = diff_optim_type


def _map(value, fn):
    """value with fn applied to every leaf of its lists and tuples."""
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return fn(value)


def _learnable(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) or (
        isinstance(x, Tensor) and x.is_floating_point()
    )


def get_trainable_opt_params(opt: torch.optim.Optimizer, device=None) -> dict[str, list]:
    """An override dict {hyperparameter: [one value per group]} holding each numeric
    hyperparameter of opt's groups (lr, momentum, betas, ...) as a float tensor that
    requires grad, on `device`; flags (bools) and None-valued entries are left out."""
    override: dict[str, list] = {}

    def learnable(x) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().to(x.device if device is None else device, copy=True).requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    for group in opt.param_groups:
        for key, value in group.items():
            leaves = flatten(value)
            if key != "params" and leaves and all(_learnable(x) for x in leaves):
                override.setdefault(key, []).append(_map(value, learnable))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: dict) -> None:
    """Writes override's values (get_trainable_opt_params' dict, trained) into opt's
    groups: numbers as floats, tensors copied into the group's tensors."""
    groups = opt.param_groups
    for key, values in override.items():
        if len(values) not in (1, len(groups)):
            raise ValueError(
                f"apply_trainable_opt_params: override[{key!r}] holds {len(values)} values; "
                f"give 1 or {len(groups)} (one per parameter group)"
            )
        for g, group in enumerate(groups):
            group[key] = _written(values[0] if len(values) == 1 else values[g], group[key], key)


def _written(new, old, key: str):
    if isinstance(old, Tensor):
        with torch.no_grad():
            return old.copy_(new)
    if isinstance(old, (list, tuple)) and len(old) == len(new):
        return type(old)(_written(n, o, key) for n, o in zip(new, old))
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        return new.item() if isinstance(new, Tensor) else float(new)
    raise ValueError(
        f"apply_trainable_opt_params: cannot write {new!r} into {key!r} = {old!r} of opt"
    )
