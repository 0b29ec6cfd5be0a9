"""gradient_lstm Triton kernels (math in fastmeta/ops/gradient_lstm.py).

grads [B, N, Q...] seen as [B, N, Q]; the R = B Q coordinates r = b Q + q each run
their own LSTM over t (step t of coordinate r reads grads[b, t, q]).
forward : program per BLOCK coordinates; the state h, c is a [BLOCK, BLOCK_H] tile in
    registers; each gate k's pre-activation is u0 w_ih[k, :, 0] + u1 w_ih[k, :, 1] +
    h @ W_hh[k]^T (tl.dot) + b[k], W_hh[k] the gate's [H, H] block of w_hh.
backward: the same program first recomputes its N steps, storing h_t and c_t
    (t = 0 .. N) to a scratch buffer [programs, N + 1, BLOCK, BLOCK_H] that it alone
    reads back; then it runs back through the steps, recomputing the gates from h_t.
    dz of each gate is masked to the valid rows and units before any sum (padding must
    not add NaN of 0 * inf parameters); d_W_hh[k] += dz_k^T h_t (tl.dot) accumulates in
    registers over the steps; each program stores its parameter gradients to its own
    rows of partials (vectors [14, BLOCK_H]: d_w_ih columns 0 and 1 and d_b per gate,
    d_w_out, d_b_out; matrices [4, BLOCK_H, BLOCK_H]: d_W_hh per gate), summed in
    float64 by torch: no atomics, deterministic.
tanh is (1 - e^-2|x|) / (1 + e^-2|x|) with x's sign, its Taylor polynomial below 1/4
(as the CPU kernel's). Tiles are powers of two of at least 16 (tl.dot's minimum).
"""

import math

import torch
import triton
import triton.language as tl

from fastmeta.kernels.gradient_preprocess import (
    preprocess,
    preprocess_backward,
    preprocess_scalars,
)
from fastmeta.kernels.launch import launches_on_input_device
from fastmeta.kernels.tiles import dot, dot_precision, load_tile, store_tile, tile_size

# rows of each program's partial sums: d_w_ih[:, 0] x 4 gates, d_w_ih[:, 1] x 4, d_b x 4,
# d_w_out, d_b_out (a constexpr: a kernel may read no other global)
VECTOR_ROWS = tl.constexpr(14)


@triton.jit
def _tanh(x):
    a = tl.abs(x)
    x2 = x * x
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    poly = a * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
    magnitude = tl.where(a < 0.25, poly, large)
    return tl.where(x < 0, -magnitude, tl.where(x == x, magnitude, x))


@triton.jit
def _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, k, hs, hmask, H):
    """Gate k's (w_ih[:, 0], w_ih[:, 1], bias) [BLOCK_H] and W_hh[k] [BLOCK_H, BLOCK_H]
    (0 outside)."""
    rows = k * H + hs
    w0 = tl.load(w_ih_ptr + 2 * rows, mask=hmask, other=0.0).to(tl.float32)
    w1 = tl.load(w_ih_ptr + 2 * rows + 1, mask=hmask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + rows, mask=hmask, other=0.0).to(tl.float32)
    w_hh = load_tile(w_hh_ptr + k * H * H, hs, hs, H, H)
    return w0, w1, bias, w_hh


@triton.jit
def _pre_activation(u0, u1, h, gate, hmask, PRECISION: tl.constexpr):
    """z [BLOCK, BLOCK_H] of one gate (its _gate_weights); padded units are 0 (not NaN
    of 0 * inf)."""
    z = u0[:, None] * gate[0][None, :] + u1[:, None] * gate[1][None, :]
    z = dot(h, tl.trans(gate[3]), z, PRECISION) + gate[2][None, :]
    return tl.where(hmask[None, :], z, 0.0)


@triton.jit
def _gates(u0, u1, h, wi, wf, wg, wo, hmask, PRECISION: tl.constexpr):
    """(i, f, g, o) [BLOCK, BLOCK_H] from inputs u0, u1 [BLOCK] and h [BLOCK, BLOCK_H]."""
    i = tl.sigmoid(_pre_activation(u0, u1, h, wi, hmask, PRECISION))
    f = tl.sigmoid(_pre_activation(u0, u1, h, wf, hmask, PRECISION))
    cand = _tanh(_pre_activation(u0, u1, h, wg, hmask, PRECISION))
    o = tl.sigmoid(_pre_activation(u0, u1, h, wo, hmask, PRECISION))
    return i, f, cand, o


