"""Named phases of a training step, for profilers.

    with phase("inner_loop"):
        ...

is a `torch.profiler.record_function("fastmeta.inner_loop")` range while a profiler runs
(torch.profiler; under torch.autograd.profiler.emit_nvtx an NVTX range too), and with
nvtx_ranges() on also a torch.cuda.nvtx range (for Nsight Systems without emit_nvtx's
range per op). Otherwise it does nothing: one flag read, no op call, no sync.

A training step is one "step" range holding the PHASES; `fastmeta profile train ...`
(fastmeta/cli/profile.py) reports where a step's time goes by these ranges.
"""

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch
from torch.autograd import profiler

STEP = "step"
# data: sampling episodes (and moving them to the device); inner_loop: MAML/Meta-SGD
# adaptation, MetaNet's fast-weight generation; query_pass: the forward on the queries
# with adapted or fast weights (ProtoNet: embedding support and queries); loss; the
# outer backward; optimizer: zeroing the gradients and the update
PHASES = ("data", "inner_loop", "query_pass", "loss", "outer_backward", "optimizer")
PREFIX = "fastmeta."
_NAMES = frozenset((STEP, *PHASES))
_NOTHING = contextlib.nullcontext()
_nvtx = False


def range_name(name: str) -> str:
    """The profiler range of phase `name`: "fastmeta.<name>"."""
    return PREFIX + name


def phase(name: str) -> AbstractContextManager:
    """The range of phase `name` (STEP or one of PHASES) while a profiler runs or
    nvtx_ranges() is on; else a context that does nothing."""
    if name not in _NAMES:
        raise ValueError(
            f"fastmeta.profiling.phase: name must be one of {sorted(_NAMES)}, got {name!r}"
        )
    if _nvtx:
        return _nvtx_range(range_name(name))
    if profiler._is_profiler_enabled:
        return profiler.record_function(range_name(name))
    return _NOTHING


@contextlib.contextmanager
def _nvtx_range(label: str) -> Iterator[None]:
    ranged = profiler.record_function(label) if profiler._is_profiler_enabled else _NOTHING
    with torch.cuda.nvtx.range(label), ranged:
        yield


@contextlib.contextmanager
def nvtx_ranges() -> Iterator[None]:
    """Within: every phase is also a torch.cuda.nvtx range (CUDA builds of torch)."""
    global _nvtx
    previous, _nvtx = _nvtx, True
    try:
        yield
    finally:
        _nvtx = previous
