"""Loads the compiled kernels (fastmeta._C) if they were built; never raises.

LOADED: the library imported and registered the `torch.ops.fastmeta_C` kernels.
WITH_CUDA: it was compiled with the CUDA kernels.
LOAD_ERROR: why it did not load (None when it did).
"""

LOADED = False
WITH_CUDA = False
LOAD_ERROR = None

try:
    from fastmeta import _C  # noqa: F401  (registers torch.ops.fastmeta_C.*)

    LOADED = True
    WITH_CUDA = bool(_C.WITH_CUDA)
except (ImportError, OSError) as error:  # not built, or built against another torch
    LOAD_ERROR = f"{type(error).__name__}: {error}"
