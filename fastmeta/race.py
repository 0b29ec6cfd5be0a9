"""Per-shape choice between backends by timing them on the first call.

On a GPU an op may have two fused implementations, CUDA C++ and Triton, and which is
faster depends on the shape (tile sizes, occupancy, the GEMM library's kernels). An op
that opts in (its declaration names the arguments to race on:
`fastmeta.ops.declaration.Kernels.race_on`) races its contenders
on the first call of each shape bucket; the winner is used for that bucket from then
on. A race:

1. calls each contender once (this also compiles Triton kernels). A contender whose
   call raises (a kernel that does not compile for the card, an unsupported launch)
   is dropped for that bucket, its error ("Type: message") kept as the reason; if
   every contender raises, the first error is raised again (the others added to it
   as notes) and nothing is cached; if one is left, it wins untimed.
2. on device types in `WARMUP_MS` (CUDA), runs untimed rounds of every contender
   until that much wall time has passed, so that a GPU's clock has ramped up from
   idle before anything is timed.
3. times `SAMPLES` calls of each, interleaved: round r runs the contenders in
   preference order rotated by r (A B, B A, A B, ...), so neither always runs first
   or after the other. A call on CUDA is timed between two CUDA events on the
   device's current stream, after the work queued before it has finished (host
   launch gaps count, the synchronization does not); elsewhere by perf_counter.
   The lowest median wins (ties: the earlier in preference order).

Racing reruns an op on the same inputs, so only ops without side effects opt in.
The outcome of each race (winner, median times, dropped contenders and why) is in
`results()` and `fastmeta.backends()`; `fastmeta.last_backend(op)` names the backend
that ran.

Shape buckets round every dimension up to a power of two, so a training run with a
fixed episode shape races once per op. No race runs, and the first contender in the
preference order (on CUDA: `cuda`) is used, when FASTMETA_RACE=0, while a CUDA graph
is being captured, and under `torch.use_deterministic_algorithms(True)`: a race's
winner depends on timings, so two processes could pick backends that round
differently; with the fixed choice they give bitwise the same results. A forced
backend (use_backend, FASTMETA_BACKEND) never races.

The winners are kept under a lock: when two threads (e.g. the main thread and
autograd's) reach the same unraced bucket, one races it and the other waits for its
winner. The lock is not held while timing, so a contender that calls other ops
(which may race their own buckets) cannot deadlock; one that calls its own op on the
same bucket gets the first contender.
"""

import dataclasses
import os
import statistics
import threading
import time
from typing import Callable

import torch

RACED = {"cuda": ("cuda", "triton")}  # device type -> backends raced against each other
SAMPLES = 15  # timed calls of each contender
WARMUP_MS = {"cuda": 100.0}  # device type -> untimed wall time before timing
ENV_VAR = "FASTMETA_RACE"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One shape bucket's race."""

    winner: str
    times: dict[str, float]  # contender -> median ms (empty when only one was left)
    dropped: dict[str, str]  # contender -> "ErrorType: message" of the call that raised


_lock = threading.Condition()  # guards _outcomes and _racing
_outcomes: dict[tuple, Outcome] = {}  # (op, device type, dtype, bucket) -> its race
_racing: dict[tuple, int] = {}  # key -> the thread racing it now


class Race:
    """What select needs to race an op: run(backend name) makes the call; the shape
    bucket comes from `tensors` (plus `tag`), computed only when racing."""

    __slots__ = ("run", "tensors", "tag")

    def __init__(self, run: Callable[[str], object], *tensors: torch.Tensor, tag: tuple = ()):
        self.run, self.tensors, self.tag = run, tensors, tag

    def key(self) -> tuple:
        return self.tag + shape_bucket(*self.tensors)


def shape_bucket(*tensors: torch.Tensor) -> tuple:
    """Every dimension rounded up to a power of two, per tensor."""
    return tuple(tuple(1 << max(int(s) - 1, 0).bit_length() for s in t.shape) for t in tensors)


def enabled(device: torch.device) -> bool:
    """False (the first contender runs) under FASTMETA_RACE=0, deterministic algorithms,
    or CUDA graph capture."""
    if os.environ.get(ENV_VAR, "1").strip() == "0" or torch.are_deterministic_algorithms_enabled():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def contenders(device_type: str, usable) -> list[str]:
    """The usable backends that race on this device type, in preference order."""
    return [b for b in usable if b in RACED.get(device_type, ())]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(run: Callable[[str], object], name: str, device: torch.device) -> float:
    """Milliseconds that one call run(name) takes on `device` (see the module docstring)."""
    if device.type != "cuda":
        began = time.perf_counter()
        run(name)
        return (time.perf_counter() - began) * 1e3
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    stream.synchronize()
    start.record(stream)
    run(name)
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end)


def _race(run: Callable[[str], object], names: list[str], device: torch.device) -> Outcome:
    """Races `names` (at least two, in preference order) as the module docstring says."""
    alive, dropped, errors = list(names), {}, []
    samples: dict[str, list[float]] = {name: [] for name in names}

    def play(r: int, call: Callable[[str], object]) -> None:
        """Calls each contender still in, in preference order rotated by r; one whose
        call raises is dropped. Raises the first error once none is left."""
        shift = r % len(alive)
        for name in alive[shift:] + alive[:shift]:
            try:
                call(name)
            except Exception as error:  # a failing contender is dropped, not fatal
                dropped[name] = f"{type(error).__name__}: {error}"
                errors.append(error)
        alive[:] = [name for name in alive if name not in dropped]
        if not alive:
            for other in errors[1:]:
                errors[0].add_note(
                    f"fastmeta race: another contender failed too: {type(other).__name__}: {other}"
                )
            raise errors[0]

    def untimed(name):
        run(name)
        _sync(device)  # an asynchronous launch error is this contender's

    def timed(name):
        samples[name].append(_time_ms(run, name, device))

    play(0, untimed)
    deadline = time.perf_counter() + WARMUP_MS.get(device.type, 0.0) / 1e3
    r = 1
    while len(alive) > 1 and time.perf_counter() < deadline:
        play(r, untimed)
        r += 1
    for r in range(SAMPLES):
        if len(alive) < 2:
            break
        play(r, timed)
    times = {name: statistics.median(samples[name]) for name in alive} if len(alive) > 1 else {}
    fastest = min(times, key=lambda name: times[name]) if times else alive[0]
    return Outcome(fastest, times, dropped)


def winner(op: str, device: torch.device, dtype: torch.dtype, names: list[str], race: Race) -> str:
    """The winner of `names` (at least two, in preference order) for this op, device
    type, dtype and shape bucket: raced on the first call, then cached. A thread that
    reaches a bucket another thread is racing waits for that race's winner."""
    key = (op, device.type, dtype, race.key())
    me = threading.get_ident()
    with _lock:
        while True:
            outcome = _outcomes.get(key)
            if outcome is not None:
                return outcome.winner
            racer = _racing.get(key)
            if racer is None:
                _racing[key] = me
                break
            if racer == me:  # a contender calls its own op on the same bucket
                return names[0]
            _lock.wait()
    outcome = None
    try:
        outcome = _race(race.run, names, device)
    finally:
        with _lock:
            if outcome is not None:
                _outcomes[key] = outcome
            del _racing[key]
            _lock.notify_all()
    return outcome.winner


def results() -> dict[tuple, Outcome]:
    """(op, device type, dtype, shape bucket) -> the Outcome of its race."""
    with _lock:
        return dict(_outcomes)


def clear() -> None:
    """Forgets every winner (the next call of each shape races again)."""
    with _lock:
        _outcomes.clear()
