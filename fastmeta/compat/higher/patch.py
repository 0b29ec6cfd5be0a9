"""higher.patch (see fastmeta.compat.higher): monkeypatch, make_functional and
buffer_sync, which turn an nn.Module into a "patched" module run on fast weights.

A patched module is a structural copy of the module tree: every submodule is a new
object of its own class that shares the original's attributes but has its own
parameter slots, its own copies of the buffers (BatchNorm's running statistics, which
the inner loop updates in training mode without touching the model's) and its own
training flag. The root's class is the model's class with PatchedModule in front, so
fmodel is an instance of the model's class, and the model's own methods, and its
submodules called directly, run on the fast weights.

Fast weights: a list of tensors in model.parameters() order (a parameter shared by
several submodules appears once); every slot holds the latest ones, so fmodel(x) is
the model's forward with nothing swapped per call.
"""

import copy
import functools

from torch import Tensor, nn

from fastmeta.compat.higher.utils import get_func_params

__all__ = ["PatchedModule", "buffer_sync", "make_functional", "monkeypatch"]


class PatchedModule:
    """What a patched root adds to the model's class (higher's _MonkeyPatchBase):
    forward(*args, params=None, **kwargs), fast_params, parameters(time=None),
    update_params(params), init_fast_params, track_higher_grads.

    History: with track_higher_grads=True every update (a diffopt step, a forward
    with params=, update_params) appends a set of fast weights, so parameters(time=k)
    gives the k-th; with False only the latest set is kept.
    """

    def forward(self, *args, params=None, **kwargs):
        """The model's forward on `params` (which become the latest fast weights, as
        higher has it) or, when params is None, on the latest fast weights."""
        if params is not None:
            self.update_params(params)
        elif self._fast_params is None:
            raise ValueError(
                f"{type(self).__name__}: no fast weights yet: pass params=[...], "
                f"{len(self._param_names)} tensors in the model's parameters() order"
            )
        return super().forward(*args, **kwargs)

    @property
    def track_higher_grads(self) -> bool:
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"track_higher_grads must be a bool, got {value!r}")
        vars(self)["_track_higher_grads"] = value

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights (None before any were given)."""
        return None if self._fast_params is None else self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The fast weights at time 0 (kept only while tracking higher grads)."""
        if not self.track_higher_grads:
            raise ValueError(
                "init_fast_params: only the latest fast weights are kept when "
                "track_higher_grads is False"
            )
        return list(self.parameters(time=0))

    def update_params(self, params) -> None:
        """Makes `params` (one tensor per model parameter, in parameters() order) the
        latest fast weights: appended to the history, or replacing it when not
        tracking higher grads, and written into every submodule's slots."""
        params = self._checked_params(params)
        history = self._fast_params
        if history is None or not self.track_higher_grads:
            vars(self)["_fast_params"] = [params]
        else:
            history.append(params)
        for module, name, index in self._slots:
            module._parameters[name] = params[index]
        for rnn in self._rnns:  # RNNs read their weights from a cached list
            rnn._init_flat_weights()

    def parameters(self, recurse: bool = True, time: int | None = None):
        """An iterator over the fast weights at `time` (an update count: 0 is the
        initial set, -1 or None the latest). recurse is ignored: all fast weights."""
        history = self._fast_params
        if history is None:
            raise ValueError(f"{type(self).__name__}.parameters: no fast weights yet")
        time = -1 if time is None else time
        if not self.track_higher_grads and time not in (-1, 0):
            raise ValueError(
                f"parameters: time={time}, but only the latest fast weights are kept "
                f"when track_higher_grads is False (use time=None, -1 or 0)"
            )
        if not -len(history) <= time < len(history):
            raise IndexError(
                f"parameters: time={time}, but the fast weights have {len(history)} "
                f"versions (times 0 to {len(history) - 1})"
            )
        return iter(history[time])

    def _checked_params(self, params) -> list[Tensor]:
        if isinstance(params, Tensor):
            raise TypeError("params must be a list of tensors, got one tensor")
        params = list(params)
        names = self._param_names
        if len(params) != len(names):
            raise ValueError(
                f"params must hold {len(names)} tensors (the model's parameters "
                f"{names}, in order), got {len(params)}"
            )
        for i, (p, name) in enumerate(zip(params, names)):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] ({name}) must be a tensor, got {type(p).__name__}")
            if p.shape != self._param_shapes[i]:
                raise ValueError(
                    f"params[{i}] ({name}) must have shape {list(self._param_shapes[i])}, "
                    f"got {list(p.shape)}"
                )
        return params


