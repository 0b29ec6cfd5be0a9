"""The roofline's work table: every registered fastmeta op at one representative size,
with the kernel arguments of each direction and the work each direction must do.

Bytes are the fewest a direction must move: every input read once and every output
written once, in its dtype (float32 4, int64 labels and predictions 8, the uint8 pool
windows 1). FLOPs are those the formulas in the op's module docstring need, one per
add, multiply, divide, compare, exp, log or sqrt (a GEMM: 2 m n k); work a kernel
chooses to do twice (a recomputation) is not counted unless the formulas need a value
the forward did not keep. float32 throughout.

    op (sizes)                     direction  FLOPs                          bytes / 4
    inner_update                   forward    2TP                            2TP + P + 1
      theta [P], alpha [], g [T,P] backward   2TP (sum_t go; -alpha go)      2TP + P + 1
    class_prototypes               forward    BSD + BCD                      BSD + BCD + 2BS
      support [B,S,D], labels [B,S] backward  BSD                            BSD + BCD + 2BS
    squared_distances              forward    2BMCD + 2B(M+C)D + 3BMC        BMD + BCD + BMC
      q [B,M,D], c [B,C,D]         backward   4BMCD + 3B(M+C)D + 2BMC        2BMD + 2BCD + BMC
    cosine_similarities            forward    2BMCD + 3B(M+C)D               BMD + BCD + BMC
      (as squared_distances)       backward   4BMCD + 8B(M+C)D               2BMD + 2BCD + BMC
    prototypical_cross_entropy     forward    2BMCD + n + 10BMC              BMD + BCD + BMC
      q, c, labels [B,M], tau []                                               + 5BM + 1
                                   backward   4BMCD (+2BMCD euclidean:       2BMD + 2BCD + BMC
                                              d recomputed) + 2n + 6BMC        + 3BM + 2
      n = 2BCD (squared_euclidean), 2B(M+C)D (euclidean, cosine): the norms
    attention_read                 forward    2BMOK(N + L)                   BMN + BNOK + BMLK
      a [B,M,N], W [B,N,O,K],                                                  + BMLO
      x [B,M,L,K]                  backward   2BMOK(2L + 3N)                 2BMN + 2BNOK
                                                                               + 2BMLK + BMLO
    gradient_mlp                   forward    n(7H + 5)                      2n + 4H + 1
      grads [n], hidden H          backward   n(18H + 7)                     3n + 8H + 1
    gradient_lstm                  forward    n(N f + 2H)                    nN + n + Wl
      grads [B,N,P] (n = BP),      backward   n(N (f + b) + 2H)              2nN + n + 2Wl
      hidden H                                f = 8H^2 + 39H + 5, b = 16H^2 + 53H + 5
      Wl = 4H(H + 3) + H + 1 (w_ih, w_hh, b, w_out, b_out). Per coordinate and example:
      the gates' products 8H^2 + 16H, bias 4H, 3 sigmoids and 2 tanh at 3 each, the cell
      and hidden updates 4H, the preprocessing 5; the backward recomputes the forward
      (it keeps no state), then dc, dz, the parameter sums, W_ih^T dz and W_hh^T dz.
    conv_block                     forward    E(2 taps + 5) + Z              X + Wt + 2Y + Y/4
      x [N,Cin,H,W] (X elements),                                              + 5C
      weight [C,Cin,KH,KW] (Wt)    backward   Y(2 taps + 7) + Z              X + 2Wt + 2Y + Y/4
                                                                               + 8C
      E = N C Hc Wc, taps = Cin KH KW, Y = N C (Hc/2)(Wc/2); backward without d_x.
      Z = N Hc Wc taps (taps + 2): the input patches' mean and covariance, which give
      the batch statistics and the backward's dense terms (in both directions: the
      forward does not keep them); the backward's other terms are at the window maxima
      only (csrc/cpu/conv_block_cpu.cpp)
    bn_relu_pool                   forward    7E                             E + Y + Y/4 + 4C
      c [N,C,H,W] (E elements)     backward   2E + 10Y: d_c = a + b c        2E + Y + Y/4 + 6C
                                              everywhere, the rest at the
                                              window maxima
      Y = N C (H/2)(W/2)

(Y/4: the uint8 windows; in 2BS, 5BM, 3BM the int64 labels and predictions count
twice.) The forward of prototypical_cross_entropy writes losses, predictions and the
softmax; its backward reads the softmax. The backward of squared_distances and of
cosine_similarities is plain torch ops whichever backend ran the forward (one row,
backend "torch"). The composite prototypical_loss is class_prototypes, then
prototypical_cross_entropy.
"""

