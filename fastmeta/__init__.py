"""fastmeta: fused Triton and C++/CUDA kernels for meta-learning.

    import fastmeta
    print(fastmeta.backends())          # what was built, what runs here
    out = fastmeta.inner_update(theta, 0.4, grads)   # [P], lr, [T, P] -> [T, P]
    with fastmeta.use_backend("reference"):          # force a backend
        ...
"""

from fastmeta.backend import (
    BACKENDS,
    BackendUnavailableError,
    backends,
    empty_cpu_cache,
    last_backend,
    use_backend,
)
from fastmeta.ops import inner_update

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backends",
    "empty_cpu_cache",
    "inner_update",
    "last_backend",
    "use_backend",
]
