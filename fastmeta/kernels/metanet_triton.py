"""Meta Networks Triton kernels (math in fastmeta/ops/gradient_mlp.py and
fastmeta/ops/attention_read.py).

gradient_mlp forward : program per BLOCK coordinates; the hidden layer is a
    [BLOCK, BLOCK_H] tile in registers.
gradient_mlp backward: the same tile recomputed; d_grads stored per coordinate; each
    program reduces its parameter gradients into one row of partials [5, BLOCK_H]
    (d_w1[:, 0], d_w1[:, 1], d_b1, d_w2, d_b2), summed in float64 by torch: no atomics.
attention_read forward: program (b, j, L tile, O tile); over K tiles the mixed weight
    tile sum_i a_ji W_i [BLOCK_O, BLOCK_K] is built in registers, then
    acc += x_tile @ mixed^T (tl.dot).
attention_read backward:
    d_x: the same kernel, program (b, j, L tile, K tile); over O tiles
    acc += dout_tile @ mixed_tile.
    d_attention, d_W: program (b, O tile, K tile); for each query j, G = dout_j^T x_j
    on the tile (over L tiles), then for each i: a partial <W_i, G> of d_attention
    (summed over tiles by torch) and d_W_i += a_ji G (this program owns the tile).
Tiles are powers of two of at least 16 (tl.dot's minimum); masks pad the rest.
"""

import math

import torch
import triton
import triton.language as tl

from fastmeta.backend import triton_interpreter
from fastmeta.kernels.tiles import dot, load_tile, offsets, store_tile


