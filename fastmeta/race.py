"""Per-shape choice between backends by timing them on the first call.

On a GPU an op may have two fused implementations, CUDA C++ and Triton, and which is
faster depends on the shape (tile sizes, occupancy, the GEMM library's kernels). An op
that opts in (it runs through `fastmeta.backend.run_selected`) is, on the first call
of each shape bucket, run with every contender: one untimed call (which also compiles
Triton kernels), then `RUNS` timed calls each; the fastest median wins and is used for
that bucket from then on. Racing reruns an op on the same inputs, so only ops without
side effects opt in. The winners and their times are in `results()`;
`fastmeta.last_backend(op)` names the backend that ran.

Shape buckets round every dimension up to a power of two, so a training run with a
fixed episode shape races once per op. Racing is skipped (the first contender in the
preference order runs) while a CUDA graph is being captured, and everywhere when
FASTMETA_RACE=0. A forced backend (use_backend, FASTMETA_BACKEND) never races.
"""

import os
import statistics
import time
from typing import Callable

import torch

RACED = {"cuda": ("cuda", "triton")}  # device type -> backends raced against each other
RUNS = 5
ENV_VAR = "FASTMETA_RACE"

_winners: dict[tuple, str] = {}
_times: dict[tuple, dict[str, float]] = {}


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
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def contenders(device_type: str, usable: list[str]) -> list[str]:
    """The usable backends that race on this device type, in preference order."""
    return [b for b in usable if b in RACED.get(device_type, ())]


def _median_ms(run: Callable[[str], object], name: str, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(name)
    sync()
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        run(name)
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def winner(op: str, device: torch.device, dtype: torch.dtype, names: list[str],
           race: Race) -> str:
    """The fastest of `names` for this op and shape bucket (timed once, then cached)."""
    key = (op, device.type, dtype, race.key())
    chosen = _winners.get(key)
    if chosen is None:
        times = {name: _median_ms(race.run, name, device) for name in names}
        chosen = min(times, key=times.get)
        _times[key], _winners[key] = times, chosen
    return chosen


def results() -> dict[tuple, dict[str, float]]:
    """(op, device type, dtype, shape bucket) -> median ms of each contender."""
    return {key: dict(times) for key, times in _times.items()}


def clear() -> None:
    """Forgets every winner (the next call of each shape races again)."""
    _winners.clear()
    _times.clear()
