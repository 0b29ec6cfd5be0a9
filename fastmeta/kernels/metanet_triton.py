"""Meta Networks Triton kernels (math in fastmeta/ops/gradient_mlp.py and
fastmeta/ops/attention_read.py).

gradient_mlp forward : program per BLOCK coordinates; the hidden layer is a
    [BLOCK, BLOCK_H] tile in registers.
gradient_mlp backward: the same tile recomputed; d_grads stored per coordinate; each
    program reduces its parameter gradients into one row of partials [5, BLOCK_H]
    (d_w1[:, 0], d_w1[:, 1], d_b1, d_w2, d_b2), summed in float64 by torch: no atomics.

attention_read: attention a [B, M, N], fast weights W [B, N, O, K], x [B, M, L, K],
out [B, M, L, O]; query j of episode b reads W*_j = sum_i a_ji W_i [O, K].
forward: out_j = x_j W*_j^T; program (b * M + j, L tile, O tile); over K tiles the
    mixed tile sum_i a_ji W_i [BLOCK_O, BLOCK_K] is built in registers, then
    acc += x_tile @ mixed^T (tl.dot).
backward, with dout [B, M, L, O] and G_j = dout_j^T x_j [O, K]:
    d_x_j = dout_j W*_j: the forward's kernel on dout, program (b * M + j, L tile,
        K tile); over O tiles acc += dout_tile @ mixed_tile.
    d_attention[b, j, i] = <W_i, G_j>: program (b * M + j, O tile, K tile) forms G_j's
        tile once in registers (tl.dot over L tiles), then for each i stores the
        tile's part of <W_i, G_j> to partials [B, M, N, tiles]; torch sums the tiles.
    d_W_i = sum_j a_ji G_j: program (b * N + i, O tile, K tile); over the M L rows
        r = j L + l of dout[b] [M L, O] and x[b] [M L, K] (one GEMM),
        acc += (a_{r // L, i} dout_r)^T x_r (tl.dot), stored once.
    Every output element has one writer (no atomics, no read-modify-write of global
    memory) and a fixed summation order: deterministic. The price: d_W's GEMM redoes
    the G_j products for every i, B N M L O K multiply-adds where forming each G_j once
    takes B M L O K (but needs a [B, M, O, K] buffer or a read-modify-write of d_W).
Grids are 1-D (tiles.program_coords); the outer index b * M + j or b * N + i is
int64, and so is every offset built from it. Tiles are powers of two of at least 16
(tl.dot's minimum); masks pad the rest.
"""

import torch
import triton
import triton.language as tl

from fastmeta.kernels.gradient_preprocess import (
    preprocess,
    preprocess_backward,
    preprocess_scalars,
)
from fastmeta.kernels.interpreter import triton_interpreter
from fastmeta.kernels.launch import launches_on_input_device
from fastmeta.kernels.tiles import (
    dot,
    dot_precision,
    load_tile,
    program_coords,
    store_tile,
    tile_size,
)


