"""Whether Triton kernels run compiled or in Triton's CPU interpreter, and which Triton
is installed (without importing it when it is absent)."""

import functools
import importlib.util
import os


def triton_interpreter() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_version() -> str | None:
    """The installed Triton's version, None without Triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__
