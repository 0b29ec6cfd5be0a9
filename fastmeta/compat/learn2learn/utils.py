"""learn2learn.utils' module functions (see fastmeta.compat.learn2learn): a module
copied, updated or detached while staying differentiable, as learn2learn does it.

clone_module(module, memo=None)          a copy whose parameters (and buffers that
                                         require grad) are torch.clone()s of the
                                         original's: gradients flow back to them
update_module(module, updates=None, memo=None)
                                         p <- p + u for each parameter, in place in the
                                         module (its dicts), differentiably; returns it
detach_module(module, keep_requires_grad=False)
                                         cuts the module's tensors from their graph
clone_parameters(params), clone_named_parameters(named), magic_box(x), accuracy(preds, targets)

What differs from learn2learn: update_module checks that `updates` holds one tensor
(or None) per parameter and raises a ValueError naming both counts, where learn2learn
prints a warning and zips the shorter list, and a `module` that is not an nn.Module is
a TypeError (clone_module and detach_module return or ignore one, as learn2learn's
do). detach_module detaches a tensor in place (detach_()) as learn2learn does,
except one that is a view (an adapted parameter of a fastmeta clone: a slice of the
fused update's output), which torch cannot detach in place: that one is replaced in
the module by its detach(). The memo arguments are accepted for learn2learn's
signatures; fastmeta keeps its own.
"""

import torch
from torch import Tensor, nn

from fastmeta.maml.module_tree import copy_module, replace_tensors

__all__ = [
    "accuracy",
    "clone_module",
    "clone_named_parameters",
    "clone_parameters",
    "detach_module",
    "magic_box",
    "update_module",
]


def clone_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A copy of `module` whose parameters and buffers that require grad are
    torch.clone()s: back-propagating through the copy reaches the original's
    parameters. Submodules are shallow copies of the same classes; other buffers are
    shared, so batch norm's running statistics stay the original's."""
    if not isinstance(module, nn.Module):
        return module
    return copy_module(module, Tensor.clone, memo)


def update_module(module: nn.Module, updates=None, memo: dict | None = None) -> nn.Module:
    """Replaces each parameter p of `module` by p + u: updates is one tensor (or None,
    no change) per parameter, in module.parameters()' order; without it each
    parameter's (and buffer's) `.update` attribute is taken, then cleared. Returns
    the module, updated in place."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"update_module: module must be an nn.Module, got {type(module).__name__}")
    params = list(module.parameters())
    if updates is not None:
        updates = list(updates)
        if len(updates) != len(params):
            raise ValueError(
                f"update_module: updates holds {len(updates)} tensors, the module has "
                f"{len(params)} parameters (one update, or None, per parameter)"
            )
        for p, u in zip(params, updates):
            p.update = u
    new = {}
    for t in [*params, *module.buffers()]:
        u = getattr(t, "update", None)
        if u is not None and id(t) not in new:
            new[id(t)] = (t, t + u)
            t.update = None
    return replace_tensors(module, new)


def _detached(t: Tensor, keep_requires_grad: bool) -> Tensor:
    requires_grad = t.requires_grad
    if t._is_view():
        t = t.detach()
    else:
        t.detach_()
    if keep_requires_grad and requires_grad:
        t.requires_grad_()
    return t


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Detaches the parameters (and buffers that require grad) of `module` from their
    graph, in place: gradients of later losses stop at them. keep_requires_grad=True
    keeps requires_grad on those that had it (to fine-tune the detached copy)."""
    if not isinstance(module, nn.Module):
        return
    new = {}
    for t in [*module.parameters(), *(b for b in module.buffers() if b.requires_grad)]:
        if id(t) not in new:
            new[id(t)] = (t, _detached(t, keep_requires_grad))
    replace_tensors(module, new)


def clone_parameters(param_list) -> list[Tensor]:
    """[p.clone() for p in param_list]."""
    return [p.clone() for p in param_list]


def clone_named_parameters(param_dict) -> dict[str, Tensor]:
    """{name: p.clone()} for a dict of parameters."""
    return {k: p.clone() for k, p in param_dict.items()}


def magic_box(x):
    """DiCE's magic box: exp(x - x.detach()), 1 in value with x's gradient; a
    non-tensor is returned unchanged."""
    if isinstance(x, Tensor):
        return torch.exp(x - x.detach())
    return x


def accuracy(preds: Tensor, targets: Tensor) -> Tensor:
    """The fraction of rows of preds [N, C] whose argmax is the target [N]."""
    return (preds.argmax(dim=1).long() == targets.long()).sum().float() / preds.size(0)