@triton.jit
def _lstm_step(
    g_ptrs, valid, h, c, p, threshold, e_p, wi, wf, wg, wo, hmask, PRECISION: tl.constexpr
):
    """One step of BLOCK coordinates: their gradients at g_ptrs, state h, c
    [BLOCK, BLOCK_H] -> (h, c); wi, wf, wg, wo: each gate's _gate_weights."""
    g = tl.load(g_ptrs, mask=valid, other=0.0)
    u0, u1, _ = preprocess(g.to(tl.float32), p, threshold, e_p)
    i, f, cand, o = _gates(u0, u1, h, wi, wf, wg, wo, hmask, PRECISION)
    c = f * c + i * cand
    return tl.where(hmask[None, :], o * _tanh(c), 0.0), c


@triton.jit
def _gradient_lstm_forward_kernel(
    g_ptr,
    w_ih_ptr,
    w_hh_ptr,
    b_ptr,
    w_out_ptr,
    b_out_ptr,
    out_ptr,
    R,
    N,
    Q,
    H,
    p,
    threshold,
    e_p,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < R
    first = rows // Q * N * Q + rows % Q  # grads[b, 0, q]
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < H
    wi = _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, 0, hs, hmask, H)
    wf = _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, 1, hs, hmask, H)
    wg = _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, 2, hs, hmask, H)
    wo = _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, 3, hs, hmask, H)
    h = tl.zeros((BLOCK, BLOCK_H), dtype=tl.float32)
    c = tl.zeros((BLOCK, BLOCK_H), dtype=tl.float32)
    for t in range(N):
        h, c = _lstm_step(
            g_ptr + first + tl.cast(t, tl.int64) * Q,
            valid,
            h,
            c,
            p,
            threshold,
            e_p,
            wi,
            wf,
            wg,
            wo,
            hmask,
            PRECISION,
        )
    w_out = tl.load(w_out_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
    y = tl.sum(h * w_out[None, :], axis=1) + tl.load(b_out_ptr).to(tl.float32)
    out_offsets = rows // Q * Q + rows % Q
    tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _gate_gradient_sums(dz, u0, u1, h_prev, d_w_hh, PRECISION: tl.constexpr):
    """(sum dz u0, sum dz u1, sum dz) over the rows [BLOCK_H] and d_w_hh + dz^T h_prev."""
    return (
        tl.sum(dz * u0[:, None], axis=0),
        tl.sum(dz * u1[:, None], axis=0),
        tl.sum(dz, axis=0),
        dot(tl.trans(dz), h_prev, d_w_hh, PRECISION),
    )


@triton.jit
def _gradient_lstm_backward_kernel(
    dy_ptr,
    g_ptr,
    w_ih_ptr,
    w_hh_ptr,
    b_ptr,
    w_out_ptr,
    dg_ptr,
    states_ptr,
    vectors_ptr,
    matrices_ptr,
    R,
    N,
    Q,
    H,
    p,
    threshold,
    e_p,
    NEED_GRADS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    valid = rows < R
    first = rows // Q * N * Q + rows % Q
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < H
    keep = valid[:, None] & hmask[None, :]
    wi = _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, 0, hs, hmask, H)
    wf = _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, 1, hs, hmask, H)
    wg = _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, 2, hs, hmask, H)
    wo = _gate_weights(w_ih_ptr, w_hh_ptr, b_ptr, 3, hs, hmask, H)
    # this program's states: [N + 1, 2 (h, c), BLOCK, BLOCK_H]
    tile = tl.arange(0, BLOCK)[:, None] * BLOCK_H + hs[None, :]
    states_ptr += pid * (N + 1) * 2 * BLOCK * BLOCK_H
    step = 2 * BLOCK * BLOCK_H
    h = tl.zeros((BLOCK, BLOCK_H), dtype=tl.float32)
    c = tl.zeros((BLOCK, BLOCK_H), dtype=tl.float32)
    tl.store(states_ptr + tile, h)
    tl.store(states_ptr + BLOCK * BLOCK_H + tile, c)
    for t in range(N):
        h, c = _lstm_step(
            g_ptr + first + tl.cast(t, tl.int64) * Q,
            valid,
            h,
            c,
            p,
            threshold,
            e_p,
            wi,
            wf,
            wg,
            wo,
            hmask,
            PRECISION,
        )
        at = states_ptr + tl.cast(t + 1, tl.int64) * step
        tl.store(at + tile, h)
        tl.store(at + BLOCK * BLOCK_H + tile, c)
    tl.debug_barrier()

    out_offsets = rows // Q * Q + rows % Q
    dy = tl.load(dy_ptr + out_offsets, mask=valid, other=0.0).to(tl.float32)
    w_out = tl.load(w_out_ptr + hs, mask=hmask, other=0.0).to(tl.float32)
    vectors_ptr += pid * VECTOR_ROWS * BLOCK_H + hs
    tl.store(vectors_ptr + 12 * BLOCK_H, tl.sum(tl.where(keep, dy[:, None] * h, 0.0), axis=0))
    tl.store(vectors_ptr + 13 * BLOCK_H, tl.where(hs == 0, tl.sum(dy, axis=0), 0.0))
    dh = tl.where(keep, dy[:, None] * w_out[None, :], 0.0)
    dc = tl.zeros((BLOCK, BLOCK_H), dtype=tl.float32)
    zero_vector = tl.zeros((BLOCK_H,), dtype=tl.float32)
    zero_matrix = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
    si0, si1, sbi, dwi = zero_vector, zero_vector, zero_vector, zero_matrix
    sf0, sf1, sbf, dwf = zero_vector, zero_vector, zero_vector, zero_matrix
    sg0, sg1, sbg, dwg = zero_vector, zero_vector, zero_vector, zero_matrix
    so0, so1, sbo, dwo = zero_vector, zero_vector, zero_vector, zero_matrix
    for back in range(N):
        t = N - 1 - back
        at = states_ptr + tl.cast(t, tl.int64) * step
        h_prev = tl.load(at + tile)
        c_prev = tl.load(at + BLOCK * BLOCK_H + tile)
        c = tl.load(at + step + BLOCK * BLOCK_H + tile)
        g = tl.load(g_ptr + first + tl.cast(t, tl.int64) * Q, mask=valid, other=0.0)
        g = g.to(tl.float32)
        u0, u1, small = preprocess(g, p, threshold, e_p)
        i, f, cand, o = _gates(u0, u1, h_prev, wi, wf, wg, wo, hmask, PRECISION)
        tau = _tanh(c)
        dc = dc + dh * o * (1.0 - tau * tau)
        dzi = tl.where(keep, dc * cand * i * (1.0 - i), 0.0)
        dzf = tl.where(keep, dc * c_prev * f * (1.0 - f), 0.0)
        dzg = tl.where(keep, dc * i * (1.0 - cand * cand), 0.0)
        dzo = tl.where(keep, dh * tau * o * (1.0 - o), 0.0)
        a0, a1, a2, dwi = _gate_gradient_sums(dzi, u0, u1, h_prev, dwi, PRECISION)
        si0, si1, sbi = si0 + a0, si1 + a1, sbi + a2
        a0, a1, a2, dwf = _gate_gradient_sums(dzf, u0, u1, h_prev, dwf, PRECISION)
        sf0, sf1, sbf = sf0 + a0, sf1 + a1, sbf + a2
        a0, a1, a2, dwg = _gate_gradient_sums(dzg, u0, u1, h_prev, dwg, PRECISION)
        sg0, sg1, sbg = sg0 + a0, sg1 + a1, sbg + a2
        a0, a1, a2, dwo = _gate_gradient_sums(dzo, u0, u1, h_prev, dwo, PRECISION)
        so0, so1, sbo = so0 + a0, so1 + a1, sbo + a2
        if NEED_GRADS:
            du0 = tl.sum(
                dzi * wi[0][None, :]
                + dzf * wf[0][None, :]
                + dzg * wg[0][None, :]
                + dzo * wo[0][None, :],
                axis=1,
            )
            du1 = tl.sum(
                dzi * wi[1][None, :]
                + dzf * wf[1][None, :]
                + dzg * wg[1][None, :]
                + dzo * wo[1][None, :],
                axis=1,
            )
            dg = preprocess_backward(du0, du1, g, small, p, e_p)
            at_g = dg_ptr + first + tl.cast(t, tl.int64) * Q
            tl.store(at_g, dg.to(dg_ptr.dtype.element_ty), mask=valid)
        dh = dot(dzi, wi[3], tl.zeros((BLOCK, BLOCK_H), dtype=tl.float32), PRECISION)
        dh = dot(dzf, wf[3], dh, PRECISION)
        dh = dot(dzg, wg[3], dh, PRECISION)
        dh = tl.where(keep, dot(dzo, wo[3], dh, PRECISION), 0.0)
        dc = tl.where(keep, dc * f, 0.0)
    tl.store(vectors_ptr, si0)
    tl.store(vectors_ptr + BLOCK_H, sf0)
    tl.store(vectors_ptr + 2 * BLOCK_H, sg0)
    tl.store(vectors_ptr + 3 * BLOCK_H, so0)
    tl.store(vectors_ptr + 4 * BLOCK_H, si1)
    tl.store(vectors_ptr + 5 * BLOCK_H, sf1)
    tl.store(vectors_ptr + 6 * BLOCK_H, sg1)
    tl.store(vectors_ptr + 7 * BLOCK_H, so1)
    tl.store(vectors_ptr + 8 * BLOCK_H, sbi)
    tl.store(vectors_ptr + 9 * BLOCK_H, sbf)
    tl.store(vectors_ptr + 10 * BLOCK_H, sbg)
    tl.store(vectors_ptr + 11 * BLOCK_H, sbo)
    matrices_ptr += pid * 4 * BLOCK_H * BLOCK_H
    square = BLOCK_H * BLOCK_H
    store_tile(matrices_ptr, dwi, hs, hs, BLOCK_H, BLOCK_H)
    store_tile(matrices_ptr + square, dwf, hs, hs, BLOCK_H, BLOCK_H)
    store_tile(matrices_ptr + 2 * square, dwg, hs, hs, BLOCK_H, BLOCK_H)
    store_tile(matrices_ptr + 3 * square, dwo, hs, hs, BLOCK_H, BLOCK_H)


