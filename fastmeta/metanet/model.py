"""Meta Networks (Munkhdalai and Yu, "Meta Networks", ICML 2017, arXiv:1703.00837).

For each episode (support set x'_i, y'_i, i = 1..N; queries x_j):
  1. Task-level fast weights. The representation learner u (slow weights Q) embeds the
     support set; an embedding loss (contrastive, over all pairs of support examples)
     gives each example's gradient contribution nabla_i w.r.t. u's augmented weights;
     the generator d maps them coordinate-wise to Q* = mean_i d(nabla_i).
  2. Example-level fast weights. The base learner b (slow weights W) classifies each
     support example; its cross-entropy gradient nabla_i w.r.t. b's augmented weights
     is mapped coordinate-wise by the generator m to W*_i, stored in memory.
  3. Read. Representations r = u(Q, Q*, x) of the support set (the memory's keys) and
     the queries; a_j = softmax_i cos(r_j, r'_i) (times a learned s, attention_scale);
     query j is classified by b(W, W*_j, x_j) with W*_j = sum_i a_ji W*_i (the fused
     attention_read).
  The training loss is the queries' cross-entropy; backprop trains W, Q, m, d (and s).

Choices where the paper leaves room (or where this differs), all documented in the
README: d is by default (task_generator="mlp") the same kind of coordinate-wise MLP
as m, averaged over the examples; task_generator="lstm" is the paper's d, a
coordinate-wise LSTM over the examples in the support set's order, its last hidden
state giving Q* (fastmeta.metanet.generator.GradientLSTM); the embedding loss runs on
the whole support set; per-example gradients are exact when no batch norm follows an
augmented layer (the default networks); gradients are inputs to m and d, not
differentiated through, unless second_order=True; m's output layer starts at zero, so
that a fresh model is its slow networks; attention_scale=S multiplies the cosines by a
learned s (from S), where the paper's softmax of cosines in [-1, 1] (in [0, 1] for the
ReLU features of the default networks) can give the nearest support example at most
e / (e + N - 1) of a query's attention.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.fused_blocks import fuse_conv_blocks
from fastmeta.metanet.generator import GradientLSTM, GradientMLP
from fastmeta.metanet.layers import augmented_layers, fast_branches, split_at_first_augmented
from fastmeta.metanet.networks import conv4_network
from fastmeta.metanet.passes import FUSED, PLAIN, Implementation, task_branch
from fastmeta.ops._checks import check_labels
from fastmeta.profiling import phase
from fastmeta.validation import Labels, check_label_values

NAME = "fastmeta.MetaNetwork"
TASK_GENERATORS = ("mlp", "lstm")  # the kinds of d
ATTENTION_SCALE = 10.0  # the default start S of s in softmax(s * cosine); None: the paper's


def contrastive_loss(r: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Sum over episodes of the mean over pairs i < i' of |r_i - r_i'|^2 (same class)
    or relu(margin - |r_i - r_i'|)^2 (different classes); r [B, N, R], labels [B, N]."""
    B, N, _ = r.shape
    if N < 2:
        return r.sum() * 0
    i, j = torch.triu_indices(N, N, offset=1, device=r.device)
    distance = (r[:, i] - r[:, j]).pow(2).sum(-1).clamp_min(1e-12).sqrt()  # [B, pairs]
    same = labels[:, i] == labels[:, j]
    pair_losses = torch.where(same, distance.pow(2), F.relu(margin - distance).pow(2))
    return pair_losses.mean(1).sum()


