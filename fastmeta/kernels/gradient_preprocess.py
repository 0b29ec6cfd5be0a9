"""The gradient preprocessing of Meta Networks' generators in Triton, shared by the
gradient_mlp and gradient_lstm kernels (the math: fastmeta.ops.gradient_mlp.preprocess;
the C++ twin: csrc/cpu/gradient_preprocess.h)."""

import math

import triton
import triton.language as tl


@triton.jit
def preprocess(g, p, threshold, e_p):
    """(u0, u1, small) of gradient coordinates g (gradient_mlp.preprocess)."""
    magnitude = tl.abs(g)
    small = magnitude < threshold
    # NaN stays NaN (as in the reference): maximum and relu propagate it
    clamped = tl.maximum(magnitude, threshold, propagate_nan=tl.PropagateNan.ALL)
    u0 = tl.where(small, -1.0, tl.log(clamped) / p)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    u1 = tl.where(small, e_p * g, sign)
    return u0, u1, small


@triton.jit
def preprocess_backward(du0, du1, g, small, p, e_p):
    """d_g from the gradient (du0, du1) w.r.t. preprocess(g)."""
    safe = tl.where(small, 1.0, g)
    return tl.where(small, du1 * e_p, du0 / (p * safe))


def preprocess_scalars(p: float) -> tuple[float, float, float]:
    """(p, e^-p, e^p): the preprocessing's constants, as the kernels take them."""
    return float(p), math.exp(-p), math.exp(p)
