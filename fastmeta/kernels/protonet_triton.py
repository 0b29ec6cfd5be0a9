"""Prototypical Networks, Triton kernels (math and reference semantics: fastmeta/ops/
class_prototypes.py, squared_distances.py, prototypical_cross_entropy.py).

Shapes: support [B, S, D] with labels y [B, S]; queries Q [B, M, D] with labels [B, M];
prototypes C [B, C, D]; tau []. float32 in, float32 accumulation. Every grid is 1-D: a
program is (episode b, tile i, tile j), decoded by tiles.program_coords (b as
int64, so every per-episode offset b * rows * cols is int64).

class_prototypes forward : program (b, class tile, D tile); over S tiles, in order,
    sums += onehot(y)^T S (tl.dot; products with 0 / 1 are exact), n += colsum(onehot);
    prototypes = sums / n. No atomics: deterministic. Work C S D per episode.
class_prototypes backward: program (b, S tile, D tile), a gather:
    d_support[b, i] = grad[b, y_bi] / n_{b, y_bi}   (n by an integer scatter_add).
squared_distances: program (b, M tile, C tile); over D tiles: q . c (tl.dot), ||q||^2,
    ||c||^2; d = ||q||^2 + ||c||^2 - 2 q . c. A tile holding an entry with
    d <= 1e-2 (||q||^2 + ||c||^2) (cancellation: nearly identical points) recomputes those
    entries as sum_d (q - c)^2, so identical points give exactly 0 and none is negative.
prototypical_cross_entropy forward: program (b, M tile). Sweep 1 over C tiles: logits
    z' = tau f (tl.dot over D tiles for q . c, with ||q||^2 and ||c||^2; f by DISTANCE,
    a tl.constexpr: 2 q . c - ||c||^2, -||q - c|| refined as squared_distances where it
    cancels, or the cosine), running max and rescaled sum of exp (online log-sum-exp:
    lse = max + log sum), argmax (first index of the maximum, like torch.argmax), z'_y;
    loss = (max - z'_y) + log sum. Sweep 2 recomputes each z' tile and writes
    softmax = exp((z' - max) - log sum).
prototypical_cross_entropy backward, with G = (softmax - onehot(y)) * grad_losses formed
    tile by tile, squared Euclidean distance:
    queries kernel, program (b, M tile, D tile), over C tiles: GC = G C (tl.dot);
        d_q = 2 tau GC; d_tau partial 2 sum q . GC.
    prototypes kernel, program (b, C tile, D tile), over M tiles: G^T Q (tl.dot) and
        colsum(G); d_c = 2 tau (G^T Q - colsum(G) c); d_tau partial -colsum(G) . ||c||^2
        over this D tile.
    The euclidean and cosine distances (fastmeta/ops/prototypical_cross_entropy.py:
    d_q = tau (W C + u q), d_c = tau (W^T Q + v c), d_tau = sum(G f)) first run the
    weights kernel, program (b, M tile), over C tiles: recomputes f (as the forward),
    writes W [B, M, C] and, for cosine, V = -G f / ||c||^2 [B, M, C] (the terms of v),
    and u [B, M] and its rows' shares of d_tau, sum_k G (f - f_y) [B, M] (f_y, the score
    of the row's label, computed directly); then the queries kernel
    reads W for G (d_q = tau (W C + u q)) and the prototypes kernel W and V
    (v = -colsum(W), or colsum(V) for cosine; d_c = tau (W^T Q + v c)).
    d_tau = float64 torch.sum of the per-program partials: fixed order, deterministic.
Tiles are powers of two, at least 16 (tl.dot's minimum; masks pad small C, M, D). GPU
tiles are 32-128 wide (untuned); under the interpreter up to 512 wide, so B=1, M=10000,
C=1000, D=512 takes 2 to 40 programs per kernel.
"""

import torch
import triton
import triton.language as tl

from fastmeta.kernels.launch import launches_on_input_device
from fastmeta.kernels.tiles import (
    dot,
    dot_precision,
    gram_tile,
    load_tile,
    program_coords,
    query_class_launch,
    store_tile,
    tile_size,
)


