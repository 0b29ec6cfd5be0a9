"""Cosine similarities between queries and class prototypes, Triton kernel (the forward
only; the backward is plain differentiable torch ops in the Python layer).

Shapes: queries Q [B, M, D], prototypes C [B, C, D] -> s [B, M, C], with
    s[b, m, k] = (q_bm . c_bk) / (max(||q_bm||, eps) max(||c_bk||, eps)).
float32 in, float32 accumulation.

One fused kernel, program (episode b, M tile, C tile) in a 1-D grid decoded by
tiles.program_coords (b as int64, so every per-episode offset b * rows * cols is int64).
One loop over D tiles (tiles.gram_tile) accumulates q . c (tl.dot, ieee), ||q||^2 and
||c||^2 from the same loaded tiles; then s = (q . c) / max(||q||, eps) / max(||c||, eps)
for the tile: one reciprocal per row and per class, one multiply per entry. Each norm is clamped,
not its square, so a row of norm below eps is divided by eps and a zero row gives
exactly 0 (0 * 1/eps), never NaN; a NaN norm stays NaN (as torch's clamp_min).
Every entry has one writer and a fixed summation order: deterministic.

Tiles are powers of two, at least 16 (tl.dot's minimum; masks pad small M, C, D). On a
GPU BLOCK_M = BLOCK_C = 64 and BLOCK_D = 32 (untuned, as squared_distances); under the
interpreter, which runs one program at a time in numpy, up to 128 wide, so
M=129, C=65, D=257 takes 2 programs per episode and 3 D steps.
"""

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch import launches_on_input_device
from fastmeta.kernels.tiles import (
    dot_precision,
    gram_tile,
    program_coords,
    query_class_launch,
    store_tile,
)


@triton.jit
def _inverse_clamped_norm(squared, eps):
    """1 / max(sqrt(squared), eps), elementwise; NaN stays NaN (tl.maximum may drop it)."""
    norm = tl.sqrt(squared)
    return 1.0 / tl.where(norm < eps, eps, norm)


@triton.jit
def _cosine_similarities_kernel(
    q_ptr,
    c_ptr,
    out_ptr,
    eps,
    M,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, i, j = program_coords(tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_C))
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cls = j * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ptr += b * M * D
    c_ptr += b * C * D
    qc, qn, cn = gram_tile(q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_D, PRECISION)
    sim = (qc * _inverse_clamped_norm(qn, eps)[:, None]) * _inverse_clamped_norm(cn, eps)[None, :]
    store_tile(out_ptr + b * M * C, sim, rows, cls, M, C)


@launches_on_input_device
def cosine_similarities_forward(
    queries: torch.Tensor, prototypes: torch.Tensor, eps: float
) -> torch.Tensor:
    """queries [B, M, D], prototypes [B, C, D] (float32, one device), eps > 0
    -> s [B, M, C], s = q . c / (max(||q||, eps) max(||c||, eps))."""
    queries, prototypes, out, grid, sizes, blocks = query_class_launch(queries, prototypes, 128)
    if grid[0]:
        _cosine_similarities_kernel[grid](
            queries, prototypes, out, float(eps), *sizes, **blocks, PRECISION=dot_precision(queries)
        )
    return out
