"""higher.utils' public helpers (see fastmeta.compat.higher): flatten and
get_func_params, and copy_tensor, the leaf copy both the patched modules and the
differentiable optimizers' state use."""

import torch
from torch import Tensor, nn

__all__ = ["flatten", "get_func_params"]


def copy_tensor(t: Tensor, safe_copy: bool = True, device=None) -> Tensor:
    """A leaf tensor with t's values on `device` (default: t's), requiring grad as t
    does: a fresh copy (safe_copy=True) or a detached alias of t's storage (False,
    on t's own device only). No gradient flows from it back to t."""
    target = t.device if device is None else torch.device(device)
    return t.detach().to(target, copy=safe_copy).requires_grad_(t.requires_grad)


def flatten(x) -> list:
    """The leaves of a nested structure, in order: dicts contribute their values,
    lists, tuples and sets their items; anything else (a tensor, a number, a string)
    is a leaf. flatten({"a": [1, (2, 3)], "b": 4}) == [1, 2, 3, 4]."""
    if isinstance(x, dict):
        x = x.values()
    elif not isinstance(x, (list, tuple, set)):
        return [x]
    return [leaf for item in x for leaf in flatten(item)]


def get_func_params(module: nn.Module, device=None, safe_copy: bool = True) -> list[Tensor]:
    """Leaf copies of module.parameters() (in that order, each once), detached from
    the module and requiring grad where the parameter does (see copy_tensor)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"get_func_params: module must be a torch.nn.Module, got {module!r}")
    return [copy_tensor(p, safe_copy, device) for p in module.parameters()]