@triton.jit
def _direct_distances_tile(q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_R: tl.constexpr):
    """sum_d (q - c)^2 [rows, cls], without the cancellation of the GEMM form."""
    acc = tl.zeros((rows.shape[0], cls.shape[0]), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_R):
        ds = d0 + tl.arange(0, BLOCK_R)
        diff = (
            load_tile(q_ptr, rows, ds, M, D)[:, None, :]
            - load_tile(c_ptr, cls, ds, C, D)[None, :, :]
        )
        acc += tl.sum(diff * diff, axis=2)
    return acc


@triton.jit
def _class_prototypes_forward_kernel(
    s_ptr,
    y_ptr,
    out_ptr,
    S,
    C,
    D,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, k, j = program_coords(tl.cdiv(C, BLOCK_C), tl.cdiv(D, BLOCK_D))
    s_ptr += b * S * D
    y_ptr += b * S
    cls = k * BLOCK_C + tl.arange(0, BLOCK_C)
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    sums = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    counts = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        idx = s0 + tl.arange(0, BLOCK_S)
        y = tl.load(y_ptr + idx, mask=idx < S, other=-1)
        onehot = (cls[:, None] == y[None, :]).to(tl.float32)  # [BLOCK_C, BLOCK_S]
        sums = dot(onehot, load_tile(s_ptr, idx, ds, S, D), sums, "ieee")
        counts += tl.sum(onehot, axis=1)
    # padding classes divide by 1; a real class without an example (unchecked bad input,
    # fastmeta.validation) gives 0 / 0 = NaN, as on the other backends
    counts = tl.where(cls < C, counts, 1.0)
    store_tile(out_ptr + b * C * D, sums / counts[:, None], cls, ds, C, D)


@triton.jit
def _class_prototypes_backward_kernel(
    g_ptr, y_ptr, n_ptr, out_ptr, S, C, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
):
    b, i, j = program_coords(tl.cdiv(S, BLOCK_S), tl.cdiv(D, BLOCK_D))
    idx = i * BLOCK_S + tl.arange(0, BLOCK_S)
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    in_s = idx < S
    y = tl.load(y_ptr + b * S + idx, mask=in_s, other=0)
    valid = (y >= 0) & (y < C)  # an unchecked bad label reads nothing and gives NaN
    y = tl.where(valid, y, 0)
    n = tl.load(n_ptr + b * (C + 1) + y, mask=in_s, other=1).to(tl.float32)
    n = tl.where(valid, n, float("nan"))
    grad = load_tile(g_ptr + b * C * D, y, ds, C, D)
    store_tile(out_ptr + b * S * D, grad / n[:, None], idx, ds, S, D)


@triton.jit
def _refined_squared_tile(q_ptr, c_ptr, rows, cls, qc, qn, cn, M, C, D, BLOCK_R: tl.constexpr):
    """||q - c||^2 [rows, cls] from q . c and the squared norms; a tile holding an entry
    with d <= 1e-2 (||q||^2 + ||c||^2) (cancellation: nearly identical points) recomputes
    those entries as sum_d (q - c)^2, so identical points give exactly 0 and none is
    negative."""
    scale = qn[:, None] + cn[None, :]
    dist = scale - 2 * qc
    cancelled = (dist <= 0.01 * scale) & (rows[:, None] < M) & (cls[None, :] < C)
    if tl.max(cancelled.to(tl.int32)) > 0:  # rare: recompute this tile directly
        direct = _direct_distances_tile(q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_R)
        dist = tl.where(cancelled, direct, dist)
    return dist


@triton.jit
def _squared_distances_kernel(
    q_ptr,
    c_ptr,
    out_ptr,
    M,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, i, j = program_coords(tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_C))
    q_ptr += b * M * D
    c_ptr += b * C * D
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cls = j * BLOCK_C + tl.arange(0, BLOCK_C)
    qc, qn, cn = gram_tile(q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_D, PRECISION)
    dist = _refined_squared_tile(q_ptr, c_ptr, rows, cls, qc, qn, cn, M, C, D, BLOCK_R)
    store_tile(out_ptr + b * M * C, dist, rows, cls, M, C)


# The distances' codes (fastmeta.ops.prototypical_cross_entropy.DISTANCES) and the
# cosine's eps, as the host passes them and as the kernels read them (a global a kernel
# reads must be a tl.constexpr).
SQUARED_EUCLIDEAN, EUCLIDEAN, COSINE = 0, 1, 2
_SQUARED_EUCLIDEAN, _EUCLIDEAN, _COSINE = (tl.constexpr(d) for d in range(3))
_COSINE_EPS = tl.constexpr(1e-8)


@triton.jit
def _scores_tile(
    q_ptr,
    c_ptr,
    rows,
    cls,
    M,
    C,
    D,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    DISTANCE: tl.constexpr,
):
    """(f [rows, cls], ||q||^2 [rows], ||c||^2 [cls]) with the scores f = logits / tau of
    DISTANCE: 2 q . c - ||c||^2, -||q - c|| (refined where it cancels) or
    q . c / (max(||q||, eps) max(||c||, eps))."""
    qc, qn, cn = gram_tile(q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_D, PRECISION)
    if DISTANCE == _EUCLIDEAN:
        squared = _refined_squared_tile(q_ptr, c_ptr, rows, cls, qc, qn, cn, M, C, D, BLOCK_R)
        f = -tl.sqrt(tl.where(squared < 0, 0.0, squared))  # NaN stays NaN
    elif DISTANCE == _COSINE:
        f = qc / (
            tl.maximum(tl.sqrt(qn), _COSINE_EPS)[:, None]
            * tl.maximum(tl.sqrt(cn), _COSINE_EPS)[None, :]
        )
    else:
        f = 2 * qc - cn[None, :]
    return f, qn, cn


@triton.jit
def _prototypical_cross_entropy_forward_kernel(
    q_ptr,
    c_ptr,
    y_ptr,
    tau_ptr,
    loss_ptr,
    pred_ptr,
    sm_ptr,
    M,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    DISTANCE: tl.constexpr,
):
    b, i, _ = program_coords(tl.cdiv(M, BLOCK_M), 1)
    q_ptr += b * M * D
    c_ptr += b * C * D
    sm_ptr += b * M * C
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = rows < M
    y = tl.load(y_ptr + b * M + rows, mask=in_m, other=0)
    tau = tl.load(tau_ptr).to(tl.float32)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    argmax = tl.zeros((BLOCK_M,), dtype=tl.int32)
    first_nan = tl.full((BLOCK_M,), C, dtype=tl.int32)  # C: no NaN logit yet
    z_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        f = _scores_tile(q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_D, BLOCK_R, PRECISION, DISTANCE)[0]
        z = tl.where(cls[None, :] < C, tau * f, float("-inf"))  # z' = tau f
        first_nan = tl.minimum(first_nan, tl.min(tl.where(z != z, cls[None, :], C), axis=1))
        tile_max = tl.max(z, axis=1)
        tile_argmax = tl.min(tl.where(z == tile_max[:, None], cls[None, :], C), axis=1)
        argmax = tl.where(tile_max > run_max, tile_argmax, argmax)  # ties: earlier tile
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        z_y += tl.sum(tl.where(cls[None, :] == y[:, None], z, 0.0), axis=1)
    # lse = run_max + log_sum, never formed: subtracting run_max first keeps small losses
    # and probabilities accurate when the logits are large.
    log_sum = tl.log(run_sum)
    tl.store(loss_ptr + b * M + rows, (run_max - z_y) + log_sum, mask=in_m)
    argmax = tl.where(first_nan < C, first_nan, argmax)  # torch.argmax: NaN is largest
    tl.store(pred_ptr + b * M + rows, argmax.to(tl.int64), mask=in_m)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        f = _scores_tile(q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_D, BLOCK_R, PRECISION, DISTANCE)[0]
        z = tl.where(cls[None, :] < C, tau * f, float("-inf"))  # z' = tau f
        store_tile(sm_ptr, tl.exp((z - run_max[:, None]) - log_sum[:, None]), rows, cls, M, C)


@triton.jit
def _row_grads_and_labels(gl_ptr, y_ptr, b, rows, M):
    """grad_losses and labels of episode b's query rows (0 outside [0, M))."""
    in_m = rows < M
    grad = tl.load(gl_ptr + b * M + rows, mask=in_m, other=0.0).to(tl.float32)
    return grad, tl.load(y_ptr + b * M + rows, mask=in_m, other=0)


@triton.jit
def _g_tile(sm_ptr, grad, y, rows, cls, M, C):
    """G = (softmax - onehot(y)) * grad_losses [rows, cls]; 0 outside [M, C]."""
    onehot = (cls[None, :] == y[:, None]).to(tl.float32)
    return (load_tile(sm_ptr, rows, cls, M, C) - onehot) * grad[:, None]


@triton.jit
def _label_scores(q_ptr, c_ptr, rows, y, M, C, D, BLOCK_D: tl.constexpr, DISTANCE: tl.constexpr):
    """The score f of each row's label [rows], directly over D: -||q - c_y|| or the
    cosine (0 outside [0, M))."""
    acc = tl.zeros((rows.shape[0],), dtype=tl.float32)
    qn = tl.zeros((rows.shape[0],), dtype=tl.float32)
    cn = tl.zeros((rows.shape[0],), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        q = load_tile(q_ptr, rows, ds, M, D)
        c = load_tile(c_ptr, tl.where(rows < M, y, C), ds, C, D)  # row C: zeros
        if DISTANCE == _EUCLIDEAN:
            acc += tl.sum((q - c) * (q - c), axis=1)
        else:
            acc += tl.sum(q * c, axis=1)
            qn += tl.sum(q * q, axis=1)
            cn += tl.sum(c * c, axis=1)
    if DISTANCE == _EUCLIDEAN:
        f = -tl.sqrt(acc)
    else:
        f = acc / (tl.maximum(tl.sqrt(qn), _COSINE_EPS) * tl.maximum(tl.sqrt(cn), _COSINE_EPS))
    return f


@triton.jit
def _prototypical_cross_entropy_backward_weights_kernel(
    gl_ptr,
    q_ptr,
    c_ptr,
    y_ptr,
    sm_ptr,
    w_ptr,
    v_ptr,
    u_ptr,
    terms_ptr,
    M,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    DISTANCE: tl.constexpr,
):
    """Euclidean and cosine: W, V (cosine), u and the rows' d_tau shares of a row tile:
    sum(G f) = sum(G (f - f_y)) (as sum_k G = 0: the shift by the score of the row's
    label keeps the softmax's rounding, sum_k G = O(eps), from being multiplied by the
    scores' common part); f_y computed directly over D."""
    b, i, _ = program_coords(tl.cdiv(M, BLOCK_M), 1)
    q_ptr += b * M * D
    c_ptr += b * C * D
    sm_ptr += b * M * C
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    grad, y = _row_grads_and_labels(gl_ptr, y_ptr, b, rows, M)
    f_label = _label_scores(q_ptr, c_ptr, rows, y, M, C, D, BLOCK_D, DISTANCE)
    u = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_tau = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_norms = tl.zeros((BLOCK_M,), dtype=tl.float32)  # ||q||^2 (the same every C tile)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        f, qn, cn = _scores_tile(
            q_ptr, c_ptr, rows, cls, M, C, D, BLOCK_D, BLOCK_R, PRECISION, DISTANCE
        )
        row_norms = qn
        g = _g_tile(sm_ptr, grad, y, rows, cls, M, C)
        inside = (rows[:, None] < M) & (cls[None, :] < C)
        gf = tl.where(inside, g * f, 0.0)
        d_tau += tl.sum(tl.where(inside, g * (f - f_label[:, None]), 0.0), axis=1)
        if DISTANCE == _EUCLIDEAN:  # W = G / d, 0 where d = -f is not positive
            w = tl.where(f < 0, g / tl.where(f < 0, -f, 1.0), 0.0)
            u -= tl.sum(w, axis=1)
        else:  # cosine: W = G / (n_q n_c); u, V: the derivative through the norms
            nq, nc = tl.sqrt(qn), tl.sqrt(cn)
            w = g / (tl.maximum(nq, _COSINE_EPS)[:, None] * tl.maximum(nc, _COSINE_EPS)[None, :])
            unclamped = (nc > _COSINE_EPS)[None, :]
            v = tl.where(unclamped, -gf / tl.where(unclamped, cn[None, :], 1.0), 0.0)
            store_tile(v_ptr + b * M * C, v, rows, cls, M, C)
            u -= tl.sum(gf, axis=1)
        store_tile(w_ptr + b * M * C, w, rows, cls, M, C)
    if DISTANCE == _COSINE:  # u = -sum_k G f / ||q||^2, 0 where the norm is clamped
        unclamped = tl.sqrt(row_norms) > _COSINE_EPS
        u = tl.where(unclamped, u / tl.where(unclamped, row_norms, 1.0), 0.0)
    tl.store(u_ptr + b * M + rows, u, mask=rows < M)
    tl.store(terms_ptr + b * M + rows, d_tau, mask=rows < M)


@triton.jit
def _g_or_w_tile(sm_ptr, w_ptr, grad, y, rows, cls, M, C, DISTANCE: tl.constexpr):
    """G (the squared distance: from the softmax) or the weights kernel's W [rows, cls]."""
    if DISTANCE == _SQUARED_EUCLIDEAN:
        tile = _g_tile(sm_ptr, grad, y, rows, cls, M, C)
    else:
        tile = load_tile(w_ptr, rows, cls, M, C)
    return tile


@triton.jit
def _prototypical_cross_entropy_backward_queries_kernel(
    gl_ptr,
    q_ptr,
    c_ptr,
    y_ptr,
    tau_ptr,
    sm_ptr,
    w_ptr,
    u_ptr,
    dq_ptr,
    partials_ptr,
    M,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    DISTANCE: tl.constexpr,
):
    b, i, j = program_coords(tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_D))
    c_ptr += b * C * D
    sm_ptr += b * M * C
    w_ptr += b * M * C
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    grad, y = _row_grads_and_labels(gl_ptr, y_ptr, b, rows, M)
    gc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        g = _g_or_w_tile(sm_ptr, w_ptr, grad, y, rows, cls, M, C, DISTANCE)
        gc = dot(g, load_tile(c_ptr, cls, ds, C, D), gc, PRECISION)
    tau = tl.load(tau_ptr).to(tl.float32)
    q = load_tile(q_ptr + b * M * D, rows, ds, M, D)
    if DISTANCE == _SQUARED_EUCLIDEAN:
        store_tile(dq_ptr + b * M * D, 2 * tau * gc, rows, ds, M, D)
        tl.store(partials_ptr + tl.program_id(0), 2 * tl.sum(tl.sum(q * gc, axis=1), axis=0))
    else:  # d_q = tau (W C + u q); d_tau comes from the weights kernel
        u = tl.load(u_ptr + b * M + rows, mask=rows < M, other=0.0)
        store_tile(dq_ptr + b * M * D, tau * (gc + u[:, None] * q), rows, ds, M, D)
        tl.store(partials_ptr + tl.program_id(0), 0.0)


