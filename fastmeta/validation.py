"""Value checks of op arguments (labels in range, every class with a support example),
following torch.distributions: on by default, off for speed.

Shapes, dtypes and devices are checked on the host at every call; that costs no
device work. Checking *values* reads tensors, which on a GPU stalls the stream, so:

* CPU tensors: the labels are read as Python lists (no ATen call, nothing to wait
  for) and a bad value raises ValueError at the call, naming the op, the argument,
  the value and where it is.
* CUDA tensors: one flag covering every label argument of the call is computed on the
  stream and copied without blocking into pinned host memory behind a CUDA event;
  nothing waits for it (zero syncs). Each
  later validated call reads the flags whose events have completed, and
  `raise_deferred_errors()` waits for all of them; a bad one raises the same ValueError,
  marked as found after the call that made it. The labels are kept (a copy on the
  device) until their flag is read, so the message names the bad value.
* Skipped while torch.compile traces, during CUDA graph capture and for meta tensors.

    fastmeta.set_validate_args(False)     # process-wide
    with fastmeta.validate_args(False):   # this block only
        ...

With validation off a bad label gives undefined numbers (NaN where a class is empty,
losses of the wrong class), never an out-of-bounds access: every kernel keeps its
indexing inside the tensors whatever the labels hold.
"""

import contextlib
import dataclasses
from collections import deque

import torch
from torch import Tensor

_enabled = True


def set_validate_args(value: bool) -> None:
    """Turns fastmeta's argument value checks on (the default) or off, process-wide."""
    global _enabled
    _enabled = bool(value)


def is_validating() -> bool:
    """Whether value checks run (set_validate_args, validate_args)."""
    return _enabled


@contextlib.contextmanager
def validate_args(value: bool = True):
    """Value checks on or off inside the block (restored after it)."""
    global _enabled
    before, _enabled = _enabled, bool(value)
    try:
        yield
    finally:
        _enabled = before


@dataclasses.dataclass(frozen=True)
class Labels:
    """A label argument to check: labels [B, N] integer, each in [0, num_classes),
    and with every_class, every class present in every episode (row)."""

    name: str
    labels: Tensor
    num_classes: int
    every_class: bool = False


def check_label_values(op: str, *checks: Labels) -> None:
    """Value checks of the label arguments of one call of `op` (see the module doc
    for when and where a bad value raises). The labels share one device."""
    if not _enabled or not checks or torch.compiler.is_compiling():
        return
    device = checks[0].labels.device
    if device.type == "meta":
        return
    for check in checks:  # known from the shape alone
        B, S = check.labels.shape
        if check.every_class and S == 0 and B > 0:
            raise ValueError(
                f"{op}: class 0 of episode 0 has no support example in {check.name} "
                f"(shape [{B}, 0], num_classes={check.num_classes})"
            )
    if device.type == "cuda":
        if not torch.cuda.is_current_stream_capturing():
            _read_finished()
            _defer(op, checks)
        return
    message = _first_error(op, checks, deferred=False)
    if message is not None:
        raise ValueError(message)


def raise_deferred_errors() -> None:
    """Waits for every pending device-side value check and raises the first bad one
    (ValueError); afterwards nothing is pending."""
    while _pending:
        pending = _pending.popleft()
        pending.event.synchronize()
        pending.raise_if_bad()


def _any_bad(checks: tuple[Labels, ...]) -> Tensor:
    """On the labels' device, one 0-d bool tensor: some label is out of range or some
    required class has no example. A few elementwise ops per label argument, no host
    read."""
    bad = None
    for check in checks:
        y = check.labels
        if y.numel() == 0:
            continue
        flag = (y < 0).logical_or_(y >= check.num_classes).any()
        if check.every_class:
            present = torch.zeros(y.shape[0], check.num_classes, dtype=torch.bool, device=y.device)
            present.scatter_(1, y.clamp(0, check.num_classes - 1), True)
            flag = flag.logical_or_(~present.all())
        bad = flag if bad is None else bad.logical_or_(flag)
    return torch.zeros((), dtype=torch.bool, device=checks[0].labels.device) if bad is None else bad


def _first_error(op: str, checks: tuple[Labels, ...], deferred: bool) -> str | None:
    """The message for the first bad label of `checks`, or None. The labels are read as
    Python lists: for the few labels of an episode that costs a few microseconds, less
    than any tensor or NumPy op (on CUDA it copies them to the host: called only once a
    flag said a label is bad)."""
    when = " (found on the device after the call returned)" if deferred else ""
    for check in checks:
        C, rows = check.num_classes, check.labels.tolist()
        shape = "[" + ", ".join(map(str, check.labels.shape)) + "]"
        for b, row in enumerate(rows):
            if row and (min(row) < 0 or max(row) >= C):
                i = next(i for i, y in enumerate(row) if not 0 <= y < C)
                return (
                    f"{op}: {check.name} holds {row[i]} at index [{b}, {i}], outside "
                    f"[0, num_classes={C}) (shape {shape}){when}"
                )
        for b, row in enumerate(rows if check.every_class else ()):
            if len(set(row)) < C:  # all in range: C distinct values iff every class is there
                return (
                    f"{op}: class {min(set(range(C)) - set(row))} of episode {b} has no "
                    f"support example in {check.name} (shape {shape}, num_classes={C}){when}"
                )
    return None


@dataclasses.dataclass
class _Pending:
    op: str
    checks: tuple[Labels, ...]  # with copies of the labels, read only if the flag is set
    flag: Tensor  # 0-d bool in pinned host memory, written by the copy behind `event`
    event: "torch.cuda.Event"

    def raise_if_bad(self) -> None:
        message = _first_error(self.op, self.checks, deferred=True) if bool(self.flag) else None
        if message is not None:
            raise ValueError(message)


_pending: deque[_Pending] = deque()


def _defer(op: str, checks: tuple[Labels, ...]) -> None:
    bad = _any_bad(checks)
    flag = torch.empty((), dtype=torch.bool, pin_memory=bad.is_cuda)  # pinned: async copy
    flag.copy_(bad, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    kept = tuple(dataclasses.replace(c, labels=c.labels.clone()) for c in checks)
    _pending.append(_Pending(op, kept, flag, event))


def _read_finished() -> None:
    """Reads, in call order, the pending flags whose copies have finished (no wait)."""
    while _pending and _pending[0].event.query():
        _pending.popleft().raise_if_bad()
