"""0-d tensors of Python scalars (tau, a learning rate), made once per (value, dtype,
device) and reused: `torch.full`, not `torch.tensor`, so no host-to-device copy (and
nothing that breaks CUDA graph capture); reused, so a training step does not allocate
and fill one per call. The ops only read these tensors."""

import torch

_MAX_CACHED = 256
_cache: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def scalar_tensor(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d tensor holding float(value) (shared: do not modify it)."""
    key = (float(value), dtype, device)
    found = _cache.get(key)
    if found is None:
        if len(_cache) >= _MAX_CACHED:  # a value annealed every step: start over
            _cache.clear()
        found = _cache[key] = torch.full((), key[0], dtype=dtype, device=device)
    return found
