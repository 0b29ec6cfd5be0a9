"""Prototypical Networks (Snell et al., 2017) around any encoder."""

import torch
from torch import Tensor, nn

from fastmeta import functional as F
from fastmeta.fused_blocks import fuse_conv_blocks
from fastmeta.ops.prototypical_cross_entropy import COSINE_EPS, distance_code, safe_sqrt
from fastmeta.profiling import phase


class ProtoNet(nn.Module):
    """Embeds support and query inputs with `encoder`, builds class prototypes and
    scores queries by tau f(query, prototype), with fastmeta's fused kernels: f is
    -||q - c||^2 (distance="squared_euclidean", the default), -||q - c||
    ("euclidean") or cos(q, c) ("cosine"; the norms clamped at 1e-8), see
    fastmeta.functional.

    forward(support_x, support_y, query_x, num_classes=None) -> logits [B, M, C]
    loss(support_x, support_y, query_x, query_y, num_classes=None) -> (loss, accuracy)

    Inputs are batched episodes (support_x [B, S, ...], support_y [B, S],
    query_x [B, M, ...]) or one episode (support_x [S, ...], support_y [S]); the
    encoder sees [N, ...] batches. num_classes defaults to max(support_y) + 1.
    tau is the inverse temperature (learnable with learn_tau=True). A class with no
    support example raises a ValueError (empty_classes="error"), or gets a zero
    prototype (empty_classes="zero", as torchmeta's get_prototypes has it; see
    fastmeta.functional.class_prototypes).

    fuse=True runs the encoder's Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2) runs (in
    nn.Sequentials, training mode, on CPU) as fastmeta's fused conv_block and
    bn_relu_pool ops (fastmeta.fused_blocks; a conv4 training step several times
    faster, same numbers). Those ops are differentiable once: leave fuse False where
    the loss is differentiated twice w.r.t. the encoder (create_graph through it, as in
    second-order MAML over a ProtoNet); a second derivative raises a RuntimeError.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tau: float = 1.0,
        learn_tau: bool = False,
        fuse: bool = False,
        empty_classes: str = "error",
        distance: str = "squared_euclidean",
    ):
        super().__init__()
        if empty_classes not in F.EMPTY_CLASSES:
            raise ValueError(
                f"fastmeta.ProtoNet: empty_classes must be one of {F.EMPTY_CLASSES}, "
                f"got {empty_classes!r}"
            )
        distance_code("fastmeta.ProtoNet", distance)
        self.encoder = encoder
        self.empty_classes = empty_classes
        self.distance = distance
        # The fused view (None: nothing fuses, or fuse is off) shares the encoder's
        # modules; a tuple keeps its parameters from being registered twice.
        self._fused_encoder = (fuse_conv_blocks(encoder, bn_relu_pool=True) if fuse else None,)
        tau_tensor = torch.tensor(float(tau))
        if learn_tau:
            self.tau = nn.Parameter(tau_tensor)
        else:
            self.register_buffer("tau", tau_tensor)

    def _embed(self, x: Tensor, batch_dims: int) -> Tensor:
        lead = x.shape[:batch_dims]
        fused = self._fused_encoder[0]
        encoder = self.encoder if fused is None else fused
        z = encoder(x.reshape(-1, *x.shape[batch_dims:]))
        return z.reshape(*lead, -1)

    def _episode(self, support_x, support_y, query_x, num_classes):
        batch_dims = support_y.dim()  # 1: one episode, 2: [B, S]
        with phase("query_pass"):
            support = self._embed(support_x, batch_dims)
            queries = self._embed(query_x, batch_dims)
        if num_classes is None:
            num_classes = int(support_y.max()) + 1
        return support, queries, num_classes

    def forward(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, num_classes: int | None = None
    ) -> Tensor:
        support, queries, num_classes = self._episode(support_x, support_y, query_x, num_classes)
        prototypes = F.class_prototypes(support, support_y, num_classes, self.empty_classes)
        tau = self.tau.to(queries.dtype)
        if self.distance == "cosine":
            return tau * F.cosine_similarities(queries, prototypes, COSINE_EPS)
        squared = F.squared_distances(queries, prototypes)
        if self.distance == "euclidean":  # the subgradient 0 at distance 0, not NaN
            return -tau * safe_sqrt(squared)
        return -tau * squared

    def loss(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        num_classes: int | None = None,
        reduction: str = "mean",
    ):
        support, queries, num_classes = self._episode(support_x, support_y, query_x, num_classes)
        with phase("loss"):
            return F.prototypical_loss(
                support,
                support_y,
                queries,
                query_y,
                num_classes,
                tau=self.tau.to(queries.dtype),
                reduction=reduction,
                empty_classes=self.empty_classes,
                distance=self.distance,
            )
