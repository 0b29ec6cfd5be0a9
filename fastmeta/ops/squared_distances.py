"""Squared Euclidean distances between queries and prototypes.

    d[b, m, k] = ||q_bm - c_bk||^2 = ||q||^2 + ||c||^2 - 2 q . c        [B, M, C]
computed as one batched GEMM plus an epilogue; entries where the three terms
cancel (d <= ratio * (||q||^2 + ||c||^2): 1e-2 in float32, 1e-6 in float64, i.e.
nearly identical points) are recomputed directly, so identical points give
exactly 0, no entry is negative, and the gradient at zero distance is finite
(unlike torch.cdist, whose square root has an infinite derivative there).
Backward, with gd = dL/dd [B, M, C] (plain differentiable torch ops: GEMMs):
    d_q = 2 (rowsum(gd) q - gd C),    d_c = 2 (colsum(gd) c - gd^T Q)

Op: torch.ops.fastmeta.squared_distances. Backends: reference (here), cpu and
cuda (csrc/{cpu,cuda}/squared_distances_*), triton (fastmeta/kernels/protonet_triton.py).
"""

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


def check_squared_distances_args(queries: Tensor, prototypes: Tensor) -> None:
    name = "fastmeta.squared_distances"
    check_episode_pair(name, "queries", queries, "prototypes", prototypes)
    check_same_dtype_device(name, "queries", queries, prototypes=prototypes)


def refined_squared_distances(q: Tensor, c: Tensor) -> Tensor:
    """||q - c||^2 [B, M, C] in q's dtype (the math dtype) as the kernels compute it:
    the GEMM form, and the entries where it cancels recomputed directly (differentiable
    torch ops; the `nonzero` syncs a GPU)."""
    qn = q.pow(2).sum(-1)  # [B, M]
    cn = c.pow(2).sum(-1)  # [B, C]
    scale = qn[:, :, None] + cn[:, None, :]
    dist = scale - 2 * torch.bmm(q, c.transpose(1, 2))
    ratio = 1e-6 if q.dtype == torch.float64 else 1e-2
    b, m, k = (dist <= ratio * scale).nonzero(as_tuple=True)
    if len(b):  # cancellation: recompute directly
        dist = dist.index_put((b, m, k), (q[b, m] - c[b, k]).pow(2).sum(-1))
    return dist


def squared_distances_forward_reference(queries: Tensor, prototypes: Tensor) -> Tensor:
    return refined_squared_distances(*opmath(queries, prototypes)).to(queries.dtype)


def squared_distances_backward(grad: Tensor, queries: Tensor, prototypes: Tensor):
    # contiguous: a broadcast gradient (stride 0, from a .sum()) takes bmm's slow path
    gd, q, c = opmath(grad.contiguous(), queries, prototypes)
    d_queries = 2 * (gd.sum(2, keepdim=True) * q - torch.bmm(gd, c))
    d_prototypes = 2 * (gd.sum(1)[..., None] * c - torch.bmm(gd.transpose(1, 2), q))
    return d_queries.to(queries.dtype), d_prototypes.to(prototypes.dtype)


SQUARED_DISTANCES = OpDeclaration(
    name="squared_distances",
    forward=Kernels(
        every_backend(
            squared_distances_forward_reference, "squared_distances_forward", "protonet_triton"
        ),
        race_on=(0, 1),
    ),
    dtypes={"cpu": FLOAT32_64 + HALF, "cuda": FLOAT32_64 + HALF, "triton": FLOAT32 + HALF},
    upcast=("cpu", "cuda"),
    differentiable=ANY_ORDER,  # the backward is differentiable torch ops (GEMMs)
)


def squared_distances_forward(queries: Tensor, prototypes: Tensor) -> Tensor:
    check_squared_distances_args(queries, prototypes)
    return SQUARED_DISTANCES.run_forward(queries.contiguous(), prototypes.contiguous())


squared_distances_op = torch.library.custom_op("fastmeta::squared_distances", mutates_args=())(
    squared_distances_forward
)


@squared_distances_op.register_fake
@on_one_device(squared_distances_op)
def _(queries, prototypes):
    check_squared_distances_args(queries, prototypes)
    return queries.new_empty(queries.shape[0], queries.shape[1], prototypes.shape[1])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    queries, prototypes = ctx.saved_tensors
    return squared_distances_backward(grad, queries, prototypes)


squared_distances_op.register_autograd(_backward, setup_context=_setup)
register_float32_autocast(squared_distances_op)
_Eager = eager_function("squared_distances", squared_distances_forward, _setup, _backward)


def squared_distances(queries: Tensor, prototypes: Tensor) -> Tensor:
    """The op ([B, M, D], [B, C, D] -> [B, M, C]), on its eager fast path where one
    applies (fastmeta/ops/eager.py)."""
    if eager_path(queries, prototypes):
        return _Eager.apply(queries, prototypes)
    return squared_distances_op(queries, prototypes)
