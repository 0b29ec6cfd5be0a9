"""Batched inner-loop update, Triton kernels (see fastmeta/ops/inner_update.py).

forward : grid (P blocks, tasks); out[t, p] = theta[p] - alpha * g[t, p].
backward: grid (P blocks,); each program loops over the T tasks and reduces
          d_theta (and a [P] d_alpha) in registers, in order. A scalar d_alpha is
          reduced per program into partials[programs], then summed in float64 by
          torch.sum: deterministic, no atomics.
alpha kinds: 0 scalar [], 1 per element [P], 2 per task and element [T, P].
Offsets are int64 (p up to P, t * P + p up to T * P: either may pass 2**31).
"""

import torch
import triton
import triton.language as tl

from fastmeta.kernels.interpreter import triton_interpreter
from fastmeta.kernels.launch import launches_on_input_device

_MAX_GRID_Y = 65535


@triton.jit
def _load_alpha(alpha_ptr, offs, row, mask, ALPHA_KIND: tl.constexpr, ACC: tl.constexpr):
    if ALPHA_KIND == 0:
        a = tl.load(alpha_ptr).to(ACC)
    elif ALPHA_KIND == 1:
        a = tl.load(alpha_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        a = tl.load(alpha_ptr + row, mask=mask, other=0.0).to(ACC)
    return a


@triton.jit
def _forward_kernel(
    theta_ptr,
    alpha_ptr,
    g_ptr,
    out_ptr,
    T,
    P,
    ALPHA_KIND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 offsets: P and T * P may pass 2**31
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
    row = tl.program_id(1).to(tl.int64) * P + offs
    row_step = tl.num_programs(1).to(tl.int64) * P
    for _ in range(tl.program_id(1), T, tl.num_programs(1)):
        a = _load_alpha(alpha_ptr, offs, row, mask, ALPHA_KIND, ACC)
        g = tl.load(g_ptr + row, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + row, (theta - a * g).to(out_ptr.dtype.element_ty), mask=mask)
        row += row_step


@triton.jit
def _backward_kernel(
    go_ptr,
    alpha_ptr,
    g_ptr,
    d_theta_ptr,
    d_g_ptr,
    d_alpha_ptr,
    partials_ptr,
    T,
    P,
    ALPHA_KIND: tl.constexpr,
    NEED_G: tl.constexpr,
    NEED_ALPHA: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    sum_go = tl.zeros([BLOCK], dtype=ACC)
    sum_g_go = tl.zeros([BLOCK], dtype=ACC)
    row = offs
    for _ in range(0, T):
        go = tl.load(go_ptr + row, mask=mask, other=0.0).to(ACC)
        sum_go += go
        if NEED_G:
            a = _load_alpha(alpha_ptr, offs, row, mask, ALPHA_KIND, ACC)
            tl.store(d_g_ptr + row, (-a * go).to(d_g_ptr.dtype.element_ty), mask=mask)
        if NEED_ALPHA:
            prod = tl.load(g_ptr + row, mask=mask, other=0.0).to(ACC) * go
            if ALPHA_KIND == 2:
                tl.store(d_alpha_ptr + row, (-prod).to(d_alpha_ptr.dtype.element_ty), mask=mask)
            else:
                sum_g_go += prod
        row += P
    tl.store(d_theta_ptr + offs, sum_go.to(d_theta_ptr.dtype.element_ty), mask=mask)
    if NEED_ALPHA:
        if ALPHA_KIND == 1:
            tl.store(d_alpha_ptr + offs, (-sum_g_go).to(d_alpha_ptr.dtype.element_ty), mask=mask)
        if ALPHA_KIND == 0:
            tl.store(partials_ptr + tl.program_id(0), tl.sum(sum_g_go, axis=0))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(P: int, gpu_block: int) -> int:
    # The interpreter runs one program at a time in numpy: few, wide programs.
    if triton_interpreter():
        return triton.next_power_of_2(max(1, min(P, 1 << 16)))
    return gpu_block


def _alpha_kind(alpha: torch.Tensor) -> int:
    return alpha.dim()  # 0: [], 1: [P], 2: [T, P] (shapes checked by the op)


@launches_on_input_device
def inner_update_forward(theta: torch.Tensor, alpha: torch.Tensor, g: torch.Tensor):
    """theta [P], alpha [] / [P] / [T, P], g [T, P] -> out [T, P]."""
    theta, alpha, g = theta.contiguous(), alpha.contiguous(), g.contiguous()
    T, P = g.shape
    out = torch.empty_like(g)
    if T == 0 or P == 0:
        return out
    block = _block(P, 1024)
    grid = (triton.cdiv(P, block), min(T, _MAX_GRID_Y))
    _forward_kernel[grid](
        theta,
        alpha,
        g,
        out,
        T,
        P,
        ALPHA_KIND=_alpha_kind(alpha),
        ACC=_acc_dtype(g.dtype),
        BLOCK=block,
    )
    return out


@launches_on_input_device
def inner_update_backward(grad_out, alpha, g, need_g: bool, need_alpha: bool):
    """grad_out [T, P] -> (d_theta [P], d_g [T, P] or empty, d_alpha like alpha or empty)."""
    grad_out, alpha, g = grad_out.contiguous(), alpha.contiguous(), g.contiguous()
    T, P = g.shape
    d_theta = g.new_empty(P)
    d_g = torch.empty_like(g) if need_g else g.new_empty(0)
    d_alpha = torch.empty_like(alpha) if need_alpha and alpha.dim() > 0 else g.new_empty(0)
    block = _block(P, 512)
    programs = max(1, triton.cdiv(P, block))
    acc = _acc_dtype(g.dtype)
    reduce_scalar = need_alpha and alpha.dim() == 0
    partials = torch.zeros(
        programs if reduce_scalar else 0,
        device=g.device,
        dtype=torch.float64 if acc == tl.float64 else torch.float32,
    )
    _backward_kernel[(programs,)](
        grad_out,
        alpha,
        g,
        d_theta,
        d_g if need_g else g,
        d_alpha if need_alpha else g,
        partials if reduce_scalar else g,
        T,
        P,
        ALPHA_KIND=_alpha_kind(alpha),
        NEED_G=need_g,
        NEED_ALPHA=need_alpha,
        ACC=acc,
        BLOCK=block,
    )
    if reduce_scalar:
        d_alpha = (-partials.double().sum()).to(alpha.dtype)
    return d_theta, d_g, d_alpha