import dataclasses
import functools
import math
from typing import Callable

import torch

from fastmeta.bench.protonet import episode
from fastmeta.ops import DECLARATIONS
from fastmeta.ops.conv_block import conv_size
from fastmeta.ops.cosine_similarities import cosine_similarities_backward
from fastmeta.ops.declaration import OpDeclaration
from fastmeta.ops.prototypical_cross_entropy import DISTANCES, EUCLIDEAN, SQUARED_EUCLIDEAN
from fastmeta.ops.squared_distances import squared_distances_backward

F32, I64, U8 = 4, 8, 1  # bytes per element
DECLARED = {d.name: d for d in DECLARATIONS}


@dataclasses.dataclass(frozen=True)
class Cost:
    bytes: int  # fewest bytes the direction must read + write
    flops: int  # FLOPs it must do


@dataclasses.dataclass
class OpWork:
    """One op (one variant) at one size, ready to time: the kernels of each backend
    take forward_args; backward_args(forward output) gives the backward kernels'
    arguments (the forward's saved outputs included)."""

    op: str  # the registered name (fastmeta.backend.ops())
    variant: str  # "" or the distance
    sizes: str
    forward_args: tuple
    backward_args: Callable[[object], tuple]
    forward_cost: Cost
    backward_cost: Cost
    torch_backward: Callable | None = None  # the backward when it is plain torch ops

    @property
    def declaration(self) -> OpDeclaration:
        return DECLARED[self.op]

    @property
    def label(self) -> str:
        return f"{self.op}[{self.variant}]" if self.variant else self.op


def _sizes(device: str, quick: bool, cpu: tuple, cuda: tuple, small: tuple) -> tuple:
    return small if quick else (cuda if device == "cuda" else cpu)


def _randn(*shape, device) -> torch.Tensor:
    return torch.randn(*shape, device=device)


# ---------------------------------------------------------------- work formulas


def inner_update_cost(T: int, P: int) -> tuple[Cost, Cost]:
    """theta [P], a scalar alpha, g [T, P]; backward to theta and g (MAML)."""
    return (
        Cost(F32 * (2 * T * P + P + 1), 2 * T * P),
        Cost(F32 * (2 * T * P + P + 1), 2 * T * P),
    )


def class_prototypes_cost(B: int, S: int, C: int, D: int) -> tuple[Cost, Cost]:
    moved = F32 * (B * S * D + B * C * D) + I64 * B * S
    return Cost(moved, B * S * D + B * C * D), Cost(moved, B * S * D)


def squared_distances_cost(B: int, M: int, C: int, D: int) -> tuple[Cost, Cost]:
    rows = B * (M + C) * D
    return (
        Cost(F32 * (rows + B * M * C), 2 * B * M * C * D + 2 * rows + 3 * B * M * C),
        Cost(F32 * (2 * rows + B * M * C), 4 * B * M * C * D + 3 * rows + 2 * B * M * C),
    )


def cosine_similarities_cost(B: int, M: int, C: int, D: int) -> tuple[Cost, Cost]:
    rows = B * (M + C) * D
    return (
        Cost(F32 * (rows + B * M * C), 2 * B * M * C * D + 3 * rows),
        Cost(F32 * (2 * rows + B * M * C), 4 * B * M * C * D + 8 * rows),
    )


