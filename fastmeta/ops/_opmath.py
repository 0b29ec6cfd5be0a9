"""The math dtype of reference computations: float16 and bfloat16 inputs are computed
in float32 (like the kernels' accumulators) and results cast back. In half
precision, ||q||^2 + ||c||^2 - 2 q.c cancels badly and ||c||^2 overflows float16."""

import torch

_HALF = (torch.float16, torch.bfloat16)


def opmath(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() if t.dtype in _HALF else t for t in tensors)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16, else dtype: the dtype of the intermediates the
    ProtoNet ops save for their backward (the cross-entropy's softmax, the loss's
    prototypes), so the backward does not start from half-precision rounding (the
    softmax's would be amplified in G = softmax - onehot)."""
    return torch.promote_types(dtype, torch.float32)
