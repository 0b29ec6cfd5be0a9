"""How the augmented layers run in each pass of a MetaNetwork episode (FastBranch
objects, fastmeta.metanet.layers), in two implementations of the same math:

  FUSED  support pass: record each layer's input rows and pre-activation z; every
         example's weight gradient is dz_i^T rows_i [O, K], from one backward of the
         summed loss (exact while examples do not interact after the layer).
         generators: the fused gradient_mlp (and gradient_lstm) ops. query pass: the
         fused attention_read op.
  PLAIN  support pass: every example gets its own copy of the weight, and autograd
         gives the gradient w.r.t. each copy. generators: their [.., hidden]
         activations (and every LSTM step's gates) built. query pass: every query's
         mixed weights sum_i a_ji W*_i built, then applied.

The task-level pass (Q*, one fast weight per episode) is a batched matmul in both.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmeta.metanet.generator import GradientLSTM, GradientMLP
from fastmeta.metanet.layers import AugmentedLayer, FastBranch
from fastmeta.ops.attention_read import attention_read, attention_read_forward_reference


class _Recorder:
    """Support-pass branch: slow weights only; collects what per-example gradients need."""

    def __init__(self, create_graph: bool):
        self.create_graph = create_graph
        self.records: list[tuple[AugmentedLayer, Tensor, Tensor]] = []

    def per_example_gradients(self, loss: Tensor) -> list[Tensor]:
        """d loss_i / d W for each example i and each recorded layer: [n, O, K] each."""
        raise NotImplementedError


class _RowRecorder(_Recorder):
    def __call__(self, layer: AugmentedLayer, x: Tensor) -> tuple[Tensor, None]:
        z = layer.slow(x)
        self.records.append((layer, layer.rows(x), z))
        return z, None

    def per_example_gradients(self, loss):
        zs = [z for _, _, z in self.records]
        dzs = torch.autograd.grad(loss, zs, create_graph=self.create_graph)
        grads = []
        for (layer, rows, _), dz in zip(self.records, dzs):
            rows = rows if self.create_graph else rows.detach()
            grads.append(layer.to_rows(dz).transpose(1, 2) @ rows)  # [n, O, L] @ [n, L, K]
        return grads


class _CopyRecorder(_Recorder):
    def __call__(self, layer: AugmentedLayer, x: Tensor) -> tuple[Tensor, None]:
        n = x.shape[0]
        copies = layer.weight.reshape(1, layer.weight.shape[0], -1).expand(n, -1, -1).clone()
        y = layer.rows(x) @ copies.transpose(1, 2) + layer.bias  # [n, L, O]
        self.records.append((layer, copies, y))
        return layer.from_rows(y, x), None

    def per_example_gradients(self, loss):
        copies = [c for _, c, _ in self.records]
        return list(torch.autograd.grad(loss, copies, create_graph=self.create_graph))


def _reader(read):
    def make(attention: Tensor, weights: dict[AugmentedLayer, Tensor]):
        """Query-pass branch: each layer adds read(attention [B, M, N],
        weights[layer] [B, N, O, K], rows [B, M, L, K])."""
        B, M, _ = attention.shape

        def branch(layer: AugmentedLayer, x: Tensor) -> tuple[Tensor, Tensor]:
            rows = layer.rows(x)
            fast = read(attention, weights[layer], rows.reshape(B, M, *rows.shape[1:]))
            return layer.slow(x), layer.from_rows(fast.flatten(0, 1), x)

        return branch

    return make


def task_branch(weights: dict[AugmentedLayer, Tensor], episodes: int):
    """Task-level branch: every example of episode b uses weights[layer][b] [O, K]."""

    def branch(layer: AugmentedLayer, x: Tensor) -> tuple[Tensor, Tensor]:
        rows = layer.rows(x)  # [B * n, L, K]
        fast = rows.reshape(episodes, -1, rows.shape[2]) @ weights[layer].transpose(1, 2)
        return layer.slow(x), layer.from_rows(fast.reshape(*rows.shape[:2], -1), x)

    return branch


Generator = GradientMLP | GradientLSTM


def _fused_generator(generator: Generator, grads: Tensor) -> Tensor:
    return generator(grads)


def _plain_generator(generator: Generator, grads: Tensor) -> Tensor:
    return generator.plain(grads)


@dataclass(frozen=True)
class Implementation:
    recorder: type[_Recorder]  # support pass: per-example gradients
    generate: Callable[[Generator, Tensor], Tensor]  # gradients -> fast weights
    reader: Callable[[Tensor, dict[AugmentedLayer, Tensor]], FastBranch]  # query pass


FUSED = Implementation(_RowRecorder, _fused_generator, _reader(attention_read))
PLAIN = Implementation(_CopyRecorder, _plain_generator, _reader(attention_read_forward_reference))
