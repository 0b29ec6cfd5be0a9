"""Which backend runs each op: what was built, what is usable here, and overrides.

Backends:
  reference  pure PyTorch; runs everywhere; the oracle and the fallback.
  cpu        C++ kernels of fastmeta._C (OpenMP), CPU tensors.
  cuda       CUDA C++ kernels of fastmeta._C, CUDA tensors.
  triton     Triton kernels; CUDA tensors, or CPU float32 tensors when the Triton
             interpreter is on (TRITON_INTERPRET=1, set before fastmeta is imported).

By default an op runs the first usable backend of its preference list for the
input's device. `use_backend(name)` (a process-wide context manager) or the
FASTMETA_BACKEND environment variable forces one; forcing a backend that cannot
run the call is an error, never a silent fallback. A default that falls back to the
reference on a device where the op has a fused backend (a dtype its kernels do not
take) is not an error, but `backends()` lists where it would happen and where it did.
"""

import contextlib
import dataclasses
import os
from typing import Callable

import torch

from fastmeta import _extension
from fastmeta import race as racing
from fastmeta.kernels.interpreter import triton_interpreter, triton_version

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "FASTMETA_BACKEND"
DEFAULT_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here (not built, no GPU, wrong device or dtype)."""


_OPS: dict[str, tuple[str, ...]] = {}  # op name -> backends that implement it
_OP_DTYPES: dict[tuple[str, str], tuple[torch.dtype, ...]] = {}  # (op, backend) -> dtypes
_forced_stack: list[tuple[str, object]] = []  # (backend, the block that forced it)
_last_used: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class _Default:
    """The default choice for one (op, device type, dtype)."""

    usable: tuple[str, ...]  # in preference order; the last is always reference
    fallback: str | None  # why reference is first though the op has a fused backend there


_defaults: dict[tuple, _Default] = {}
_fallbacks_seen: dict[tuple[str, str, torch.dtype], str] = {}  # (op, device type, dtype) -> why


def register_op(
    name: str, backends: tuple[str, ...], dtypes: dict[str, tuple[torch.dtype, ...]] | None = None
) -> None:
    """Declares an op, the backends that implement it and, where a backend takes
    only some dtypes, which (called by fastmeta.ops.declaration.OpDeclaration)."""
    _OPS[name] = tuple(backends)
    for backend_name, allowed in (dtypes or {}).items():
        _OP_DTYPES[(name, backend_name)] = tuple(allowed)
    _defaults.clear()


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32."""
    return str(dtype).replace("torch.", "")


def op_unavailable_reason(op: str, backend: str, device_type: str, dtype) -> str | None:
    """Why `backend` cannot run `op` on device_type/dtype tensors (None if it can)."""
    if backend not in _OPS[op]:
        return f"op {op} has no {backend} backend (it has {', '.join(_OPS[op])})"
    allowed = _OP_DTYPES.get((op, backend))
    if allowed is not None and dtype not in allowed:
        return f"its {op} kernels take {', '.join(map(dtype_name, allowed))}"
    return unavailable_reason(backend, device_type, dtype)


def fallback_reason(op: str, device_type: str, dtype) -> str | None:
    """Why the default for `op` on device_type/dtype tensors is the reference though
    the op has a fused backend usable on that device type here (e.g. "cpu: its
    class_prototypes kernels take float32, float64"); None when a fused backend takes
    the call or none runs on that device type here."""
    fused = [
        b
        for b in DEFAULT_PREFERENCE.get(device_type, ())
        if b != "reference" and b in _OPS[op] and unavailable_reason(b, device_type) is None
    ]
    reasons = {b: op_unavailable_reason(op, b, device_type, dtype) for b in fused}
    if not reasons or None in reasons.values():
        return None
    return "; ".join(f"{b}: {why}" for b, why in reasons.items())


def unavailable_reason(backend: str, device_type: str | None = None, dtype=None) -> str | None:
    """Why `backend` cannot run on this machine (or for this device type and dtype).

    Returns None when it can. device_type None asks "on any device here".
    """
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda") and not _extension.LOADED:
        _extension.ensure()  # first use: compiles it for this torch (FASTMETA_JIT)
        if not _extension.LOADED:
            return f"fastmeta._C is not loaded: {_extension.LOAD_ERROR}"
    if backend == "cpu":
        return None if device_type in (None, "cpu") else "it runs on CPU tensors only"
    if backend == "cuda":
        if not _extension.WITH_CUDA:
            return "fastmeta._C was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return None if device_type in (None, "cuda") else "it runs on CUDA tensors only"
    # triton
    if triton_version() is None:
        return "triton is not installed"
    if device_type == "cuda" or (device_type is None and torch.cuda.is_available()):
        return None
    if device_type not in (None, "cpu"):
        return f"it cannot run on {device_type} tensors"
    if not triton_interpreter():
        return "on CPU tensors it needs the Triton interpreter (TRITON_INTERPRET=1)"
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "the Triton interpreter runs float32, float16 and bfloat16 only"
    return None