@triton.jit
def _hidden_tile(g_ptr, w1_ptr, b1_ptr, offs, n, H, p, threshold, e_p, BLOCK_H: tl.constexpr):
    """(g, u0, u1, small, s [BLOCK, BLOCK_H], w1 columns, h index mask)."""
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < H
    w10 = tl.load(w1_ptr + 2 * hs, mask=hmask, other=0.0).to(tl.float32)
    w11 = tl.load(w1_ptr + 2 * hs + 1, mask=hmask, other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
    u0, u1, small = preprocess(g, p, threshold, e_p)
    s = u0[:, None] * w10[None, :] + u1[:, None] * w11[None, :] + b1[None, :]
    s = tl.where(hmask[None, :], s, 0.0)  # a padded unit is closed (not inf * 0 = NaN)
    return g, u0, u1, small, s, w10, w11, hs, hmask


@triton.jit
def _gradient_mlp_forward_kernel(
    g_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    out_ptr,
    n,
    H,
    p,
    threshold,
    e_p,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _, _, _, _, s, _, _, hs, hmask = _hidden_tile(
        g_ptr, w1_ptr, b1_ptr, offs, n, H, p, threshold, e_p, BLOCK_H
    )
    w2 = tl.load(w2_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
    relu = tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    y = tl.sum(relu * w2[None, :], axis=1) + tl.load(b2_ptr).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _gradient_mlp_backward_kernel(
    dy_ptr,
    g_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    dg_ptr,
    partials_ptr,
    n,
    H,
    p,
    threshold,
    e_p,
    NEED_GRADS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g, u0, u1, small, s, w10, w11, hs, hmask = _hidden_tile(
        g_ptr, w1_ptr, b1_ptr, offs, n, H, p, threshold, e_p, BLOCK_H
    )
    dy = tl.load(dy_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
    # relu's backward as torch's: a NaN s passes, a closed unit (or a row past n)
    # passes exactly 0, even of an infinite w2
    active = ~(s <= 0) & (offs < n)[:, None]
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
        dg = preprocess_backward(du0, du1, g, small, p, e_p)
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=offs < n)


def _coordinate_block(n: int) -> int:
    # The interpreter runs one program at a time in numpy: few, wide programs.
    if triton_interpreter():
        return triton.next_power_of_2(max(16, min(n, 1 << 14)))
    return 256


@launches_on_input_device
def gradient_mlp_forward(grads, w1, b1, w2, b2, p):
    grads = grads.contiguous()
    out = torch.empty_like(grads)
    n, H = grads.numel(), w1.shape[0]
    if n == 0:
        return out
    block = _coordinate_block(n)
    _gradient_mlp_forward_kernel[(triton.cdiv(n, block),)](
        grads,
        w1.contiguous(),
        b1.contiguous(),
        w2.contiguous(),
        b2,
        out,
        n,
        H,
        *preprocess_scalars(p),
        BLOCK=block,
        BLOCK_H=triton.next_power_of_2(H),
    )
    return out


@launches_on_input_device
def gradient_mlp_backward(grad_out, grads, w1, b1, w2, p, need_grads):
    grads, grad_out = grads.contiguous(), grad_out.contiguous()
    n, H = grads.numel(), w1.shape[0]
    block, block_h = _coordinate_block(n), triton.next_power_of_2(H)
    programs = triton.cdiv(n, block)
    partials = torch.empty(programs, 5, block_h, device=grads.device, dtype=torch.float32)
    d_grads = torch.empty_like(grads) if need_grads else grads.new_empty(0)
    if n:
        _gradient_mlp_backward_kernel[(programs,)](
            grad_out,
            grads,
            w1.contiguous(),
            b1.contiguous(),
            w2.contiguous(),
            d_grads if need_grads else grads,
            partials,
            n,
            H,
            *preprocess_scalars(p),
            NEED_GRADS=need_grads,
            BLOCK=block,
            BLOCK_H=block_h,
        )
    sums = partials.double().sum(0)[:, :H].to(grads.dtype)  # [5, H]
    return (d_grads, sums[:2].T.contiguous(), sums[2].clone(), sums[3].clone(), sums[4, 0].clone())


@triton.jit
def _mixed_tile(a_ptr, w_ptr, os, ks, O, K, N):
    """sum_i a[i] W[i, os, ks] [len(os), len(ks)]; a_ptr: this query's row of a [N],
    w_ptr: W[b] [N, O, K]."""
    step = tl.cast(O, tl.int64) * K  # int64: i O K passes 2**31 in a large W[b]
    mixed = tl.zeros((os.shape[0], ks.shape[0]), dtype=tl.float32)
    for i in range(N):
        mixed += tl.load(a_ptr + i).to(tl.float32) * load_tile(w_ptr, os, ks, O, K)
        w_ptr += step
    return mixed


@triton.jit
def _apply_mixed_kernel(
    rows_ptr,
    a_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    O,
    K,
    L,
    OUT_IS_O: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[b, j] = rows[b, j] @ W*_j^T (OUT_IS_O: rows x [L, K] -> [L, O], the forward)
    or rows[b, j] @ W*_j (rows dout [L, O] -> d_x [L, K]); program (b * M + j, L tile,
    output-column tile), reducing over the other dimension in BLOCK_R tiles."""
    R = K if OUT_IS_O else O
    C = O if OUT_IS_O else K
    query, l_tile, c_tile = program_coords(tl.cdiv(L, BLOCK_L), tl.cdiv(C, BLOCK_C))
    a_ptr += query * N
    w_ptr += query // M * N * O * K
    ls = l_tile * BLOCK_L + tl.arange(0, BLOCK_L)
    cs = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        if OUT_IS_O:
            mixed = tl.trans(_mixed_tile(a_ptr, w_ptr, cs, rs, O, K, N))
        else:
            mixed = _mixed_tile(a_ptr, w_ptr, rs, cs, O, K, N)
        acc = dot(load_tile(rows_ptr + query * L * R, ls, rs, L, R), mixed, acc, PRECISION)
    store_tile(out_ptr + query * L * C, acc, ls, cs, L, C)


@triton.jit
def _read_d_attention_kernel(
    go_ptr,
    w_ptr,
    x_ptr,
    partials_ptr,
    M,
    N,
    O,
    K,
    L,
    BLOCK_L: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """partials[b, j, i, tile] = sum over this (O, K) tile of W_i * G_j, for every i;
    program (b * M + j, O tile, K tile)."""
    tiles_o, tiles_k = tl.cdiv(O, BLOCK_O), tl.cdiv(K, BLOCK_K)
    query, o_tile, k_tile = program_coords(tiles_o, tiles_k)
    os = o_tile * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    g = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)  # G_j = dout_j^T x_j on the tile
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        g = dot(
            tl.trans(load_tile(go_ptr + query * L * O, ls, os, L, O)),
            load_tile(x_ptr + query * L * K, ls, ks, L, K),
            g,
            PRECISION,
        )
    w_ptr += query // M * N * O * K
    step = tl.cast(O, tl.int64) * K
    out_ptr = partials_ptr + query * N * tiles_o * tiles_k + o_tile * tiles_k + k_tile
    for _ in range(N):  # i = 0 .. N - 1: w_ptr at W_i, out_ptr at partials[b, j, i, tile]
        tl.store(out_ptr, tl.sum(tl.sum(load_tile(w_ptr, os, ks, O, K) * g, axis=1), axis=0))
        w_ptr += step
        out_ptr += tiles_o * tiles_k


@triton.jit
def _read_d_weights_kernel(
    go_ptr,
    a_ptr,
    x_ptr,
    dw_ptr,
    M,
    N,
    O,
    K,
    L,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d_W[b, i] = (a[b, r // L, i] dout[b, r])^T x[b, r] summed over the rows r < M L of
    dout[b] [M L, O] and x[b] [M L, K], on this (O, K) tile; program (b * N + i, O tile,
    K tile)."""
    weight, o_tile, k_tile = program_coords(tl.cdiv(O, BLOCK_O), tl.cdiv(K, BLOCK_K))
    b = weight // N
    rows = tl.cast(M, tl.int64) * L
    go_ptr += b * rows * O
    x_ptr += b * rows * K
    a_ptr += b * M * N + weight % N  # column i of a[b] [M, N]
    os = o_tile * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rs // L * N, mask=rs < rows, other=0.0).to(tl.float32)
        go = load_tile(go_ptr, rs, os, rows, O) * a[:, None]
        acc = dot(tl.trans(go), load_tile(x_ptr, rs, ks, rows, K), acc, PRECISION)
    store_tile(dw_ptr + weight * O * K, acc, os, ks, O, K)


def _tile(n: int) -> int:
    """The memory-read kernels' tile for an extent n."""
    return tile_size(n, gpu=64, interpreter=128)


@launches_on_input_device
def attention_read_forward(attention, fast_weights, x):
    """attention [B, M, N], fast_weights [B, N, O, K], x [B, M, L, K] -> [B, M, L, O]."""
    attention, fast_weights, x = (t.contiguous() for t in (attention, fast_weights, x))
    B, M, N = attention.shape
    O, K, L = fast_weights.shape[2], fast_weights.shape[3], x.shape[2]
    out = x.new_empty(B, M, L, O)
    if out.numel() == 0:
        return out
    bl, bo, bk = _tile(L), _tile(O), _tile(K)
    _apply_mixed_kernel[(B * M * triton.cdiv(L, bl) * triton.cdiv(O, bo),)](
        x,
        attention,
        fast_weights,
        out,
        M,
        N,
        O,
        K,
        L,
        OUT_IS_O=True,
        BLOCK_L=bl,
        BLOCK_C=bo,
        BLOCK_R=bk,
        PRECISION=dot_precision(x),
    )
    return out


@launches_on_input_device
def attention_read_backward(
    grad_out, attention, fast_weights, x, need_attention, need_weights, need_x
):
    """grad_out [B, M, L, O] and the forward's inputs -> (d_attention [B, M, N],
    d_fast_weights [B, N, O, K], d_x [B, M, L, K]); each one empty when not needed."""
    grad_out, attention, fast_weights, x = (
        t.contiguous() for t in (grad_out, attention, fast_weights, x)
    )
    B, M, N = attention.shape
    O, K, L = fast_weights.shape[2], fast_weights.shape[3], x.shape[2]
    bl, bo, bk = _tile(L), _tile(O), _tile(K)
    tiles = triton.cdiv(O, bo) * triton.cdiv(K, bk)
    d_attention, d_w, d_x = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_x:
        d_x = torch.empty_like(x)
        if d_x.numel():
            _apply_mixed_kernel[(B * M * triton.cdiv(L, bl) * triton.cdiv(K, bk),)](
                grad_out,
                attention,
                fast_weights,
                d_x,
                M,
                N,
                O,
                K,
                L,
                OUT_IS_O=False,
                BLOCK_L=bl,
                BLOCK_C=bk,
                BLOCK_R=bo,
                PRECISION=dot_precision(x),
            )
    if need_attention:
        partials = torch.empty(B, M, N, tiles, device=x.device, dtype=torch.float32)
        if partials.numel():
            _read_d_attention_kernel[(B * M * tiles,)](
                grad_out,
                fast_weights,
                x,
                partials,
                M,
                N,
                O,
                K,
                L,
                BLOCK_L=bl,
                BLOCK_O=bo,
                BLOCK_K=bk,
                PRECISION=dot_precision(x),
            )
        d_attention = partials.sum(-1)  # O K = 0: no tiles, zeros
        if L == 0:  # an empty output: zeros, not 0 * an infinite fast weight
            d_attention.zero_()
    if need_weights:
        d_w = torch.empty_like(fast_weights)
        if d_w.numel():
            _read_d_weights_kernel[(B * N * tiles,)](
                grad_out,
                attention,
                x,
                d_w,
                M,
                N,
                O,
                K,
                L,
                BLOCK_R=_tile(M * L),
                BLOCK_O=bo,
                BLOCK_K=bk,
                PRECISION=dot_precision(x),
            )
    return d_attention, d_w, d_x