_MonkeyPatchBase = PatchedModule  # higher's name, for isinstance checks


@functools.cache
def _patched_class(cls: type) -> type:
    return type(f"Patched{cls.__name__}", (PatchedModule, cls), {"__module__": __name__})


def _buffer_copy(b: Tensor | None, device) -> Tensor | None:
    return None if b is None else b.detach().to(b.device if device is None else device, copy=True)


def _no_flatten() -> None:
    """A patched RNN's flatten_parameters: cuDNN's flattening would move the fast
    weights' storage under autograd."""


def _copy_tree(module: nn.Module, memo: dict[int, nn.Module], device) -> nn.Module:
    """A new object of module's class sharing its attributes, with its own parameter
    slots, buffer copies (on `device`), hook tables and submodule copies (a submodule
    used twice is copied once)."""
    found = memo.get(id(module))
    if found is not None:
        return found
    clone = object.__new__(type(module))
    memo[id(module)] = clone
    state = vars(clone)
    for name, value in vars(module).items():
        private_table = name.startswith("_") and isinstance(value, (dict, set))
        state[name] = copy.copy(value) if private_table else value
    state.pop("_compiled_call_impl", None)  # bound to the original module
    state["_buffers"] = {k: _buffer_copy(b, device) for k, b in module._buffers.items()}
    state["_modules"] = {
        k: None if m is None else _copy_tree(m, memo, device) for k, m in module._modules.items()
    }
    if isinstance(module, nn.RNNBase):
        state["flatten_parameters"] = _no_flatten
    return clone


def _patch(module: nn.Module, device) -> PatchedModule:
    if isinstance(module, PatchedModule):
        raise ValueError(
            f"module is already a patched module ({type(module).__name__}): patch the original"
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    memo: dict[int, nn.Module] = {}
    root = _copy_tree(module, memo, device)
    root.__class__ = _patched_class(type(module))
    named = list(module.named_parameters())
    index = {id(p): i for i, (_, p) in enumerate(named)}
    state = vars(root)
    state["_slots"] = [
        (memo[id(m)], name, index[id(p)])
        for m in module.modules()
        for name, p in m._parameters.items()
        if p is not None
    ]
    state["_rnns"] = [memo[id(m)] for m in module.modules() if isinstance(m, nn.RNNBase)]
    state["_param_names"] = [name for name, _ in named]
    state["_param_shapes"] = [p.shape for _, p in named]
    state["_fast_params"] = None
    state["_track_higher_grads"] = True
    return root  # type: ignore[return-value]


def make_functional(module: nn.Module, encapsulator=None) -> PatchedModule:
    """A patched copy of `module` with no fast weights yet: call it with
    params=[...] (one tensor per parameter). encapsulator(fmodule, module), if given,
    runs last (higher's hook for setting initial weights)."""
    fmodule = _patch(module, None)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def buffer_sync(module: nn.Module, fmodule: PatchedModule, device=None) -> None:
    """Copies module's buffers (detached) into the patched fmodule, on `device`."""
    for name, sub in module.named_modules():
        try:
            fsub = fmodule.get_submodule(name)  # type: ignore[attr-defined]
        except AttributeError:
            raise KeyError(f"buffer_sync: fmodule has no submodule {name!r}") from None
        for key, b in sub._buffers.items():
            fsub._buffers[key] = _buffer_copy(b, device)


def monkeypatch(
    module: nn.Module,
    device=None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> PatchedModule:
    """A patched copy of `module` whose initial fast weights are its parameters:
    detached leaf copies with copy_initial_weights=True (no gradient reaches
    module's parameters: higher's default), or clones that keep module's
    parameters on the tape with False (MAML's meta-gradient). Buffers are copied;
    `device` moves fast weights and buffers."""
    if not isinstance(copy_initial_weights, bool):
        raise TypeError(f"copy_initial_weights must be a bool, got {copy_initial_weights!r}")
    fmodule = _patch(module, device)
    if copy_initial_weights:
        params = get_func_params(module, device)
    else:
        params = [
            p.to(p.device if device is None else device, copy=True) for p in module.parameters()
        ]
    fmodule.update_params(params)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule
