"""A module's tensors swapped for others without touching the module itself: what a
MAML clone is made of (fastmeta.maml.Learner, fastmeta.compat.learn2learn).

copy_module(module, fn)        a copy of the module tree (each submodule a shallow copy,
                               of the same class) whose parameters are fn(p), and whose
                               buffers that require grad are fn(b); the other buffers,
                               the hooks and every other attribute are the original's.
replace_tensors(module, new)   puts new tensors in place of old ones, wherever in the
                               tree they stand (a tensor two submodules share is replaced
                               in both); the module's dicts change, never a tensor.
sgd_step(module, params, grads, rates)
                               p <- p - rate * grad for each p with a gradient, on
                               fastmeta's fused inner_update (one call per dtype and
                               device), differentiable to any order in p, grad and rate.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastmeta.ops.inner_update import inner_update

Rates = float | Tensor | Sequence[Tensor] | nn.ParameterList


def _refresh(module: nn.Module) -> None:
    """RNNs keep their own list of weight tensors: rebuild it from the parameters."""
    init_flat_weights = getattr(module, "_init_flat_weights", None)
    if isinstance(module, nn.RNNBase) and callable(init_flat_weights):
        init_flat_weights()


def copy_module(
    module: nn.Module, fn: Callable[[Tensor], Tensor], memo: dict | None = None
) -> nn.Module:
    """The module tree again, its parameters (and buffers that require grad) mapped by
    fn; a tensor or submodule used in several places is copied once (memo: id of the
    original -> (original, copy), kept so that the ids stay valid)."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)][1]

    def convert(t: Tensor) -> Tensor:
        if id(t) not in memo:
            memo[id(t)] = (t, fn(t))
        return memo[id(t)][1]

    copy = module.__new__(type(module))
    memo[id(module)] = (module, copy)
    copy.__dict__ = module.__dict__.copy()
    copy._parameters = {k: None if p is None else convert(p) for k, p in module._parameters.items()}
    copy._buffers = {
        k: convert(b) if b is not None and b.requires_grad else b
        for k, b in module._buffers.items()
    }
    copy._modules = {
        k: None if m is None else copy_module(m, fn, memo) for k, m in module._modules.items()
    }
    _refresh(copy)
    return copy


def replace_tensors(module: nn.Module, new: dict[int, tuple[Tensor, Tensor]]) -> nn.Module:
    """Every parameter or buffer p of the tree with id(p) in `new` becomes new[id(p)][1]."""
    for m in module.modules():
        for tensors in (m._parameters, m._buffers):
            for key, t in tensors.items():
                if t is not None and id(t) in new:
                    tensors[key] = new[id(t)][1]
        _refresh(m)
    return module


def _flat_rate(rate: Tensor, p: Tensor) -> Tensor:
    """A rate broadcastable to p's shape as a flat [numel] tensor in p's dtype (its
    gradient is summed back to its own shape)."""
    return rate.to(p.dtype).expand(p.shape).reshape(-1)


def sgd_step(
    module: nn.Module, params: Sequence[Tensor], grads: Sequence[Tensor | None], rates: Rates
) -> nn.Module:
    """Replaces each parameter p of `params` that has a gradient by p - rate * grad, in
    the module tree. rates: one number or 0-d tensor for all (MAML), or one tensor per
    parameter, broadcastable to its shape (Meta-SGD). Returns the module."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is not None:
            groups.setdefault((p.dtype, p.device), []).append(i)
    new = {}
    for indices in groups.values():
        ps = [params[i] for i in indices]
        theta = torch.cat([p.reshape(-1) for p in ps])
        g = torch.cat([grads[i].reshape(-1) for i in indices]).unsqueeze(0)  # type: ignore[union-attr]
        alpha: Tensor | float
        if isinstance(rates, Tensor):
            alpha = rates.to(theta.dtype)
        elif isinstance(rates, (int, float)):
            alpha = rates
        else:
            alpha = torch.cat([_flat_rate(rates[i], params[i]) for i in indices])
        updated = inner_update(theta, alpha, g)[0].split([p.numel() for p in ps])
        new.update({id(p): (p, u.view(p.shape)) for p, u in zip(ps, updated)})
    return replace_tensors(module, new)