def _launch(grads, w_hh):
    """(R, N, Q, H, BLOCK, BLOCK_H, programs) for grads [B, N, ...] and w_hh [4H, H]."""
    B, N = grads.shape[:2]
    Q = math.prod(grads.shape[2:])
    R, H = B * Q, w_hh.shape[1]
    block = tile_size(R, 64, 1 << 12)
    return R, N, Q, H, block, tile_size(H, 32, 32), triton.cdiv(R, block)


@launches_on_input_device
def gradient_lstm_forward(grads, w_ih, w_hh, b, w_out, b_out, p):
    out = grads.new_empty(grads.shape[0], *grads.shape[2:])
    R, N, Q, H, block, block_h, programs = _launch(grads, w_hh)
    if R == 0:
        return out
    _gradient_lstm_forward_kernel[(programs,)](
        grads,
        w_ih,
        w_hh,
        b,
        w_out,
        b_out,
        out,
        R,
        N,
        Q,
        H,
        *preprocess_scalars(p),
        BLOCK=block,
        BLOCK_H=block_h,
        PRECISION=dot_precision(grads),
    )
    return out


@launches_on_input_device
def gradient_lstm_backward(grad_out, grads, w_ih, w_hh, b, w_out, p, need_grads):
    R, N, Q, H, block, block_h, programs = _launch(grads, w_hh)
    f32 = dict(device=grads.device, dtype=torch.float32)
    vectors = torch.zeros(programs, VECTOR_ROWS.value, block_h, **f32)
    matrices = torch.zeros(programs, 4, block_h, block_h, **f32)
    d_grads = torch.empty_like(grads) if need_grads else grads.new_empty(0)
    if R:
        states = torch.empty(programs, N + 1, 2, block, block_h, **f32)
        _gradient_lstm_backward_kernel[(programs,)](
            grad_out,
            grads,
            w_ih,
            w_hh,
            b,
            w_out,
            d_grads if need_grads else grads,
            states,
            vectors,
            matrices,
            R,
            N,
            Q,
            H,
            *preprocess_scalars(p),
            NEED_GRADS=need_grads,
            BLOCK=block,
            BLOCK_H=block_h,
            PRECISION=dot_precision(grads),
        )
    totals = vectors.double().sum(0)  # [14, BLOCK_H]
    sums = totals[:, :H]
    d_w_ih = torch.stack((sums[0:4].reshape(-1), sums[4:8].reshape(-1)), 1)  # [4H, 2]
    d_w_hh = matrices.double().sum(0)[:, :H, :H].reshape(4 * H, H)
    dtype = grads.dtype
    return (
        d_grads,
        d_w_ih.to(dtype),
        d_w_hh.to(dtype),
        sums[8:12].reshape(-1).to(dtype),
        sums[12].to(dtype),
        totals[13, 0].to(dtype),
    )
