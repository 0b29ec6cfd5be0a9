"""DifferentiableOptimizer, higher's differentiable-optimizer protocol (see
fastmeta.compat.higher): a torch optimizer's hyperparameters and state, stepping
fast weights out of place so that the steps stay on the autograd tape."""

import copy
from collections import defaultdict

import torch
from torch import Tensor

__all__ = ["DifferentiableOptimizer"]


def _state_copy(value, device):
    """A torch optimizer's per-parameter state entry, copied (tensors detached)."""
    if isinstance(value, Tensor):
        return value.detach().to(value.device if device is None else device, copy=True)
    return copy.deepcopy(value)


class DifferentiableOptimizer:
    """Steps a list of fast weights (one per reference parameter) with the rule of
    the torch optimizer `other`, whose hyperparameters and state it copies at
    creation.

    param_groups: other's groups, copied, with `override` applied; during a step,
        group['params'][i] is the current fast weight of the group's i-th parameter.
    state: state[g][i], a dict for group g's i-th parameter (momentum buffers,
        Adam's moments), starting as copies of other's state.
    Subclasses implement _update(grouped_grads): for every group g and parameter i
    whose gradient grouped_grads[g][i] is not None, write the new fast weight into
    group['params'][i] (a tensor on the tape; do not modify tensors in place).
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params,
        fmodel=None,
        device=None,
        override: dict | None = None,
        grad_callback=None,
        track_higher_grads: bool = True,
    ):
        name = type(self).__name__
        if not isinstance(other, torch.optim.Optimizer):
            raise TypeError(f"{name}: opt must be a torch.optim.Optimizer, got {other!r}")
        if not isinstance(track_higher_grads, bool):
            raise TypeError(
                f"{name}: track_higher_grads must be a bool, got {track_higher_grads!r}"
            )
        reference = list(reference_params)
        position = {id(p): i for i, p in enumerate(reference)}
        self.param_groups: list[dict] = []
        self.state: list[defaultdict] = []
        self._indices: list[list[int]] = []  # group g's i-th parameter: reference_params[...]
        for g, group in enumerate(other.param_groups):
            indices = []
            for i, p in enumerate(group["params"]):
                if id(p) not in position:
                    raise ValueError(
                        f"{name}: opt.param_groups[{g}]['params'][{i}] (shape {list(p.shape)}) "
                        f"is not one of reference_params (the model's parameters)"
                    )
                indices.append(position[id(p)])
            self._indices.append(indices)
            hyper = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            self.param_groups.append({**hyper, "params": [None] * len(indices)})
            states = {
                i: {k: _state_copy(v, device) for k, v in other.state[p].items()}
                for i, p in enumerate(group["params"])
                if p in other.state
            }
            self.state.append(defaultdict(dict, states))
        self._num_params = len(reference)
        self._fmodel = fmodel
        self._grad_callback = grad_callback
        self._track_higher_grads = track_higher_grads
        if override is not None:
            self._apply_override(override)

    def _apply_override(self, override: dict) -> None:
        """override[key]: one value for every group, or one per group (a list, a
        tuple or a 1-D tensor); values may be tensors that require grad."""
        if not isinstance(override, dict):
            raise TypeError(
                f"override must be a dict {{hyperparameter: [values]}}, got {override!r}"
            )
        groups = self.param_groups
        for key, values in override.items():
            if key == "params" or any(key not in group for group in groups):
                known = [k for k in groups[0] if k != "params"]
                raise ValueError(
                    f"override: {key!r} is not a hyperparameter of opt, which has {known}"
                )
            if isinstance(values, Tensor) and values.dim() == 1:
                values = values.unbind(0)
            if not isinstance(values, (list, tuple)):
                raise TypeError(
                    f"override[{key!r}] must be a list of values (one, or one per parameter "
                    f"group), got {type(values).__name__} {values!r}"
                )
            if len(values) not in (1, len(groups)):
                raise ValueError(
                    f"override[{key!r}] holds {len(values)} values; give 1 (for every group) "
                    f"or {len(groups)} (one per parameter group)"
                )
            for g, group in enumerate(groups):
                group[key] = values[0] if len(values) == 1 else values[g]

    def step(self, loss: Tensor, params=None, override: dict | None = None, grad_callback=None):
        """One step on loss (a one-element tensor): differentiates it with respect to
        the fast weights (fmodel's latest, or `params`: one tensor per reference
        parameter), applies grad_callback(grads) (default: the one given at
        creation) and the optimizer's rule. Returns the new fast weights, a list
        like params, and makes them fmodel's latest. override as at creation; it
        stays in force for later steps."""
        if override is not None:
            self._apply_override(override)
        params = self._current_params(params)
        grads = self._gradients(loss, params)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = self._checked_grads(callback(grads))
        grouped = []
        for group, indices in zip(self.param_groups, self._indices):
            group["params"] = [params[i] for i in indices]
            grouped.append([grads[i] for i in indices])
        with torch.set_grad_enabled(self._track_higher_grads and torch.is_grad_enabled()):
            self._update(grouped)
        new = list(params)
        for group, indices in zip(self.param_groups, self._indices):
            for i, p in zip(indices, group["params"]):
                new[i] = (
                    p
                    if self._track_higher_grads
                    else p.detach().requires_grad_(params[i].requires_grad)
                )
        if self._fmodel is not None:
            self._fmodel.update_params(new)
        return new

    def _update(self, grouped_grads: list[list[Tensor | None]]) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no update rule (_update)")

    def _current_params(self, params) -> list[Tensor]:
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "step: pass params=[...]: this optimizer has no patched model (fmodel) "
                    "holding fast weights"
                )
            params = self._fmodel.fast_params
        params = list(params)
        if len(params) != self._num_params:
            raise ValueError(
                f"step: params must hold {self._num_params} tensors (one per reference "
                f"parameter), got {len(params)}"
            )
        return params

    def _gradients(self, loss: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"step: loss must be a one-element tensor, got {shape}")
        wanted = [i for i, p in enumerate(params) if p.requires_grad]
        found: tuple = ()
        if loss.requires_grad and wanted:
            found = torch.autograd.grad(
                loss,
                [params[i] for i in wanted],
                create_graph=self._track_higher_grads,
                allow_unused=True,
            )
        if all(g is None for g in found):
            raise ValueError(
                "step: loss does not depend on any fast weight that requires grad: compute "
                "it with the patched model (fmodel), or pass the params it was computed with"
            )
        grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(wanted, found):
            grads[i] = g
        return grads

    def _checked_grads(self, grads) -> list[Tensor | None]:
        grads = list(grads)
        if len(grads) != self._num_params or any(
            g is not None and not isinstance(g, Tensor) for g in grads
        ):
            raise ValueError(
                f"grad_callback must return {self._num_params} gradients (tensors or None, "
                f"one per parameter), got {[type(g).__name__ for g in grads]}"
            )
        return grads