def prototypical_cross_entropy_cost(
    B: int, M: int, C: int, D: int, distance: int
) -> tuple[Cost, Cost]:
    """distance: its index in DISTANCES."""
    gemm, rows, logits = 2 * B * M * C * D, B * (M + C) * D, B * M * C
    norms = 2 * (B * C * D if distance == SQUARED_EUCLIDEAN else rows)
    recompute = gemm if distance == EUCLIDEAN else 0
    return (
        Cost(F32 * (rows + logits + B * M + 1) + I64 * 2 * B * M, gemm + norms + 10 * logits),
        Cost(
            F32 * (2 * rows + logits + B * M + 2) + I64 * B * M,
            2 * gemm + recompute + 2 * norms + 6 * logits,
        ),
    )


def attention_read_cost(B: int, M: int, N: int, L: int, O: int, K: int) -> tuple[Cost, Cost]:
    a, w, x, out = B * M * N, B * N * O * K, B * M * L * K, B * M * L * O
    return (
        Cost(F32 * (a + w + x + out), 2 * B * M * O * K * (N + L)),
        Cost(F32 * (2 * a + 2 * w + 2 * x + out), 2 * B * M * O * K * (2 * L + 3 * N)),
    )


def gradient_mlp_cost(n: int, H: int) -> tuple[Cost, Cost]:
    """n gradient elements, H hidden units."""
    return (
        Cost(F32 * (2 * n + 4 * H + 1), n * (7 * H + 5)),
        Cost(F32 * (3 * n + 8 * H + 1), n * (18 * H + 7)),
    )


def gradient_lstm_cost(n: int, N: int, H: int) -> tuple[Cost, Cost]:
    """n coordinates (B x P), N examples, H hidden units."""
    step_forward, step_backward = 8 * H * H + 39 * H + 5, 16 * H * H + 53 * H + 5
    weights = 4 * H * (H + 3) + H + 1
    return (
        Cost(F32 * (n * N + n + weights), n * (N * step_forward + 2 * H)),
        Cost(F32 * (2 * n * N + n + 2 * weights), n * (N * (step_forward + step_backward) + 2 * H)),
    )