@triton.jit
def _prototypical_cross_entropy_backward_prototypes_kernel(
    gl_ptr,
    q_ptr,
    c_ptr,
    y_ptr,
    tau_ptr,
    sm_ptr,
    w_ptr,
    v_ptr,
    dc_ptr,
    partials_ptr,
    M,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    DISTANCE: tl.constexpr,
):
    b, k, j = program_coords(tl.cdiv(C, BLOCK_C), tl.cdiv(D, BLOCK_D))
    q_ptr += b * M * D
    sm_ptr += b * M * C
    w_ptr += b * M * C
    v_ptr += b * M * C
    cls = k * BLOCK_C + tl.arange(0, BLOCK_C)
    ds = j * BLOCK_D + tl.arange(0, BLOCK_D)
    gq = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)  # of G (squared), W (euclidean), V (cosine)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        grad, y = _row_grads_and_labels(gl_ptr, y_ptr, b, rows, M)
        g = _g_or_w_tile(sm_ptr, w_ptr, grad, y, rows, cls, M, C, DISTANCE)
        gq = dot(tl.trans(g), load_tile(q_ptr, rows, ds, M, D), gq, PRECISION)
        if DISTANCE == _COSINE:
            colsum += tl.sum(load_tile(v_ptr, rows, cls, M, C), axis=0)
        else:
            colsum += tl.sum(g, axis=0)
    tau = tl.load(tau_ptr).to(tl.float32)
    c = load_tile(c_ptr + b * C * D, cls, ds, C, D)
    if DISTANCE == _SQUARED_EUCLIDEAN:
        store_tile(dc_ptr + b * C * D, 2 * tau * (gq - colsum[:, None] * c), cls, ds, C, D)
        tl.store(partials_ptr + tl.program_id(0), -tl.sum(colsum * tl.sum(c * c, axis=1), axis=0))
    else:  # d_c = tau (W^T Q + v c): v = -colsum(W) (euclidean) or colsum(V) (cosine)
        if DISTANCE == _EUCLIDEAN:
            colsum = -colsum
        store_tile(dc_ptr + b * C * D, tau * (gq + colsum[:, None] * c), cls, ds, C, D)
        tl.store(partials_ptr + tl.program_id(0), 0.0)


