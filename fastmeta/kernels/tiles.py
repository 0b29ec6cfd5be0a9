"""Triton helpers shared by the kernel modules: program coordinates in a 1-D grid,
float32 tiles of row-major matrices, tl.dot at the precision torch's float32 matmul
setting allows, and (host side) the tile sizes.

Index arithmetic: sizes and loop indices are int32 (a size argument of 1 is even a
compile-time constant), so every product that can pass 2**31 (a batch or row index
times a row size, a loop index times a matrix size) starts from an int64 factor:
a program id `.to(tl.int64)`, `tl.cast(size, tl.int64)` (which also takes constants
and the interpreter's Python-int loop indices), or `offsets` below."""

import torch
import triton
import triton.language as tl

from fastmeta.kernels.interpreter import triton_interpreter


def tile_size(n: int, gpu: int, interpreter: int, least: int = 16) -> int:
    """Power-of-two tile for an extent n, in [least, cap]; least 16 is tl.dot's minimum.
    cap is `gpu`, or `interpreter` under the Triton interpreter, which runs one program
    at a time in numpy: few, wide programs."""
    cap = interpreter if triton_interpreter() else gpu
    return max(least, min(triton.next_power_of_2(max(n, 1)), cap))


def query_class_launch(queries, prototypes, interpreter_cap: int):
    """What a kernel with one program per (episode, query tile, class tile) needs, for
    queries [B, M, D] and prototypes [B, C, D]: both contiguous, the output [B, M, C]
    (uninitialized), the 1-D grid (0 programs when the output is empty), the sizes
    (M, C, D) and the tiles {BLOCK_M, BLOCK_C, BLOCK_D} (64, 64, 32 on a GPU; M and C
    tiles up to interpreter_cap under the interpreter)."""
    queries, prototypes = queries.contiguous(), prototypes.contiguous()
    B, M, D = queries.shape
    C = prototypes.shape[1]
    out = queries.new_empty(B, M, C)
    blocks = dict(
        BLOCK_M=tile_size(M, 64, interpreter_cap),
        BLOCK_C=tile_size(C, 64, interpreter_cap),
        BLOCK_D=tile_size(D, 32, 128),
    )
    programs = B * triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(C, blocks["BLOCK_C"])
    return queries, prototypes, out, (programs if out.numel() else 0,), (M, C, D), blocks


def dot_precision(t: torch.Tensor) -> str:
    """tl.dot's input precision for GEMMs on t's device: "tf32" (tensor cores, ~1e-3
    relative error) exactly where torch.get_float32_matmul_precision() lets float32
    matmuls use TF32 on a GPU, as cuBLAS does for torch.matmul; else "ieee"."""
    allowed = t.is_cuda and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b on float32 tiles, with products of PRECISION ("ieee" or "tf32": the
    launcher's dot_precision; class_prototypes' one-hot GEMM is always "ieee", exact)."""
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def program_coords(n_i, n_j):
    """(outer index as int64, tile i, tile j) of this program in a 1-D grid of
    outer * n_i * n_j programs. One grid axis: the y and z axes of a CUDA grid stop
    at 65535."""
    pid = tl.program_id(0)
    return (pid // (n_i * n_j)).to(tl.int64), (pid // n_j) % n_i, pid % n_j


@triton.jit
def offsets(rows, cols, ld):
    """int64 offsets [rows, cols] into a row-major matrix with leading dimension ld."""
    return rows.to(tl.int64)[:, None] * ld + cols[None, :]


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols):
    """Tile [rows, cols] of a row-major [n_rows, n_cols] float matrix, 0 outside it."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + offsets(rows, cols, n_cols), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, value, rows, cols, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + offsets(rows, cols, n_cols), value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def gram_tile(q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """q . c [rows, cls] (PRECISION products), ||q||^2 [rows], ||c||^2 [cls] (q [M, D],
    c [C, D]; 0 outside)."""
    qc = tl.zeros((rows.shape[0], cls.shape[0]), dtype=tl.float32)
    qn = tl.zeros((rows.shape[0],), dtype=tl.float32)
    cn = tl.zeros((cls.shape[0],), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        q = load_tile(q_ptr, rows, ds, M, D)
        c = load_tile(c_ptr, cls, ds, C, D)
        qc = dot(q, tl.trans(c), qc, PRECISION)
        qn += tl.sum(q * q, axis=1)
        cn += tl.sum(c * c, axis=1)
    return qc, qn, cn
