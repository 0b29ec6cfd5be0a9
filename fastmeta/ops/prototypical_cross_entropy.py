"""Prototypical cross-entropy: distances, log-softmax and cross-entropy, fused.

Logits z[b, m, k] = tau f(q_bm, c_bk) for the `distance` chosen (DISTANCES), each a
function of dot = q . c, a = ||q||^2 and b = ||c||^2, so every kernel is one GEMM
(Q C^T) plus an epilogue:
    squared_euclidean (default)  f = -||q - c||^2 = -(a + b - 2 dot); -tau a is the same
                                 for every class and cancels in the softmax, so the
                                 kernels use f' = 2 dot - b
    euclidean                    f = -||q - c|| = -sqrt(a + b - 2 dot)
    cosine                       f = dot / (max(sqrt a, eps) max(sqrt b, eps)), eps = 1e-8
                                 (a zero row gives 0, never NaN)
    loss[b, m] = logsumexp_k z[b, m, :] - z[b, m, y_bm]
For euclidean the entries where a + b - 2 dot cancels (below 1e-2 (a + b) in float32,
1e-6 in float64: nearly identical points) are recomputed as sum_j (q_j - c_j)^2, as
squared_distances does, so a query equal to a prototype has distance exactly 0.
Never builds [B, M, C, D]; holds [B, M, C] (the softmax) for the backward.
Backward, with G = (softmax - onehot(y)) * dL/dloss [B, M, C], a weight matrix
W [B, M, C] and row and column coefficients u [B, M], v [B, C] per distance:
    d_q = tau (W C + u q),   d_c = tau (W^T Q + v c),   d_tau = sum(G f)
    squared_euclidean  W = 2 G, u = 0 (rowsum(G) = 0), v = -2 colsum(G);
                       d_tau = 2 sum_k c_k . (G^T Q)_k - colsum(G) . ||c||^2
    euclidean          W = G / d (0 where d = 0: the subgradient 0, as torch.cdist's
                       backward), u = -rowsum(W), v = -colsum(W); d_tau = -sum(G d);
                       d is recomputed (one more GEMM)
    cosine             W = G / (n_q n_c) with n = max(||x||, eps);
                       u_m = -(q_m . (W C)_m) / a_m, v_k = -(c_k . (W^T Q)_k) / b_k
                       (0 where the norm is clamped); d_tau = sum_k c_k . (W^T Q)_k
                       (cpu, cuda: no recomputation, the row and column sums come from
                       the GEMMs; triton recomputes f as the euclidean does)
    For both, d_tau is taken as sum(G (f - f_y)) (f_y: the score of the row's label;
    equal, as sum_k G = 0), so the softmax's rounding is not multiplied by the part of
    the scores every class of a row shares.
Under create_graph (second-order meta-learning through a ProtoNet head) the
backward recomputes the softmax from the inputs with differentiable torch ops, so
grad-of-grad is exact; otherwise it runs the fused backward op.

Ops: torch.ops.fastmeta.prototypical_cross_entropy (-> losses [B, M], predictions
[B, M], softmax [B, M, C]) and ..._backward, each with a last argument
`distance: str = "squared_euclidean"`; the kernels take its index in DISTANCES.
Backends: reference (here), cpu and cuda (csrc/{cpu,cuda}/prototypical_cross_entropy_*),
triton (fastmeta/kernels/protonet_triton.py).
"""

import torch
from torch import Tensor

from fastmeta.ops._checks import (
    check_episode_pair,
    check_floating,
    check_labels,
    check_same_dtype_device,
    check_tensor,
    on_one_device,
    shape_str,
)
from fastmeta.ops._opmath import math_dtype, opmath
from fastmeta.ops.cosine_similarities import (
    cosine_similarities_backward,
    cosine_similarities_forward_reference,
)
from fastmeta.ops.declaration import (
    ANY_ORDER,
    FLOAT32,
    FLOAT32_64,
    HALF,
    Kernels,
    OpDeclaration,
    every_backend,
    register_float32_autocast,
)
from fastmeta.ops.eager import eager_function, eager_path
from fastmeta.ops.squared_distances import refined_squared_distances, squared_distances_backward
from fastmeta.validation import Labels, check_label_values

