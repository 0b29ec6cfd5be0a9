"""The pool of reusable buffers behind fastmeta's large CPU outputs."""

import torch

from fastmeta import _extension


def empty_cpu_cache() -> int:
    """Frees the idle buffers that fastmeta's CPU kernels keep for reuse.

    Large CPU outputs (1 MiB and up) come from a pool of freed buffers, so a
    training loop does not pay page faults for fresh memory every step. The pool
    holds at most FASTMETA_CPU_POOL_MB (default 1024) MiB of idle buffers; this
    returns them to the system. Returns the bytes freed (0 without fastmeta._C).
    """
    return int(torch.ops.fastmeta_C.empty_cpu_pool()) if _extension.LOADED else 0