class MetaNetwork(nn.Module):
    """Meta Networks around a base learner and a representation learner.

    base: nn.Sequential classifier [n, ...] -> [n, ways] with AugmentedLinear /
      AugmentedConv2d layers (fastmeta.metanet); representation: nn.Sequential
      [n, ...] -> [n, R] with augmented layers too. Default (both None): conv4
      networks for 28x28 images with their last conv layer (and b's output layer)
      augmented; then `ways` and `in_channels` are needed.
    hidden, p: the generators m and d; margin: the contrastive loss's.
    task_generator: d, which maps the representation learner's per-example gradients
      to Q*: "mlp" (default) the mean over the examples of a coordinate-wise MLP
      (GradientMLP, as m), "lstm" a coordinate-wise LSTM over the examples in their
      order (GradientLSTM, the paper's d).
    attention_scale: None (the paper's) reads with a_j = softmax_i cos(r_j, r'_i); a
      number S > 0 with softmax_i(s cos(r_j, r'_i)), s a parameter started at S.
    second_order: differentiate through the support-set gradients too (slower).
    fused: False runs the same model in plain PyTorch (per-example weight copies,
      the generators' [.., hidden] activations, every query's mixed weights built, the
      first conv blocks as four modules): the oracle of the tests and the baseline of
      the benchmark.

    forward(support_x [B, N, ...], support_y [B, N], query_x [B, M, ...]) -> logits
    [B, M, ways]; unbatched [N, ...], [N], [M, ...] -> [M, ways] too.
    """

    def __init__(
        self,
        base: nn.Sequential | None = None,
        representation: nn.Sequential | None = None,
        *,
        ways: int | None = None,
        in_channels: int = 1,
        hidden: int = 20,
        p: float = 10.0,
        margin: float = 1.0,
        second_order: bool = False,
        fused: bool = True,
        task_generator: str = "mlp",
        attention_scale: float | None = ATTENTION_SCALE,
    ):
        super().__init__()
        if task_generator not in TASK_GENERATORS:
            raise ValueError(
                f"{NAME}: task_generator must be one of {TASK_GENERATORS}, got {task_generator!r}"
            )
        if attention_scale is not None and (
            isinstance(attention_scale, bool)
            or not isinstance(attention_scale, (int, float))
            or not 0 < attention_scale < math.inf
        ):
            raise ValueError(
                f"{NAME}: attention_scale must be a finite number > 0 or None, "
                f"got {attention_scale!r}"
            )
        if (base is None) != (representation is None):
            raise ValueError(
                "give both base and representation networks, or neither "
                "(for the default conv4 networks)"
            )
        if base is None:
            if ways is None:
                raise ValueError("the default networks need ways (the number of classes)")
            if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
                raise ValueError(f"{NAME}: ways must be an int >= 1, got {ways!r}")
            base, representation = (
                conv4_network(in_channels, ways=ways),
                conv4_network(in_channels),
            )
        self.base, self.representation = base, representation
        # Views into base and representation (slices of the Sequentials, and copies of
        # the prefixes with their conv blocks fused: fastmeta.conv_block for the first,
        # fastmeta.bn_relu_pool after the others' convolutions; the prefixes are never
        # differentiated twice, as per-example gradients stop at the augmented layers'
        # pre-activations), held in a plain tuple so that their parameters are not
        # registered a second time.
        base_prefix, base_tail = split_at_first_augmented(base)
        rep_prefix, rep_tail = split_at_first_augmented(representation)
        self._parts = (
            base_prefix,
            base_tail,
            rep_prefix,
            rep_tail,
            fuse_conv_blocks(base_prefix, bn_relu_pool=True) or base_prefix,
            fuse_conv_blocks(rep_prefix, bn_relu_pool=True) or rep_prefix,
        )
        # example-level: base gradients -> W*_i. m starts at zero (W*_i = 0): at a random
        # m(g) = c + ..., a common part c > 0 in every coordinate of W*_i, summed over the
        # K nonnegative inputs of an augmented conv layer, gave fresh query losses up to
        # 10 ln N; from zero every seed starts at ln N.
        self.m = GradientMLP(hidden, p, output_scale=0.0)
        # task-level: representation gradients -> Q*
        self.d = GradientLSTM(hidden, p) if task_generator == "lstm" else GradientMLP(hidden, p)
        self.task_generator = task_generator
        self.attention_scale = (
            None if attention_scale is None else nn.Parameter(torch.tensor(float(attention_scale)))
        )
        self.margin, self.second_order, self.fused = margin, second_order, fused

    @property
    def implementation(self) -> Implementation:
        return FUSED if self.fused else PLAIN

    def _gradients(
        self, tail: nn.Sequential, h: Tensor, loss_fn: Callable[[Tensor], Tensor]
    ) -> list[Tensor]:
        """For each augmented layer of tail, every example's gradient [n, O, K] of
        loss_fn(tail(h)) (slow weights only) w.r.t. the layer's weight."""
        recorder = self.implementation.recorder(create_graph=self.second_order)
        with fast_branches(tail, recorder):
            out = tail(h)
        return recorder.per_example_gradients(loss_fn(out))

    def _fast_weights(self, generator: GradientMLP, grads: list[Tensor]) -> list[Tensor]:
        """W*_i [n, O, K] for each layer: the generator m of each example's gradient."""
        return [self.implementation.generate(generator, g) for g in grads]

    def _task_fast_weights(self, grads: list[Tensor], episodes: int) -> list[Tensor]:
        """Q* [B, O, K] for each layer from every example's gradient [B * N, O, K]:
        d over each episode's examples (lstm), or the mean of d of each one (mlp)."""
        generate = self.implementation.generate
        per_episode = [g.view(episodes, -1, *g.shape[1:]) for g in grads]  # [B, N, O, K]
        if self.task_generator == "lstm":
            return [generate(self.d, g) for g in per_episode]
        return [generate(self.d, g).mean(1) for g in per_episode]

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        return self._logits(support_x, support_y, query_x)

    def _logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor | None = None
    ) -> Tensor:
        """forward's logits; the label values (support_y, and query_y when given: loss's
        labels, checked in the same pass) are checked once the class count is known."""
        unbatched = support_y.dim() == 1
        if unbatched:
            support_x, support_y, query_x = support_x[None], support_y[None], query_x[None]
            query_y = None if query_y is None else query_y[None]
        self._check(support_x, support_y, query_x)
        if query_y is not None:
            check_labels(NAME, "query_y", query_y, query_x.shape[:2])
        B, N, M = support_y.shape[0], support_y.shape[1], query_x.shape[1]
        xs, xq, ys = support_x.flatten(0, 1), query_x.flatten(0, 1), support_y.flatten().long()
        base_prefix, base_tail, rep_prefix, rep_tail, fused_base, fused_rep = self._parts
        if self.fused:
            base_prefix, rep_prefix = fused_base, fused_rep

        def support_loss(logits: Tensor) -> Tensor:
            check_labels(NAME, "support_y", support_y, support_y.shape)
            ways = logits.shape[-1]
            queries = () if query_y is None else (Labels("query_y", query_y, ways),)
            check_label_values(NAME, Labels("support_y", support_y, ways), *queries)
            return F.cross_entropy(logits, ys, reduction="sum")

        with phase("inner_loop"):
            # 1. Q* = d(grads of the embedding loss through each example i)
            hs = rep_prefix(xs)
            rep_grads = self._gradients(
                rep_tail, hs, lambda r: contrastive_loss(r.view(B, N, -1), support_y, self.margin)
            )
            q_star = self._task_fast_weights(rep_grads, B)  # [B, O, K] per layer
            # 2. W*_i = m(grad of the base learner's loss on support example i)
            base_grads = self._gradients(base_tail, base_prefix(xs), support_loss)
            w_star = [w.view(B, N, *w.shape[1:]) for w in self._fast_weights(self.m, base_grads)]

        with phase("query_pass"):
            # 3. the queries read sum_i a_ji W*_i, a_j attending over the support set
            q_branch = task_branch(dict(zip(augmented_layers(rep_tail), q_star)), B)
            with fast_branches(rep_tail, q_branch):
                keys = F.normalize(rep_tail(hs).view(B, N, -1), dim=-1)
                reads = F.normalize(rep_tail(rep_prefix(xq)).view(B, M, -1), dim=-1)
            scores = reads @ keys.transpose(1, 2)  # [B, M, N] cosines
            if self.attention_scale is not None:
                scores = scores * self.attention_scale
            attention = torch.softmax(scores, dim=-1)
            reader = self.implementation.reader(
                attention, dict(zip(augmented_layers(base_tail), w_star))
            )
            with fast_branches(base_tail, reader):
                logits = base_tail(base_prefix(xq)).view(B, M, -1)
        return logits[0] if unbatched else logits

    def loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(mean query cross-entropy [], mean query accuracy [])."""
        logits = self._logits(support_x, support_y, query_x, query_y)
        with phase("loss"):
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), query_y.reshape(-1).long())
            return loss, (logits.argmax(-1) == query_y).float().mean()

    def _check(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> None:
        shapes = (
            f"support_x {list(support_x.shape)}, support_y {list(support_y.shape)}, "
            f"query_x {list(query_x.shape)}"
        )
        if (
            support_y.dim() != 2
            or support_x.shape[:2] != support_y.shape
            or query_x.shape[0] != support_x.shape[0]
            or query_x.shape[2:] != support_x.shape[2:]
        ):
            raise ValueError(
                f"{NAME}: expected support_x [B, N, ...], support_y [B, N] and "
                f"query_x [B, M, ...] with the same example shape, got {shapes}"
            )
        if 0 in (support_x.shape[0], support_x.shape[1], query_x.shape[1]):
            raise ValueError(
                f"{NAME}: needs at least one episode (B), support example (N) and query (M), "
                f"got {shapes}"
            )
