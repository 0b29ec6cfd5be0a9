"""DifferentiableSGD, DifferentiableAdam and DifferentiableAdamW: torch.optim.SGD's,
Adam's and AdamW's update rules (torch's own operation order), out of place and
differentiable to any order.

Each group's parameters that have a gradient are flattened into one [P] vector per
dtype and device (a "bucket"), so each rule is a few element-wise ops on [P]
vectors, and the parameter write p - lr * direction is fastmeta's fused
inner_update op (theta [P], alpha [] or [P], g [1, P]), as MAML's inner step.
"""

import torch
from torch import Tensor

from fastmeta.compat.higher._optimizer import DifferentiableOptimizer
from fastmeta.maml.layout import ParamLayout
from fastmeta.ops.inner_update import inner_update

__all__ = ["DifferentiableAdam", "DifferentiableAdamW", "DifferentiableSGD"]


def _nonzero(value) -> bool:
    """Whether a hyperparameter (a number or a tensor) is not all zeros."""
    return bool((value != 0).any()) if isinstance(value, Tensor) else value != 0


def _sqrt(x: Tensor) -> Tensor:
    """sqrt(x) for x >= 0 whose derivative is 0, not inf, where x == 0 (an element
    whose gradient has been 0 at every step), so no NaN reaches the meta-gradient."""
    if not x.requires_grad:
        return x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


class _Bucket:
    """Parameters of one group that step together (same dtype and device, and the
    same rule-specific key), by their positions `indices` in the group."""

    def __init__(self, indices: list[int], params: list[Tensor]):
        self.indices = indices
        self.params = params
        self.layout = ParamLayout([(str(i), p) for i, p in zip(indices, params)])

    def flat(self, tensors) -> Tensor:
        """Tensors shaped like the bucket's parameters -> one [P] vector."""
        return self.layout.flatten(list(tensors))

    def gather(self, states: dict, key: str) -> Tensor:
        """The [P] vector of state entry `key` of the bucket's parameters."""
        return self.flat(states[i][key] for i in self.indices)

    def scatter(self, flat: Tensor, into, key: str | None = None) -> None:
        """Writes flat [P]'s per-parameter views into into[i] (key None: a list, as
        group['params']) or into[i][key] (a state dict)."""
        for i, view in zip(self.indices, self.layout.unflatten(flat).values()):
            if key is None:
                into[i] = view
            else:
                into[i][key] = view

    def spread(self, value):
        """A hyperparameter for the [P] vectors: a number as it is; a one-element
        tensor as a 0-d tensor; any other tensor broadcast to each parameter's shape
        and flattened [P]; tensors in the parameters' dtype and device."""
        if not isinstance(value, Tensor):
            return value
        p = self.params[0]
        value = value.to(dtype=p.dtype, device=p.device)
        if value.numel() == 1:
            return value.reshape(())
        return self.flat(value.expand(q.shape) for q in self.params)


def _buckets(params: list[Tensor], grads: list, keys: list) -> list[_Bucket]:
    """The group's parameters with a gradient, split by (dtype, device, keys[i])."""
    found: dict[tuple, list[int]] = {}
    for i, (p, g, key) in enumerate(zip(params, grads, keys)):
        if g is not None:
            found.setdefault((p.dtype, p.device, key), []).append(i)
    return [_Bucket(indices, [params[i] for i in indices]) for indices in found.values()]


def _fused_step(theta: Tensor, alpha, direction: Tensor) -> Tensor:
    """theta [P] - alpha * direction [P] -> [P] (alpha a number, [] or [P]), by
    fastmeta's fused inner_update."""
    return inner_update(theta, alpha, direction.unsqueeze(0))[0]


def _direction(bucket: _Bucket, grads: list, group: dict) -> tuple[Tensor, Tensor]:
    """(p, d): the bucket's parameters [P] and gradients [P], d negated under
    maximize (torch's first step of SGD and Adam)."""
    p = bucket.flat(bucket.params)
    d = bucket.flat(grads[i] for i in bucket.indices)
    return p, (-d if group.get("maximize", False) else d)