DISTANCES = ("squared_euclidean", "euclidean", "cosine")  # the kernels take the index
SQUARED_EUCLIDEAN, EUCLIDEAN, COSINE = range(3)
COSINE_EPS = 1e-8  # the norms' clamp of the cosine distance (as cosine_similarities')


def distance_code(op: str, distance) -> int:
    """The kernels' code of the distance named `distance` (its index in DISTANCES); a
    TypeError or ValueError naming the argument and the choices otherwise."""
    if not isinstance(distance, str):
        raise TypeError(
            f"{op}: distance must be a str, one of {DISTANCES}, got {type(distance).__name__}"
        )
    if distance not in DISTANCES:
        raise ValueError(f"{op}: distance must be one of {DISTANCES}, got {distance!r}")
    return DISTANCES.index(distance)


def check_query_args(name: str, queries: Tensor, labels: Tensor, tau: Tensor) -> None:
    """queries [B, M, D] (checked by the caller), integer query_labels [B, M] on the
    queries' device (values: see fastmeta.validation), tau a floating 0-d tensor of
    the queries' dtype and device."""
    check_tensor(name, "tau", tau)
    check_floating(name, "tau", tau)
    if tau.dim() != 0:
        raise ValueError(f"{name}: tau must be a scalar, got shape {shape_str(tau)}")
    check_same_dtype_device(name, "queries", queries, tau=tau)
    check_labels(name, "query_labels", labels, queries.shape[:2])
    if labels.device != queries.device:
        raise ValueError(
            f"{name}: query_labels is on {labels.device} but queries is on {queries.device}"
        )


def check_prototypical_cross_entropy_args(
    queries: Tensor, prototypes: Tensor, labels: Tensor, tau: Tensor, distance: str
) -> int:
    """The checks; returns the distance's code."""
    name = "fastmeta.prototypical_cross_entropy"
    code = distance_code(name, distance)
    check_episode_pair(name, "queries", queries, "prototypes", prototypes)
    if prototypes.shape[1] == 0:  # no class to predict: neither a loss nor an argmax
        raise ValueError(
            f"{name}: prototypes must hold at least one class, got shape {shape_str(prototypes)}"
        )
    check_same_dtype_device(name, "queries", queries, prototypes=prototypes)
    check_query_args(name, queries, labels, tau)
    return code


def safe_sqrt(s: Tensor) -> Tensor:
    """sqrt(s) for s >= 0 (NaN stays NaN) whose derivative at 0 is 0, not inf, to any
    order: the subgradient 0 of ||q - c|| at q = c, as torch.cdist's backward takes."""
    positive = s > 0
    return torch.where(positive, torch.where(positive, s, 1).sqrt(), s * 0)


def _scores(q: Tensor, c: Tensor, distance: int) -> Tensor:
    """f = logits / tau [B, M, C] (math dtype; up to a per-row constant for
    squared_euclidean: 2 Q C^T - ||c||^2)."""
    if distance == EUCLIDEAN:
        return -safe_sqrt(refined_squared_distances(q, c))
    if distance == COSINE:
        return cosine_similarities_forward_reference(q, c, COSINE_EPS)
    return 2 * torch.bmm(q, c.transpose(1, 2)) - c.pow(2).sum(-1)[:, None, :]


def _logits(queries: Tensor, prototypes: Tensor, tau: Tensor, distance: int) -> Tensor:
    """z = tau f [B, M, C] (logits up to a per-row constant)."""
    return tau * _scores(queries, prototypes, distance)


def prototypical_cross_entropy_forward_reference(queries, prototypes, labels, tau, distance):
    q, c, t = opmath(queries, prototypes, tau)
    logits = _logits(q, c, t, distance)
    log_probs = torch.log_softmax(logits, dim=-1)
    losses = -log_probs.gather(-1, labels[..., None]).squeeze(-1)
    return losses.to(queries.dtype), logits.argmax(-1), log_probs.exp()  # softmax: math dtype


