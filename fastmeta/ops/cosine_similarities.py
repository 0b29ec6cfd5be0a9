"""Cosine similarities between queries and prototypes (ProtoNet variants with a cosine
head, Matching Networks).

    s[b, m, k] = q_bm . c_bk / (max(||q_bm||, eps) max(||c_bk||, eps))          [B, M, C]
i.e. s = Q^ C^T with the unit rows q^ = q / n_q, n_q = max(||q||, eps) (likewise c^).
Each norm is clamped, not its square: a zero row gives 0, never NaN. The result equals
torch.nn.functional.cosine_similarity(q[:, :, None], c[:, None], dim=-1) except for
rows of norm below eps (torch clamps the product of the norms).
Backward, with gs = dL/ds [B, M, C] (plain differentiable torch ops: GEMMs):
    d_q^ = gs C^,   d_c^ = gs^T Q^
    d_q  = (d_q^ - (d_q^ . q^) q^) / n_q   where ||q|| > eps,   d_q^ / eps   elsewhere
(the same for d_c), so the op is differentiable to any order.

Op: torch.ops.fastmeta.cosine_similarities. Backends: reference (here), cpu and cuda
(csrc/{cpu,cuda}/cosine_similarities_*), triton (fastmeta/kernels/cosine_similarities_triton.py).
"""

import math

import torch
from torch import Tensor

from fastmeta.ops._checks import check_episode_pair, check_same_dtype_device, on_one_device
from fastmeta.ops._opmath import opmath
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

NAME = "fastmeta.cosine_similarities"


def check_cosine_similarities_args(queries: Tensor, prototypes: Tensor, eps: float) -> None:
    check_episode_pair(NAME, "queries", queries, "prototypes", prototypes)
    check_same_dtype_device(NAME, "queries", queries, prototypes=prototypes)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{NAME}: eps must be a positive number, got {eps!r}")


def _unit_rows(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x / n, n) with n = max(||x||, eps) per row [..., 1]."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return x / norm, norm


def cosine_similarities_forward_reference(
    queries: Tensor, prototypes: Tensor, eps: float
) -> Tensor:
    q, c = opmath(queries, prototypes)
    q_hat, c_hat = _unit_rows(q, eps)[0], _unit_rows(c, eps)[0]
    return torch.bmm(q_hat, c_hat.transpose(1, 2)).to(queries.dtype)


def _through_normalization(d_hat: Tensor, x: Tensor, eps: float) -> Tensor:
    """d_x from d_x^ for x^ = x / max(||x||, eps) (row-wise)."""
    x_hat, norm = _unit_rows(x, eps)
    radial = (d_hat * x_hat).sum(-1, keepdim=True) * x_hat
    return torch.where(norm > eps, (d_hat - radial) / norm, d_hat / eps)


def cosine_similarities_backward(
    grad: Tensor, queries: Tensor, prototypes: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    # contiguous: a broadcast gradient (stride 0, from a .sum()) takes bmm's slow path
    gs, q, c = opmath(grad.contiguous(), queries, prototypes)
    q_hat, c_hat = _unit_rows(q, eps)[0], _unit_rows(c, eps)[0]
    d_queries = _through_normalization(torch.bmm(gs, c_hat), q, eps)
    d_prototypes = _through_normalization(torch.bmm(gs.transpose(1, 2), q_hat), c, eps)
    return d_queries.to(queries.dtype), d_prototypes.to(prototypes.dtype)


COSINE_SIMILARITIES = OpDeclaration(
    name="cosine_similarities",
    forward=Kernels(
        every_backend(
            cosine_similarities_forward_reference,
            "cosine_similarities_forward",
            "cosine_similarities_triton",
        ),
        race_on=(0, 1),
    ),
    dtypes={"cpu": FLOAT32_64 + HALF, "cuda": FLOAT32_64 + HALF, "triton": FLOAT32 + HALF},
    upcast=("cpu", "cuda"),
    differentiable=ANY_ORDER,  # the backward is differentiable torch ops (GEMMs)
)


def cosine_similarities_forward(queries: Tensor, prototypes: Tensor, eps: float) -> Tensor:
    check_cosine_similarities_args(queries, prototypes, eps)
    return COSINE_SIMILARITIES.run_forward(queries.contiguous(), prototypes.contiguous(), eps)


cosine_similarities_op = torch.library.custom_op("fastmeta::cosine_similarities", mutates_args=())(
    cosine_similarities_forward
)


@cosine_similarities_op.register_fake
@on_one_device(cosine_similarities_op)
def _(queries, prototypes, eps):
    check_cosine_similarities_args(queries, prototypes, eps)
    return queries.new_empty(queries.shape[0], queries.shape[1], prototypes.shape[1])


def _setup(ctx, inputs, output):
    queries, prototypes, ctx.eps = inputs
    ctx.save_for_backward(queries, prototypes)


def _backward(ctx, grad):
    queries, prototypes = ctx.saved_tensors
    return (*cosine_similarities_backward(grad, queries, prototypes, ctx.eps), None)


cosine_similarities_op.register_autograd(_backward, setup_context=_setup)
register_float32_autocast(cosine_similarities_op)
_Eager = eager_function("cosine_similarities", cosine_similarities_forward, _setup, _backward)


def cosine_similarities(queries: Tensor, prototypes: Tensor, eps: float) -> Tensor:
    """The op ([B, M, D], [B, C, D] -> [B, M, C]), on its eager fast path where one
    applies (fastmeta/ops/eager.py)."""
    if eager_path(queries, prototypes):
        return _Eager.apply(queries, prototypes, eps)
    return cosine_similarities_op(queries, prototypes, eps)