@launches_on_input_device
def class_prototypes_forward(
    support: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """support [B, S, D], labels [B, S] int64 in [0, C), every class present
    -> prototypes [B, C, D] (per-class means)."""
    support, labels = support.contiguous(), labels.contiguous()
    B, S, D = support.shape
    C = num_classes
    out = support.new_empty(B, C, D)
    if out.numel() == 0:
        return out
    block_c, block_s, block_d = tile_size(C, 32, 512), tile_size(S, 32, 512), tile_size(D, 64, 512)
    grid = (B * triton.cdiv(C, block_c) * triton.cdiv(D, block_d),)
    _class_prototypes_forward_kernel[grid](
        support, labels, out, S, C, D, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_D=block_d
    )
    return out


@launches_on_input_device
def class_prototypes_backward(grad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad [B, C, D], labels [B, S] int64 -> d_support [B, S, D],
    d_support[b, i] = grad[b, y_bi] / n_{b, y_bi}."""
    grad, labels = grad.contiguous(), labels.contiguous()
    B, C, D = grad.shape
    S = labels.shape[1]
    out = grad.new_empty(B, S, D)
    if out.numel() == 0:
        return out
    # n_bk [B, C + 1] (integer sums: deterministic); column C collects the labels outside
    # [0, C), which only unchecked bad input has (fastmeta.validation)
    outside = (labels < 0) | (labels >= C)
    counts = torch.zeros(B, C + 1, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(1, labels.masked_fill(outside, C), torch.ones_like(labels))
    block_s, block_d = tile_size(S, 32, 512), tile_size(D, 128, 1024)
    grid = (B * triton.cdiv(S, block_s) * triton.cdiv(D, block_d),)
    _class_prototypes_backward_kernel[grid](
        grad, labels, counts, out, S, C, D, BLOCK_S=block_s, BLOCK_D=block_d
    )
    return out


def _block_r(D: int) -> int:
    """The D tile of the direct distances of _refined_squared_tile."""
    return tile_size(D, 4, 8, least=1)


@launches_on_input_device
def squared_distances_forward(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """queries [B, M, D], prototypes [B, C, D] -> ||q - c||^2 [B, M, C]."""
    queries, prototypes, out, grid, sizes, blocks = query_class_launch(queries, prototypes, 512)
    if grid[0]:
        _squared_distances_kernel[grid](
            queries,
            prototypes,
            out,
            *sizes,
            **blocks,
            BLOCK_R=_block_r(sizes[2]),
            PRECISION=dot_precision(queries),
        )
    return out


@launches_on_input_device
def prototypical_cross_entropy_forward(
    queries: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    tau: torch.Tensor,
    distance: int = SQUARED_EUCLIDEAN,
):
    """queries [B, M, D], prototypes [B, C, D], labels [B, M] int64, tau [], distance
    (SQUARED_EUCLIDEAN, EUCLIDEAN or COSINE) -> (losses [B, M], predictions [B, M]
    int64, softmax [B, M, C])."""
    queries, prototypes, labels = queries.contiguous(), prototypes.contiguous(), labels.contiguous()
    B, M, D = queries.shape
    C = prototypes.shape[1]
    losses = queries.new_empty(B, M)
    predictions = labels.new_empty(B, M)
    softmax = queries.new_empty(B, M, C, dtype=torch.promote_types(queries.dtype, torch.float32))
    if softmax.numel() == 0:
        return losses, predictions, softmax
    block_m, block_c, block_d = tile_size(M, 64, 512), tile_size(C, 64, 512), tile_size(D, 32, 128)
    grid = (B * triton.cdiv(M, block_m),)
    _prototypical_cross_entropy_forward_kernel[grid](
        queries,
        prototypes,
        labels,
        tau,
        losses,
        predictions,
        softmax,
        M,
        C,
        D,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
        BLOCK_R=_block_r(D),
        PRECISION=dot_precision(queries),
        DISTANCE=distance,
    )
    return losses, predictions, softmax


@launches_on_input_device
def prototypical_cross_entropy_backward(
    grad_losses: torch.Tensor,
    queries: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    tau: torch.Tensor,
    softmax: torch.Tensor,
    distance: int = SQUARED_EUCLIDEAN,
):
    """grad_losses [B, M], queries [B, M, D], prototypes [B, C, D], labels [B, M] int64,
    tau [], softmax [B, M, C] (from the forward), distance -> (d_queries [B, M, D],
    d_prototypes [B, C, D], d_tau []). With G = (softmax - onehot(y)) * grad_losses,
    squared Euclidean: d_q = 2 tau G C, d_c = 2 tau (G^T Q - colsum(G) c),
    d_tau = 2 sum_m q_m . (G C)_m - colsum(G) . ||c||^2; the others: the module
    docstring."""
    grad_losses, queries, prototypes, labels, softmax = (
        x.contiguous() for x in (grad_losses, queries, prototypes, labels, softmax)
    )
    B, M, D = queries.shape
    C = prototypes.shape[1]
    d_queries, d_prototypes = torch.empty_like(queries), torch.empty_like(prototypes)
    if softmax.numel() == 0 or D == 0:
        return d_queries.zero_(), d_prototypes.zero_(), torch.zeros_like(tau)
    block_d = tile_size(D, 64, 512)
    q_blocks = dict(BLOCK_M=tile_size(M, 64, 512), BLOCK_C=tile_size(C, 32, 512), BLOCK_D=block_d)
    c_blocks = dict(BLOCK_M=tile_size(M, 32, 512), BLOCK_C=tile_size(C, 64, 512), BLOCK_D=block_d)
    q_programs = B * triton.cdiv(M, q_blocks["BLOCK_M"]) * triton.cdiv(D, block_d)
    c_programs = B * triton.cdiv(C, c_blocks["BLOCK_C"]) * triton.cdiv(D, block_d)
    precision = dot_precision(queries)
    # W, V [B, M, C] and u [B, M] of the euclidean and cosine distances (softmax, twice,
    # in their place for the squared one: not read)
    # and their rows' shares of d_tau [B, M]
    w, v, u, row_terms = softmax, softmax, softmax, softmax.new_empty(0)
    if distance != SQUARED_EUCLIDEAN:
        w = torch.empty_like(softmax)
        v = torch.empty_like(softmax) if distance == COSINE else w
        u, row_terms = softmax.new_empty(B, M), softmax.new_empty(B, M)
        w_blocks = dict(BLOCK_M=tile_size(M, 64, 512), BLOCK_C=tile_size(C, 64, 512))
        w_programs = B * triton.cdiv(M, w_blocks["BLOCK_M"])
        _prototypical_cross_entropy_backward_weights_kernel[(w_programs,)](
            grad_losses,
            queries,
            prototypes,
            labels,
            softmax,
            w,
            v,
            u,
            row_terms,
            M,
            C,
            D,
            **w_blocks,
            BLOCK_D=tile_size(D, 32, 128),
            BLOCK_R=_block_r(D),
            PRECISION=precision,
            DISTANCE=distance,
        )
    partials = torch.empty(q_programs + c_programs, dtype=torch.float32, device=queries.device)
    args = (grad_losses, queries, prototypes, labels, tau, softmax, w)
    _prototypical_cross_entropy_backward_queries_kernel[(q_programs,)](
        *args, u, d_queries, partials, M, C, D, **q_blocks, PRECISION=precision, DISTANCE=distance
    )
    _prototypical_cross_entropy_backward_prototypes_kernel[(c_programs,)](
        *args,
        v,
        d_prototypes,
        partials[q_programs:],
        M,
        C,
        D,
        **c_blocks,
        PRECISION=precision,
        DISTANCE=distance,
    )
    d_tau = torch.cat((partials, row_terms.flatten())).double().sum().to(tau.dtype)
    return d_queries, d_prototypes, d_tau
