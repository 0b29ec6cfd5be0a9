"""The pool of reusable buffers behind fastmeta's large CPU outputs."""

import os

import torch

from fastmeta import _extension

POOL_ENV = "FASTMETA_CPU_POOL_MB"
MAX_POOL_MIB = 1 << 30  # 1 PiB: the C++ side keeps the limit in bytes, in a size_t


def check_pool_setting() -> None:
    """Raises ValueError unless FASTMETA_CPU_POOL_MB is unset or a whole number of MiB
    in [0, 2**30] (the C++ pool read anything else silently as 1024). Run at import."""
    text = os.environ.get(POOL_ENV)
    if text is None:
        return
    if not text.strip().isdigit() or int(text) > MAX_POOL_MIB:
        raise ValueError(
            f"{POOL_ENV} must be a whole number of MiB in [0, {MAX_POOL_MIB}], got {text!r}"
        )


def empty_cpu_cache() -> int:
    """Frees the idle buffers that fastmeta's CPU kernels keep for reuse.

    Large CPU outputs (1 MiB and up) come from a pool of freed buffers, so a
    training loop does not pay page faults for fresh memory every step. The pool
    holds at most FASTMETA_CPU_POOL_MB (default 1024) MiB of idle buffers; this
    returns them to the system. Returns the bytes freed (0 without fastmeta._C).
    """
    return int(torch.ops.fastmeta_C.empty_cpu_pool()) if _extension.LOADED else 0