def forced_backend() -> tuple[str, str] | None:
    """The forced backend and who forced it, or None."""
    if _forced_stack:
        return _forced_stack[-1][0], "fastmeta.use_backend"
    name = os.environ.get(ENV_VAR, "").strip()
    return (name, ENV_VAR) if name else None


@contextlib.contextmanager
def use_backend(name: str):
    """Forces every fastmeta op called inside the block onto backend `name`.

    Process-wide (autograd may run backward on other threads), nestable. Not per
    thread: while blocks of two threads overlap, the one entered last forces both
    threads' calls; each block, on exit, removes only its own entry. Raises
    BackendUnavailableError at once if `name` cannot run on this machine at all;
    a call whose device or dtype the backend cannot take raises when it is made.
    Run the backward inside the block too when it must use the same backend.
    """
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"cannot use fastmeta backend {name!r}: {reason}")
    entry = (name, object())
    _forced_stack.append(entry)
    try:
        yield
    finally:
        _forced_stack.remove(entry)  # not pop(): another thread's block may be on top


def _default(op: str, device_type: str, dtype) -> _Default:
    """The usable backends and any fallback reason, worked out once per (op, device
    type, dtype): what was built, the GPU and Triton do not change within a process
    (and TRITON_INTERPRET, read each time, matters only to a forced triton)."""
    key = (op, device_type, dtype)
    found = _defaults.get(key)
    if found is None:
        preference = DEFAULT_PREFERENCE.get(device_type, ("reference",))
        usable = tuple(
            b for b in preference if op_unavailable_reason(op, b, device_type, dtype) is None
        )
        found = _defaults[key] = _Default(usable, fallback_reason(op, device_type, dtype))
    return found


def select(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    race: "Callable[[], racing.Race] | None" = None,
) -> str:
    """The backend that runs `op` for inputs on `device` with `dtype` (and records it).

    With `race` (ops whose GPU backends differ in speed by shape: a function that
    builds the call's Race, run only when one may be needed), the default choice on a
    device with several racing backends is the winner of the shape bucket's race
    (fastmeta/race.py). A default that is the reference while the op has a fused
    backend on that device type is recorded for `backends()`."""
    forced = forced_backend()
    if forced is not None:
        name, source = forced
        reason = (
            unavailable_reason(name)
            if name not in BACKENDS
            else op_unavailable_reason(op, name, device.type, dtype)
        )
        if reason is not None:
            raise BackendUnavailableError(
                f"fastmeta backend {name!r} (forced by {source}) cannot run {op} on "
                f"{device.type} {dtype} tensors: {reason}"
            )
        chosen = name
    else:
        default = _default(op, device.type, dtype)
        chosen = default.usable[0]
        if default.fallback is not None:  # only the reference is usable: nothing to race
            _fallbacks_seen[(op, device.type, dtype)] = default.fallback
        elif race is not None:
            names = racing.contenders(device.type, default.usable)
            if len(names) > 1 and racing.enabled(device):
                chosen = racing.winner(op, device, dtype, names, race())
    _last_used[op] = chosen
    return chosen


def last_backend(op: str) -> str | None:
    """The backend that ran the most recent call of `op` (forward or backward)."""
    return _last_used.get(op)


def forget_last_backends(ops) -> None:
    """Clears last_backend's record of `ops`, so that it reports only later calls."""
    for op in ops:
        _last_used.pop(op, None)


def fallbacks_seen() -> dict[tuple[str, str, torch.dtype], str]:
    """(op, device type, dtype) -> why: the default calls so far that fell back to the
    reference though the op has a fused backend on that device type."""
    return dict(_fallbacks_seen)


def default_backend(op: str, device_type: str, dtype) -> str:
    """The backend a default (not forced, not raced) call of `op` runs."""
    return _default(op, device_type, dtype).usable[0]


def ops() -> tuple[str, ...]:
    """The registered ops."""
    return tuple(_OPS)


def op_backends(op: str) -> tuple[str, ...]:
    """The backends that implement `op`, the reference first."""
    return _OPS[op]