def conv_block_cost(x_shape, weight_shape, padding) -> tuple[Cost, Cost]:
    """x [N, Cin, H, W], weight [C, Cin, KH, KW]; backward without d_x."""
    N, C = x_shape[0], weight_shape[0]
    hc, wc = conv_size(x_shape, weight_shape, padding)
    x, taps = math.prod(x_shape), math.prod(weight_shape[1:])
    E, pooled = N * C * hc * wc, N * C * (hc // 2) * (wc // 2)
    moments = N * hc * wc * taps * (taps + 2)
    return (
        Cost(F32 * (x + C * taps + 2 * pooled + 5 * C) + U8 * pooled, E * (2 * taps + 5) + moments),
        Cost(
            F32 * (x + 2 * C * taps + 2 * pooled + 8 * C) + U8 * pooled,
            pooled * (2 * taps + 7) + moments,
        ),
    )


def bn_relu_pool_cost(shape) -> tuple[Cost, Cost]:
    """c [N, C, H, W]."""
    N, C, H, W = shape
    E, pooled = N * C * H * W, N * C * (H // 2) * (W // 2)
    return (
        Cost(F32 * (E + pooled + 4 * C) + U8 * pooled, 7 * E),
        Cost(F32 * (2 * E + pooled + 6 * C) + U8 * pooled, 2 * E + 10 * pooled),
    )


# ---------------------------------------------------------------- the ops at their sizes


def inner_update(device: str, quick: bool) -> OpWork:
    """MAML's update of 16 (GPU: 32) tasks' flattened parameters."""
    T, P = _sizes(device, quick, (16, 1_000_003), (32, 12_000_000), (4, 10_001))
    g, go = _randn(T, P, device=device), _randn(T, P, device=device)
    alpha = torch.tensor(0.4, device=device)
    return OpWork(
        "inner_update",
        "",
        f"T={T} P={P}",
        (_randn(P, device=device), alpha, g),
        lambda out: (go, alpha, g, True, False),
        *inner_update_cost(T, P),
    )


# ProtoNet episodes: B x 60-way 5-shot 5 queries/class, D = 1600 (conv4 on 84x84)
PROTONET_CPU = (16, 60, 5, 5, 1600)  # B, ways C, shots K, queries per class Q, D
PROTONET_CUDA = (256, 60, 5, 5, 1600)
PROTONET_QUICK = (2, 5, 2, 3, 16)


def _protonet_episode(device: str, quick: bool):
    B, C, K, Q, D = _sizes(device, quick, PROTONET_CPU, PROTONET_CUDA, PROTONET_QUICK)
    support, ys, queries, yq = (t.detach() for t in episode(B, C, K, Q, D, device))
    return (B, C, K, Q, D), support, ys, queries, yq


def class_prototypes(device: str, quick: bool) -> OpWork:
    (B, C, K, Q, D), support, ys, _, _ = _protonet_episode(device, quick)
    grad = _randn(B, C, D, device=device)
    return OpWork(
        "class_prototypes",
        "",
        f"B={B} S={C * K} C={C} D={D}",
        (support, ys, C),
        lambda out: (grad, ys),
        *class_prototypes_cost(B, C * K, C, D),
    )


def _distances(name: str, cost, backward, extra: tuple, device: str, quick: bool) -> OpWork:
    """squared_distances or cosine_similarities of the episode's queries and prototypes."""
    (B, C, K, Q, D), support, _, queries, _ = _protonet_episode(device, quick)
    prototypes = support[:, :C].contiguous()
    grad = _randn(B, C * Q, C, device=device)
    return OpWork(
        name,
        "",
        f"B={B} M={C * Q} C={C} D={D}",
        (queries, prototypes, *extra),
        lambda out: (grad, queries, prototypes, *extra),
        *cost(B, C * Q, C, D),
        torch_backward=backward,
    )


squared_distances = functools.partial(
    _distances, "squared_distances", squared_distances_cost, squared_distances_backward, ()
)
cosine_similarities = functools.partial(
    _distances,
    "cosine_similarities",
    cosine_similarities_cost,
    cosine_similarities_backward,
    (1e-8,),
)


def prototypical_cross_entropy(distance: int, device: str, quick: bool) -> OpWork:
    (B, C, K, Q, D), support, _, queries, yq = _protonet_episode(device, quick)
    prototypes = support[:, :C].contiguous()
    tau = torch.tensor(0.05, device=device)
    grad = _randn(B, C * Q, device=device)
    return OpWork(
        "prototypical_cross_entropy",
        DISTANCES[distance],
        f"B={B} M={C * Q} C={C} D={D}",
        (queries, prototypes, yq, tau, distance),
        lambda out: (grad, queries, prototypes, yq, tau, out[2], distance),
        *prototypical_cross_entropy_cost(B, C * Q, C, D, distance),
    )


def attention_read(device: str, quick: bool) -> OpWork:
    """Meta Networks' conv4 last layer (64 -> 64, 3x3 on 3x3 maps: L = 9 patches of
    K = 576), B episodes of 5-way 1-shot, 15 queries per class."""
    B, M, N, L, O, K = _sizes(
        device, quick, (8, 75, 5, 9, 64, 576), (256, 75, 5, 9, 64, 576), (2, 4, 3, 2, 5, 6)
    )
    a = torch.softmax(_randn(B, M, N, device=device), -1)
    w, x = _randn(B, N, O, K, device=device), _randn(B, M, L, K, device=device)
    go = _randn(B, M, L, O, device=device)
    return OpWork(
        "attention_read",
        "",
        f"B={B} M={M} N={N} L={L} O={O} K={K}",
        (a, w, x),
        lambda out: (go, a, w, x, True, True, True),
        *attention_read_cost(B, M, N, L, O, K),
    )


def gradient_mlp(device: str, quick: bool) -> OpWork:
    """Meta Networks' generator on 40 (GPU: 1280) examples' gradients of a 64x576 layer."""
    rows, cols, H = _sizes(device, quick, (40, 36864, 20), (1280, 36864, 20), (4, 576, 5))
    grads = _randn(rows, cols, device=device) * 1e-3  # both branches of the preprocessing
    w1, b1, w2 = _randn(H, 2, device=device), _randn(H, device=device), _randn(H, device=device)
    b2, go = torch.tensor(0.1, device=device), _randn(rows, cols, device=device)
    return OpWork(
        "gradient_mlp",
        "",
        f"grads [{rows}, {cols}] H={H}",
        (grads, w1, b1, w2, b2, 10.0),
        lambda out: (go, grads, w1, b1, w2, 10.0, True),
        *gradient_mlp_cost(rows * cols, H),
    )


def gradient_lstm(device: str, quick: bool) -> OpWork:
    """Meta Networks' LSTM d on 8 (GPU: 256) episodes of 5 examples' gradients of 4608
    coordinates (a 64x72 layer), H = 20."""
    B, N, P, H = _sizes(device, quick, (8, 5, 4608, 20), (256, 5, 4608, 20), (2, 3, 40, 5))
    grads = _randn(B, N, P, device=device) * 1e-3  # both branches of the preprocessing
    w_ih, w_hh = _randn(4 * H, 2, device=device), _randn(4 * H, H, device=device) / H**0.5
    b, w_out = _randn(4 * H, device=device), _randn(H, device=device)
    b_out, go = torch.tensor(0.1, device=device), _randn(B, P, device=device)
    return OpWork(
        "gradient_lstm",
        "",
        f"grads [{B}, {N}, {P}] H={H}",
        (grads, w_ih, w_hh, b, w_out, b_out, 10.0),
        lambda out: (go, grads, w_ih, w_hh, b, w_out, 10.0, True),
        *gradient_lstm_cost(B * P, N, H),
    )


def _bn_parameters(C: int, device: str):
    gamma = torch.rand(C, device=device) + 0.5
    return gamma, torch.rand(C, device=device) - 0.5


def conv_block(device: str, quick: bool) -> OpWork:
    """conv4's first layer (1 -> 64, 3x3, padding 1) on 300 (GPU: 4800) 28x28 images,
    4 (64) MAML tasks' 75 query images."""
    images = _sizes(device, quick, 300, 4800, 6)
    x = torch.rand(images, 1, 28, 28, device=device)
    weight, bias = _randn(64, 1, 3, 3, device=device) / 3, _randn(64, device=device) * 0.1
    gamma, beta = _bn_parameters(64, device)
    go = _randn(images, 64, 14, 14, device=device)
    params = (x, weight, bias, gamma, beta)
    return OpWork(
        "conv_block",
        "",
        f"x [{images}, 1, 28, 28] weight [64, 1, 3, 3]",
        (*params, 1, 1, 1e-5),
        lambda out: (go, *params, *out[1:], 1, 1, False),
        *conv_block_cost(x.shape, weight.shape, (1, 1)),
    )


def bn_relu_pool(device: str, quick: bool) -> OpWork:
    """conv4's second layer's activations of 8 (GPU: 64) MAML tasks' 75 query images."""
    shape = _sizes(device, quick, (600, 64, 14, 14), (4800, 64, 14, 14), (6, 8, 6, 6))
    c = _randn(*shape, device=device)
    gamma, beta = _bn_parameters(shape[1], device)
    go = _randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=device)
    return OpWork(
        "bn_relu_pool",
        "",
        f"c {list(shape)}",
        (c, gamma, beta, 1e-5),
        lambda out: (go, c, gamma, beta, *out[1:]),
        *bn_relu_pool_cost(shape),
    )


# Each builds its tensors when called (one op's at a time are alive).
WORK: tuple[Callable[[str, bool], OpWork], ...] = (
    inner_update,
    class_prototypes,
    squared_distances,
    cosine_similarities,
    *(functools.partial(prototypical_cross_entropy, d) for d in range(len(DISTANCES))),
    attention_read,
    gradient_mlp,
    gradient_lstm,
    conv_block,
    bn_relu_pool,
)