def prototypical_cross_entropy_backward_reference(
    grad_losses, queries, prototypes, labels, tau, softmax, distance
):
    """The backward formulas in torch ops (differentiable when softmax is): for the
    euclidean and cosine distances, the backward of squared_distances (dL/dd^2 =
    -tau G / (2 d)) and of cosine_similarities (dL/dcos = tau G)."""
    go, q, c, t, p = opmath(grad_losses, queries, prototypes, tau, softmax)
    classes = torch.arange(c.shape[1], device=labels.device)
    onehot = (labels[..., None] == classes).to(p.dtype)  # one_hot() would read the labels
    G = (p - onehot) * go[..., None]
    if distance in (EUCLIDEAN, COSINE):
        f = _scores(q, c, distance)
        # d_tau = sum(G f) = sum(G (f - f_y)), as sum_k G = 0: the shift by the label's
        # score keeps the softmax's rounding (sum_k G = O(eps), not 0) from being
        # multiplied by the scores' common part (every distance of a row ~ its mean)
        d_tau = (G * (f - f.gather(-1, labels[..., None]))).sum()
        if distance == EUCLIDEAN:
            positive = f < 0  # d = -f > 0
            W = torch.where(positive, G / torch.where(positive, -f, 1), 0)
            d_queries, d_prototypes = squared_distances_backward(-t * W / 2, q, c)
        else:
            d_queries, d_prototypes = cosine_similarities_backward(t * G, q, c, COSINE_EPS)
    else:
        GC = torch.bmm(G, c)
        colsum = G.sum(1)  # [B, C]
        d_queries = 2 * t * GC
        d_prototypes = 2 * t * (torch.bmm(G.transpose(1, 2), q) - colsum[..., None] * c)
        d_tau = 2 * (q * GC).sum() - (colsum * c.pow(2).sum(-1)).sum()
    if G.numel() == 0 or q.shape[2] == 0:  # no term: zeros, not 0 * an infinite prototype
        d_prototypes, d_tau = torch.zeros_like(d_prototypes), torch.zeros_like(d_tau)
    return d_queries.to(queries.dtype), d_prototypes.to(prototypes.dtype), d_tau.to(tau.dtype)


PROTOTYPICAL_CROSS_ENTROPY = OpDeclaration(
    name="prototypical_cross_entropy",
    forward=Kernels(
        every_backend(
            prototypical_cross_entropy_forward_reference,
            "prototypical_cross_entropy_forward",
            "protonet_triton",
        ),
        race_on=(0, 1, 4),
        float32_outputs=(2,),  # the softmax
    ),
    backward=Kernels(
        every_backend(
            prototypical_cross_entropy_backward_reference,
            "prototypical_cross_entropy_backward",
            "protonet_triton",
        ),
        device_from=1,
        race_on=(1, 2, 6),
    ),
    dtypes={"cpu": FLOAT32_64 + HALF, "cuda": FLOAT32_64 + HALF, "triton": FLOAT32 + HALF},
    upcast=("cpu", "cuda"),
    # under create_graph the backward is recomputed with differentiable torch ops
    differentiable=ANY_ORDER,
)


def prototypical_cross_entropy_backward_differentiable(
    grad_losses, queries, prototypes, labels, tau, distance: int
):
    """The backward for create_graph: the softmax recomputed from the inputs and the
    formulas in differentiable torch ops, so grad of grad is exact."""
    q, c, t = opmath(queries, prototypes, tau)
    softmax = torch.softmax(_logits(q, c, t, distance), dim=-1)
    return prototypical_cross_entropy_backward_reference(
        grad_losses, queries, prototypes, labels.long(), tau, softmax, distance
    )


