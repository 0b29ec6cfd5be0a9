"""The math dtype of reference computations: float16 and bfloat16 inputs are computed
in float32 (like the kernels' accumulators) and results cast back. In half
precision, ||q||^2 + ||c||^2 - 2 q.c cancels badly and ||c||^2 overflows float16."""

import torch

_HALF = (torch.float16, torch.bfloat16)


def opmath(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() if t.dtype in _HALF else t for t in tensors)
