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
from fastmeta.maml.module_tree import Rates, copy_module, sgd_step
from fastmeta.maml.task_model import TaskModel, check_strategy

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


def _flag(owner: str, name: str, value, none_ok: bool = False) -> None:
    if not (isinstance(value, bool) or (none_ok and value is None)):
        allowed = "True, False or None" if none_ok else "True or False"
        raise TypeError(f"{owner}: {name} must be {allowed}, got {type(value).__name__} {value!r}")


def _flags(where: str, holder, first_order, allow_unused, allow_nograd) -> tuple[bool, bool, bool]:
    """The three flags as given, holder's where None, checked to be bools."""
    flags = (
        holder.first_order if first_order is None else first_order,
        holder.allow_unused if allow_unused is None else allow_unused,
        holder.allow_nograd if allow_nograd is None else allow_nograd,
    )
    for name, value in zip(("first_order", "allow_unused", "allow_nograd"), flags):
        _flag(where, name, value)
    return flags


class _ModuleWrapper(nn.Module):
    """A module around `self.module`: calling it calls the module, and attributes it
    does not have are looked up on the module (as learn2learn's wrappers do)."""

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__["_modules"].get("module")
            if module is None:
                raise
            return getattr(module, name)


class _MetaLearner(_ModuleWrapper):
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
        kind = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{kind}: model must be an nn.Module, got {type(model).__name__}")
        _flag(kind, "first_order", first_order)
        _flag(kind, "allow_unused", allow_unused, none_ok=True)
        _flag(kind, "allow_nograd", allow_nograd)
        super().__init__()
        self.module = model
        self.first_order, self.allow_nograd, self.steps = first_order, allow_nograd, steps
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        self.strategy, self.fuse = strategy, fuse
        self.selected = names = _adapted_names(model, adapt)
        params = dict(model.named_parameters())
        self.adapted = [n for n in names if params[n].requires_grad]
        self.frozen = [n for n in names if not params[n].requires_grad]
        if not self.adapted:
            raise ValueError(
                f"{type(self).__name__}: no parameter to adapt: the model has no parameter "
                f"with requires_grad=True among {names or 'its parameters (it has none)'}"
            )
        self.layout = ParamLayout([(n, params[n]) for n in self.adapted])

    def step_lr(self, k: int) -> Tensor | float:
        """Step k's rate for the flat adapted parameters (adapt_batch)."""
        raise NotImplementedError

    def rates(self, names: list[str], k: int) -> Rates:
        """Step k's rate for the parameters `names` (Learner.adapt): one number, or
        one tensor per name, broadcastable to its parameter's shape."""
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
        flags = _flags("clone", self, first_order, allow_unused, allow_nograd)
        return Learner(self, copy_module(self.module, Tensor.clone), 0, *flags)

    def adapt(self, loss: Tensor, *args, **kwargs) -> None:
        raise TypeError(
            f"{type(self).__name__}.adapt: adapt a clone, not the {type(self).__name__} "
            f"itself (learner = meta.clone(); learner.adapt(loss)), or use adapt_batch"
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

    def rates(self, names: list[str], k: int) -> float:
        return self.step_lr(k)


def initial_rates(model: nn.Module, names: list[str], lr, lead: tuple[int, ...]):
    """Meta-SGD's rates: for each parameter in `names`, a learnable tensor
    [*lead, *parameter shape] filled with lr, in the parameter's dtype and device."""
    params = dict(model.named_parameters())
    value = _rate("MetaSGD: lr", lr)
    return nn.ParameterList(
        [
            nn.Parameter(
                torch.full(
                    (*lead, *params[n].shape),
                    value,
                    dtype=params[n].dtype,
                    device=params[n].device,
                )
            )
            for n in names
        ]
    )


class MetaSGD(_MetaLearner):
    """Meta-SGD: a learnable learning rate per parameter element, initialised to lr
    (learn2learn's MetaSGD; its `lrs` ParameterList holds them, one per adapted
    parameter, in the order of `rated`). per_step=True learns a separate rate per
    inner step too: lrs[i] has shape [steps, *param]. The other arguments as for MAML."""

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
        self.per_step = per_step
        self.rated = list(self.adapted)
        self.lrs = initial_rates(model, self.rated, lr, (steps,) if per_step else ())

    def rates(self, names: list[str], k: int) -> list[Tensor]:
        if self.per_step and k >= self.steps:
            raise ValueError(
                f"MetaSGD: per-step rates were made for {self.steps} steps, step {k + 1} has none"
            )
        index = {n: i for i, n in enumerate(self.rated)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(
                f"MetaSGD: no learning rate for parameters {missing}: rates were made for "
                f"{self.rated} (the parameters that required grad when MetaSGD was built)"
            )
        lrs = [self.lrs[index[n]] for n in names]
        return [lr[k] for lr in lrs] if self.per_step else lrs

    def step_lr(self, k: int) -> Tensor:
        rates = self.rates(self.adapted, k)
        return torch.cat([r.expand(s).reshape(-1) for r, s in zip(rates, self.layout.shapes)])


class Learner(_ModuleWrapper):
    """One task's adapted copy of a module (learn2learn's clone): an nn.Module whose
    `module` is a copy of the model's module tree (parameters cloned, buffers that need
    no grad shared, hooks kept), so train()/eval()/to()/parameters()/named_parameters()
    behave as on the model, frozen parameters included and in the same order. Call it
    like the module; adapt(loss) takes one inner step (fastmeta's fused inner_update);
    clone() branches it. The meta-gradient of a loss on it reaches the model's
    parameters (and MetaSGD's rates)."""

    def __init__(
        self,
        owner: _MetaLearner,
        module: nn.Module,
        step: int,
        first_order: bool,
        allow_unused: bool,
        allow_nograd: bool,
    ):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: not in parameters()
        self.module, self.step = module, step
        self.first_order, self.allow_unused, self.allow_nograd = (
            first_order,
            allow_unused,
            allow_nograd,
        )

    @property
    def lr(self):
        """The owner's learning rate (MAML)."""
        return self.owner.lr

    @property
    def lrs(self):
        """The owner's learnable rates (MetaSGD)."""
        return self.owner.lrs

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> "Learner":
        """A copy of this learner, adapted as far as it is, differentiable back to it."""
        flags = _flags("clone", self, first_order, allow_unused, allow_nograd)
        return Learner(self.owner, copy_module(self.module, Tensor.clone), self.step, *flags)

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """One inner step on this task's loss: p <- p - lr * d loss / d p for each
        adapted parameter p that requires grad (second order unless first_order)."""
        first_order, allow_unused, allow_nograd = _flags(
            "adapt", self, first_order, allow_unused, allow_nograd
        )
        if not isinstance(loss, Tensor):
            raise TypeError(f"adapt: loss must be a tensor, got {type(loss).__name__}")
        params = dict(self.module.named_parameters())
        selected = [n for n in self.owner.selected if n in params]
        names = [n for n in selected if params[n].requires_grad]
        frozen = [n for n in selected if not params[n].requires_grad]
        if frozen and not allow_nograd:
            raise ValueError(
                f"adapt: parameters {frozen} do not require grad; "
                f"pass allow_nograd=True to leave them unadapted"
            )
        if names:
            tensors = [params[n] for n in names]
            grads = torch.autograd.grad(
                loss,
                tensors,
                retain_graph=not first_order,
                create_graph=not first_order,
                allow_unused=allow_unused,
            )
            sgd_step(self.module, tensors, grads, self.owner.rates(names, self.step))
        self.step += 1