def prototypical_cross_entropy_forward(
    queries: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    tau: Tensor,
    distance: str = "squared_euclidean",
) -> tuple[Tensor, Tensor, Tensor]:
    code = check_prototypical_cross_entropy_args(queries, prototypes, labels, tau, distance)
    check_label_values(
        "fastmeta.prototypical_cross_entropy",
        Labels("query_labels", labels, prototypes.shape[1]),
    )
    return PROTOTYPICAL_CROSS_ENTROPY.run_forward(
        queries.contiguous(), prototypes.contiguous(), labels.long().contiguous(), tau, code
    )


prototypical_cross_entropy_op = torch.library.custom_op(
    "fastmeta::prototypical_cross_entropy", mutates_args=()
)(prototypical_cross_entropy_forward)


@prototypical_cross_entropy_op.register_fake
@on_one_device(prototypical_cross_entropy_op)
def _(queries, prototypes, labels, tau, distance="squared_euclidean"):
    distance_code("fastmeta.prototypical_cross_entropy", distance)
    B, M = queries.shape[:2]
    return (
        queries.new_empty(B, M),
        queries.new_empty(B, M, dtype=torch.int64),
        queries.new_empty(B, M, prototypes.shape[1], dtype=math_dtype(queries.dtype)),
    )


@torch.library.custom_op("fastmeta::prototypical_cross_entropy_backward", mutates_args=())
def prototypical_cross_entropy_backward_op(
    grad_losses: Tensor,
    queries: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    tau: Tensor,
    softmax: Tensor,
    distance: str = "squared_euclidean",
) -> tuple[Tensor, Tensor, Tensor]:
    code = check_prototypical_cross_entropy_args(queries, prototypes, labels, tau, distance)
    return PROTOTYPICAL_CROSS_ENTROPY.run_backward(
        grad_losses.contiguous(),
        queries.contiguous(),
        prototypes.contiguous(),
        labels.long().contiguous(),
        tau,
        softmax.contiguous(),
        code,
    )


@prototypical_cross_entropy_backward_op.register_fake
@on_one_device(prototypical_cross_entropy_backward_op)
def _(grad_losses, queries, prototypes, labels, tau, softmax, distance="squared_euclidean"):
    distance_code("fastmeta.prototypical_cross_entropy", distance)
    return (
        queries.new_empty(queries.shape),
        prototypes.new_empty(prototypes.shape),
        tau.new_empty(()),
    )


def _setup(ctx, inputs, output):
    queries, prototypes, labels, tau, ctx.distance = inputs
    _, predictions, softmax = output
    ctx.mark_non_differentiable(predictions, softmax)
    ctx.save_for_backward(queries, prototypes, labels, tau, softmax)


def _backward(ctx, grad_losses, _grad_predictions, _grad_softmax):
    queries, prototypes, labels, tau, softmax = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: recompute differentiably
        grads = prototypical_cross_entropy_backward_differentiable(
            grad_losses, queries, prototypes, labels, tau, DISTANCES.index(ctx.distance)
        )
    else:
        grads = prototypical_cross_entropy_backward_op(
            grad_losses, queries, prototypes, labels, tau, softmax, ctx.distance
        )
    d_queries, d_prototypes, d_tau = grads
    return d_queries, d_prototypes, None, d_tau if ctx.needs_input_grad[3] else None, None


prototypical_cross_entropy_op.register_autograd(_backward, setup_context=_setup)
register_float32_autocast(prototypical_cross_entropy_op)
_Eager = eager_function(
    "prototypical_cross_entropy", prototypical_cross_entropy_forward, _setup, _backward
)


def prototypical_cross_entropy(
    queries: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    tau: Tensor,
    distance: str = "squared_euclidean",
) -> tuple[Tensor, Tensor, Tensor]:
    """The op (losses [B, M], predictions [B, M], softmax [B, M, C]), on its eager fast
    path where one applies (fastmeta/ops/eager.py)."""
    if eager_path(queries, prototypes, labels, tau):
        return _Eager.apply(queries, prototypes, labels, tau, distance)
    return prototypical_cross_entropy_op(queries, prototypes, labels, tau, distance)
