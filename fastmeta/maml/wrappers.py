"""MAML (Finn et al., 2017) and Meta-SGD (Li et al., 2017) around any nn.Module.

Two ways to adapt, the same numbers:

    maml = fastmeta.MAML(model, lr=0.4)               # learn2learn's signature
    learner = maml.clone()                             # one task at a time, as in learn2learn
    learner.adapt(loss_fn(learner(support_x), support_y))
    loss_fn(learner(query_x), query_y).backward()      # meta-gradient reaches model's parameters

    learner = maml.adapt_batch(support_x, support_y, loss_fn, steps=1)   # T tasks at once
    loss_fn(learner(query_x).flatten(0, 1), query_y.flatten()).backward()

Parameters with requires_grad=False never adapt. `adapt=` picks the parameters that
adapt (names or a predicate on (name, parameter)), e.g. only the head (ANIL); the others
are shared by all tasks and still get meta-gradients.
"""

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from fastmeta.maml.batched import BatchedLearner, adapt_batch
from fastmeta.maml.layout import ParamLayout
from fastmeta.maml.meta_step import MetaStepResult, meta_step
from fastmeta.maml.task_model import TaskModel, check_strategy
from fastmeta.ops.inner_update import inner_update

AdaptSelection = Iterable[str] | Callable[[str, nn.Parameter], bool] | None


def _adapted_names(model: nn.Module, adapt: AdaptSelection) -> list[str]:
    named = dict(model.named_parameters())
    if adapt is None:
        return list(named)
    if callable(adapt):
        return [n for n, p in named.items() if adapt(n, p)]
    names = list(adapt)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(
            f"adapt names parameters the model does not have: {unknown}; "
            f"its parameters are {list(named)}"
        )
    return [n for n in named if n in names]


class _MetaLearner(nn.Module):
    """What MAML and MetaSGD share: the adapted-parameter layout, clone() and
    adapt_batch(). Subclasses say what step k's learning rate is."""

    def __init__(
        self,
        model: nn.Module,
        first_order: bool,
        allow_unused: bool | None,
        allow_nograd: bool,
        steps: int,
        adapt: AdaptSelection,
        strategy: str,
        fuse: bool | str,
    ):
        super().__init__()
        self.module = model
        self.first_order, self.allow_nograd, self.steps = first_order, allow_nograd, steps
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        self.strategy, self.fuse = strategy, fuse
        names = _adapted_names(model, adapt)
        params = dict(model.named_parameters())
        self.adapted = [n for n in names if params[n].requires_grad]
        self.frozen = [n for n in names if not params[n].requires_grad]
        if not self.adapted:
            raise ValueError(
                f"{type(self).__name__}: no parameter to adapt: the model has no parameter "
                f"with requires_grad=True among {names or 'its parameters (it has none)'}"
            )
        self.layout = ParamLayout([(n, params[n]) for n in self.adapted])

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def step_lr(self, k: int) -> Tensor | float:
        raise NotImplementedError

    def _theta(self) -> Tensor:
        params = dict(self.module.named_parameters())
        return self.layout.flatten([params[n] for n in self.adapted])

    def _fixed(self) -> dict[str, Tensor]:
        """The parameters that do not adapt, and the buffers: shared by every task."""
        fixed = {n: p for n, p in self.module.named_parameters() if n not in self.adapted}
        fixed.update(self.module.named_buffers())
        return fixed

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> "Learner":
        """A differentiable copy for one task (learn2learn's clone): adapt() it, call it."""
        return Learner(
            self,
            self.layout.unflatten(self._theta()),
            0,
            self.first_order if first_order is None else first_order,
            self.allow_unused if allow_unused is None else allow_unused,
            self.allow_nograd if allow_nograd is None else allow_nograd,
        )

    def adapt_batch(
        self,
        support_x: Tensor,
        support_y: Tensor,
        loss_fn,
        steps: int | None = None,
        first_order: bool | None = None,
        strategy: str | None = None,
    ) -> BatchedLearner:
        """Adapts T tasks at once: support_x [T, ...], support_y [T, ...] (task t's
        batch is support_x[t]); loss_fn(outputs, labels) as for one task. Returns a
        BatchedLearner: learner(query_x [T, ...]) -> outputs [T, ...]."""
        strategy = check_strategy(strategy or self.strategy, support_x.device)
        task_model = TaskModel(self.module, self.layout, self._fixed(), fuse=self.fuse)
        return adapt_batch(
            task_model,
            self._theta(),
            self.step_lr,
            support_x,
            support_y,
            loss_fn,
            self.steps if steps is None else steps,
            self.first_order if first_order is None else first_order,
            strategy,
            self.allow_unused,
        )

    def meta_step(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        loss_fn,
        **options,
    ) -> MetaStepResult:
        """Adapts T tasks, and accumulates the gradient of their mean query loss into
        .grad in bounded memory, a chunk of tasks at a time (options: steps,
        first_order, strategy, chunk_size, max_memory, checkpoint, scale). Returns
        (loss, accuracy, chunks, task_bytes); see fastmeta/maml/meta_step.py."""
        return meta_step(self, support_x, support_y, query_x, query_y, loss_fn, **options)


