"""Triton helpers shared by the kernel modules: float32 tiles of row-major matrices
and the ieee-precision tl.dot."""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc):
    # ieee float32 products: matches the float64 references tightly (and the one-hot GEMM
    # of class_prototypes must stay exact). On a GPU, "tf32" would run the distance, logit
    # and memory-read GEMMs faster at ~1e-3 relative error; kept at ieee for now.
    return tl.dot(a, b, acc, input_precision="ieee")


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