@triton.jit
def _hidden_tile(g_ptr, w1_ptr, b1_ptr, offs, n, H, p, threshold, e_p, BLOCK_H: tl.constexpr):
    """(g, u0, u1, small, s [BLOCK, BLOCK_H], w1 columns, h index mask)."""
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < H
    w10 = tl.load(w1_ptr + 2 * hs, mask=hmask, other=0.0).to(tl.float32)
    w11 = tl.load(w1_ptr + 2 * hs + 1, mask=hmask, other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
    magnitude = tl.abs(g)
    small = magnitude < threshold
    u0 = tl.where(small, -1.0, tl.log(tl.maximum(magnitude, threshold)) / p)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    u1 = tl.where(small, e_p * g, sign)
    s = u0[:, None] * w10[None, :] + u1[:, None] * w11[None, :] + b1[None, :]
    return g, u0, u1, small, s, w10, w11, hs, hmask


@triton.jit
def _gradient_mlp_forward_kernel(g_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, n, H, p,
                                 threshold, e_p, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _, _, _, _, s, _, _, hs, hmask = _hidden_tile(g_ptr, w1_ptr, b1_ptr, offs, n, H, p,
                                                  threshold, e_p, BLOCK_H)
    w2 = tl.load(w2_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
    y = tl.sum(tl.maximum(s, 0.0) * w2[None, :], axis=1) + tl.load(b2_ptr).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _gradient_mlp_backward_kernel(dy_ptr, g_ptr, w1_ptr, b1_ptr, w2_ptr, dg_ptr, partials_ptr,
                                  n, H, p, threshold, e_p, NEED_GRADS: tl.constexpr,
                                  BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g, u0, u1, small, s, w10, w11, hs, hmask = _hidden_tile(g_ptr, w1_ptr, b1_ptr, offs, n, H,
                                                            p, threshold, e_p, BLOCK_H)
    dy = tl.load(dy_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
    active = s > 0
    dh = tl.where(active, dy[:, None] * w2[None, :], 0.0)
    row = partials_ptr + tl.program_id(0).to(tl.int64) * 5 * BLOCK_H + hs
    tl.store(row, tl.sum(dh * u0[:, None], axis=0))
    tl.store(row + BLOCK_H, tl.sum(dh * u1[:, None], axis=0))
    tl.store(row + 2 * BLOCK_H, tl.sum(dh, axis=0))
    tl.store(row + 3 * BLOCK_H, tl.sum(tl.where(active, dy[:, None] * s, 0.0), axis=0))
    tl.store(row + 4 * BLOCK_H, tl.where(hs == 0, tl.sum(dy, axis=0), 0.0))
    if NEED_GRADS:
        du0 = tl.sum(dh * w10[None, :], axis=1)
        du1 = tl.sum(dh * w11[None, :], axis=1)
        safe = tl.where(small, 1.0, g)
        dg = tl.where(small, du1 * e_p, du0 / (p * safe))
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=offs < n)


def _coordinate_block(n: int) -> int:
    # The interpreter runs one program at a time in numpy: few, wide programs.
    if triton_interpreter():
        return triton.next_power_of_2(max(16, min(n, 1 << 14)))
    return 256


def _scalars(p: float):
    return float(p), math.exp(-p), math.exp(p)


def gradient_mlp_forward(grads, w1, b1, w2, b2, p):
    grads = grads.contiguous()
    out = torch.empty_like(grads)
    n, H = grads.numel(), w1.shape[0]
    if n == 0:
        return out
    block = _coordinate_block(n)
    _gradient_mlp_forward_kernel[(triton.cdiv(n, block),)](
        grads, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2, out, n, H, *_scalars(p),
        BLOCK=block, BLOCK_H=triton.next_power_of_2(H))
    return out


def gradient_mlp_backward(grad_out, grads, w1, b1, w2, p, need_grads):
    grads, grad_out = grads.contiguous(), grad_out.contiguous()
    n, H = grads.numel(), w1.shape[0]
    block, block_h = _coordinate_block(n), triton.next_power_of_2(H)
    programs = triton.cdiv(n, block)
    partials = torch.empty(programs, 5, block_h, device=grads.device, dtype=torch.float32)
    d_grads = torch.empty_like(grads) if need_grads else grads.new_empty(0)
    if n:
        _gradient_mlp_backward_kernel[(programs,)](
            grad_out, grads, w1.contiguous(), b1.contiguous(), w2.contiguous(),
            d_grads if need_grads else grads, partials, n, H, *_scalars(p),
            NEED_GRADS=need_grads, BLOCK=block, BLOCK_H=block_h)
    sums = partials.double().sum(0)[:, :H].to(grads.dtype)  # [5, H]
    return (d_grads, sums[:2].T.contiguous(), sums[2].clone(), sums[3].clone(),
            sums[4, 0].clone())


@triton.jit
def _mixed_tile(a_ptr, w_ptr, os, ks, O, K, N, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_i a[i] W[i, os, ks] [BLOCK_O, BLOCK_K]; a_ptr: this query's row, w_ptr: W[b]."""
    mask = (os[:, None] < O) & (ks[None, :] < K)
    at = offsets(os, ks, K)
    mixed = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)
    for i in range(N):
        a = tl.load(a_ptr + i).to(tl.float32)
        mixed += a * tl.load(w_ptr + i * O * K + at, mask=mask, other=0.0).to(tl.float32)
    return mixed


@triton.jit
def _apply_mixed_kernel(rows_ptr, a_ptr, w_ptr, out_ptr, M, N, O, K, L, OUT_IS_O: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[b, j] = rows[b, j] @ W*_j^T (OUT_IS_O: rows x [L, K] -> [L, O], the forward)
    or rows[b, j] @ W*_j (rows dout [L, O] -> d_x [L, K]); program (b * M + j, L tile,
    output-column tile), reducing over the other dimension in BLOCK_R tiles."""
    query = tl.program_id(0).to(tl.int64)  # b * M + j
    b = query // M
    R = K if OUT_IS_O else O
    C = O if OUT_IS_O else K
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        if OUT_IS_O:
            mixed = tl.trans(_mixed_tile(a_ptr + query * N, w_ptr + b * N * O * K, cs, rs, O,
                                         K, N, BLOCK_C, BLOCK_R))
        else:
            mixed = _mixed_tile(a_ptr + query * N, w_ptr + b * N * O * K, rs, cs, O, K, N,
                                BLOCK_R, BLOCK_C)
        acc = dot(load_tile(rows_ptr + query * L * R, ls, rs, L, R), mixed, acc)
    store_tile(out_ptr + query * L * C, acc, ls, cs, L, C)


@triton.jit
def _read_da_dw_kernel(go_ptr, a_ptr, w_ptr, x_ptr, da_partials_ptr, dw_ptr, M, N, O, K, L,
                       n_tiles_k, NEED_ATTENTION: tl.constexpr, NEED_W: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1) * n_tiles_k + tl.program_id(2)
    n_tiles = tl.num_programs(1) * n_tiles_k
    os = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (os[:, None] < O) & (ks[None, :] < K)
    at = offsets(os, ks, K)
    for j in range(M):
        query = b * M + j
        g = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)  # dout_j^T x_j on this tile
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            go = load_tile(go_ptr + query * L * O, ls, os, L, O)
            g = dot(tl.trans(go), load_tile(x_ptr + query * L * K, ls, ks, L, K), g)
        for i in range(N):
            w_at = w_ptr + (b * N + i) * O * K + at
            if NEED_ATTENTION:
                w = tl.load(w_at, mask=mask, other=0.0).to(tl.float32)
                tl.store(da_partials_ptr + (query * N + i) * n_tiles + tile, tl.sum(tl.sum(
                    w * g, axis=1), axis=0))
            if NEED_W:
                a = tl.load(a_ptr + query * N + i).to(tl.float32)
                dw_at = dw_ptr + (b * N + i) * O * K + at
                old = tl.load(dw_at, mask=mask, other=0.0)
                tl.store(dw_at, old + a * g, mask=mask)


def _tiles(L: int, O: int, K: int) -> tuple[int, int, int]:
    cap = 64 if not triton_interpreter() else 128
    return tuple(max(16, min(cap, triton.next_power_of_2(n))) for n in (L, O, K))


def attention_read_forward(attention, fast_weights, x):
    attention, fast_weights, x = (t.contiguous() for t in (attention, fast_weights, x))
    B, M, N = attention.shape
    O, K, L = fast_weights.shape[2], fast_weights.shape[3], x.shape[2]
    out = x.new_empty(B, M, L, O)
    if out.numel() == 0:
        return out
    bl, bo, bk = _tiles(L, O, K)
    _apply_mixed_kernel[(B * M, triton.cdiv(L, bl), triton.cdiv(O, bo))](
        x, attention, fast_weights, out, M, N, O, K, L, OUT_IS_O=True, BLOCK_L=bl, BLOCK_C=bo,
        BLOCK_R=bk)
    return out


def attention_read_backward(grad_out, attention, fast_weights, x, need_attention, need_weights,
                            need_x):
    grad_out, attention, fast_weights, x = (t.contiguous() for t in
                                            (grad_out, attention, fast_weights, x))
    B, M, N = attention.shape
    O, K, L = fast_weights.shape[2], fast_weights.shape[3], x.shape[2]
    bl, bo, bk = _tiles(L, O, K)
    d_x = torch.empty_like(x) if need_x else x.new_empty(0)
    if need_x and d_x.numel():
        _apply_mixed_kernel[(B * M, triton.cdiv(L, bl), triton.cdiv(K, bk))](
            grad_out, attention, fast_weights, d_x, M, N, O, K, L, OUT_IS_O=False, BLOCK_L=bl,
            BLOCK_C=bk, BLOCK_R=bo)
    d_attention, d_w = x.new_empty(0), x.new_empty(0)
    if need_attention or need_weights:
        tiles_o, tiles_k = triton.cdiv(O, bo), triton.cdiv(K, bk)
        partials = torch.zeros(B, M, N, tiles_o * tiles_k, device=x.device, dtype=torch.float32)
        d_w = torch.zeros_like(fast_weights, dtype=torch.float32)
        if B * M * N and O * K:
            _read_da_dw_kernel[(B, tiles_o, tiles_k)](
                grad_out, attention, fast_weights, x, partials, d_w, M, N, O, K, L, tiles_k,
                NEED_ATTENTION=need_attention, NEED_W=need_weights, BLOCK_L=bl, BLOCK_O=bo,
                BLOCK_K=bk)
        d_attention = partials.sum(-1).to(x.dtype) if need_attention else x.new_empty(0)
        d_w = d_w.to(x.dtype) if need_weights else x.new_empty(0)
    return d_attention, d_w, d_x