class DifferentiableSGD(DifferentiableOptimizer):
    """torch.optim.SGD's step: weight_decay, momentum (the buffer starts as the
    first direction), dampening, nesterov, maximize; per group."""

    def _update(self, grouped_grads) -> None:
        for group, states, grads in zip(self.param_groups, self.state, grouped_grads):
            momentum = group["momentum"]
            has_buffer = [
                states.get(i, {}).get("momentum_buffer") is not None for i in range(len(grads))
            ]
            for bucket in _buckets(group["params"], grads, has_buffer):
                p, d = _direction(bucket, grads, group)
                if _nonzero(group["weight_decay"]):
                    d = d + bucket.spread(group["weight_decay"]) * p
                if _nonzero(momentum):
                    m = bucket.spread(momentum)
                    buf = d
                    if has_buffer[bucket.indices[0]]:
                        dampening = bucket.spread(group["dampening"])
                        buf = bucket.gather(states, "momentum_buffer") * m + (1 - dampening) * d
                    bucket.scatter(buf, states, "momentum_buffer")
                    d = d + m * buf if group["nesterov"] else buf
                new = _fused_step(p, bucket.spread(group["lr"]), d)
                bucket.scatter(new, group["params"])


class DifferentiableAdam(DifferentiableOptimizer):
    """torch.optim.Adam's step: betas, eps, weight_decay (L2, or decoupled as AdamW
    with decoupled_weight_decay), amsgrad, maximize; per group, with per-parameter
    step counts as torch keeps them."""

    decoupled_default = False  # for groups without a decoupled_weight_decay entry

    def _update(self, grouped_grads) -> None:
        for group, states, grads in zip(self.param_groups, self.state, grouped_grads):
            amsgrad = bool(group["amsgrad"])
            steps = [None] * len(grads)
            for i, g in enumerate(grads):
                if g is not None:
                    _init_adam_state(states[i], group["params"][i], amsgrad)
                    steps[i] = float(states[i]["step"])
            for bucket in _buckets(group["params"], grads, steps):
                self._update_bucket(bucket, group, states, grads, amsgrad)

    def _update_bucket(self, bucket: _Bucket, group: dict, states, grads, amsgrad: bool):
        step = float(states[bucket.indices[0]]["step"]) + 1
        beta1, beta2 = (bucket.spread(b) for b in group["betas"])
        lr, weight_decay = bucket.spread(group["lr"]), bucket.spread(group["weight_decay"])
        p, d = _direction(bucket, grads, group)
        if _nonzero(weight_decay):
            if group.get("decoupled_weight_decay", self.decoupled_default):
                p = p * (1 - lr * weight_decay)
            else:
                d = d + weight_decay * p
        exp_avg = torch.lerp(bucket.gather(states, "exp_avg"), d, 1 - beta1)
        exp_avg_sq = bucket.gather(states, "exp_avg_sq") * beta2 + (1 - beta2) * d * d
        second = exp_avg_sq
        if amsgrad:
            second = torch.maximum(bucket.gather(states, "max_exp_avg_sq"), exp_avg_sq)
            bucket.scatter(second, states, "max_exp_avg_sq")
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = _sqrt(second) / bias_correction2**0.5 + bucket.spread(group["eps"])
        new = _fused_step(p, lr / bias_correction1, exp_avg / denom)
        bucket.scatter(new, group["params"])
        bucket.scatter(exp_avg, states, "exp_avg")
        bucket.scatter(exp_avg_sq, states, "exp_avg_sq")
        step_tensor = torch.tensor(step)
        for i in bucket.indices:
            states[i]["step"] = step_tensor


class DifferentiableAdamW(DifferentiableAdam):
    """torch.optim.AdamW's step: Adam with decoupled weight decay."""

    decoupled_default = True


def _init_adam_state(state: dict, p: Tensor, amsgrad: bool) -> None:
    """torch's initial Adam state for parameter p (entries already there are kept)."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
    for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())):
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