def _rate(name: str, value) -> float:
    """One finite learning rate from a real number or a one-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value)  # read once, at construction
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def learning_rates(lr) -> float | tuple[float, ...]:
    """MAML's lr as given by users: a number (or a one-element float tensor), or a
    non-empty sequence of them, one per inner step. Raises TypeError / ValueError on
    anything else (a string, a bool, NaN, an empty list)."""
    if isinstance(lr, (str, bytes)) or not isinstance(lr, Sequence):
        return _rate("MAML: lr", lr)
    if not lr:
        raise ValueError("MAML: lr must hold one rate per inner step, got an empty sequence")
    return tuple(_rate(f"MAML: lr[{k}]", v) for k, v in enumerate(lr))


class MAML(_MetaLearner):
    """MAML with learning rate `lr`: a float, or one float per inner step (MAML++'s
    per-step rates, fixed). first_order=True drops the second-order terms (FOMAML).
    allow_unused / allow_nograd as in learn2learn. steps: adapt_batch's default.
    strategy: 'auto' (loop on CPU, vmap on GPU), 'loop' or 'vmap'. fuse: under 'loop'
    on CPU, run Conv2d-BatchNorm2d-ReLU-MaxPool2d blocks with few input channels as
    one fused op (fastmeta.fused_blocks) wherever no second derivative is taken
    (True, the default: the query pass and first-order inner steps; a conv4 meta-step
    1.58x faster with 2.5x less peak memory on a 2-core CPU), 'eval' only where no
    gradient is wanted, False never."""

    def __init__(
        self,
        model: nn.Module,
        lr: float | Sequence[float],
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        steps: int = 1,
        adapt: AdaptSelection = None,
        strategy: str = "auto",
        fuse: bool | str = True,
    ):
        super().__init__(
            model, first_order, allow_unused, allow_nograd, steps, adapt, strategy, fuse
        )
        self.lr = learning_rates(lr)

    def step_lr(self, k: int) -> float:
        if isinstance(self.lr, (int, float)):
            return float(self.lr)
        if k >= len(self.lr):
            raise ValueError(
                f"MAML: lr has {len(self.lr)} per-step rates, step {k + 1} needs one more"
            )
        return float(self.lr[k])


class MetaSGD(_MetaLearner):
    """Meta-SGD: a learnable learning rate per parameter element, initialised to lr
    (learn2learn's MetaSGD; its `lrs` ParameterList holds them). per_step=True
    learns a separate rate per inner step too: lrs[i] has shape [steps, *param]. The
    other arguments as for MAML."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        steps: int = 1,
        adapt: AdaptSelection = None,
        strategy: str = "auto",
        fuse: bool | str = True,
        per_step: bool = False,
    ):
        super().__init__(
            model, first_order, allow_unused, allow_nograd, steps, adapt, strategy, fuse
        )
        params = dict(model.named_parameters())
        lead = (steps,) if per_step else ()
        self.per_step = per_step
        self.lrs = nn.ParameterList(
            [
                nn.Parameter(
                    torch.full(
                        (*lead, *params[n].shape),
                        _rate("MetaSGD: lr", lr),
                        dtype=params[n].dtype,
                        device=params[n].device,
                    )
                )
                for n in self.adapted
            ]
        )

    def step_lr(self, k: int) -> Tensor:
        if not self.per_step:
            return self.layout.flatten(list(self.lrs))
        if k >= self.steps:
            raise ValueError(
                f"MetaSGD: per-step rates were made for {self.steps} steps, step {k + 1} has none"
            )
        return self.layout.flatten([lr[k] for lr in self.lrs])


class Learner:
    """One task's adapted copy of a module (learn2learn's clone). Call it like the
    module; adapt(loss) takes one inner step; clone() branches it."""

    def __init__(
        self,
        owner: _MetaLearner,
        params: dict[str, Tensor],
        step: int,
        first_order: bool,
        allow_unused: bool,
        allow_nograd: bool,
    ):
        self.owner, self.fast, self.step = owner, params, step
        self.first_order, self.allow_unused, self.allow_nograd = (
            first_order,
            allow_unused,
            allow_nograd,
        )

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(
            self.owner.module, {**self.owner._fixed(), **self.fast}, args, kwargs
        )

    def named_parameters(self):
        return iter(self.fast.items())

    def parameters(self):
        return iter(self.fast.values())

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> "Learner":
        return Learner(
            self.owner,
            dict(self.fast),
            self.step,
            self.first_order if first_order is None else first_order,
            self.allow_unused if allow_unused is None else allow_unused,
            self.allow_nograd if allow_nograd is None else allow_nograd,
        )

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """One inner step on this task's loss: fast = fast - lr * grad(loss, fast)."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        if self.owner.frozen and not allow_nograd:
            raise ValueError(
                f"adapt: parameters {self.owner.frozen} do not require grad; "
                f"pass allow_nograd=True to leave them unadapted"
            )
        fast = list(self.fast.values())
        grads = torch.autograd.grad(
            loss,
            fast,
            retain_graph=not first_order,
            create_graph=not first_order,
            allow_unused=allow_unused,
        )
        layout = self.owner.layout
        theta = layout.flatten(fast)
        g = layout.flatten(grads, like=theta).unsqueeze(0)
        self.fast = layout.unflatten(inner_update(theta, self.owner.step_lr(self.step), g)[0])
        self.step += 1
