"""The algorithms the CLI trains, by name: each builds its model for a dataset and
computes the training loss and the per-episode accuracy of a batch of Episodes."""

from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmeta
from fastmeta.cli.checkpoint import BEFORE_IT_EXISTED
from fastmeta.cli.models import encoder
from fastmeta.data import Episodes
from fastmeta.metanet import networks as metanet_networks
from fastmeta.profiling import phase

FUSED_BLOCK_OPS = ("conv_block", "bn_relu_pool")  # conv4's blocks on CPU (fused_blocks.py)


class Algorithm(Protocol):
    ops: tuple[str, ...]  # the fastmeta ops it runs (for the summary's backend report)

    def build(self, input_shape: Sequence[int], ways: int) -> nn.Module:
        """The model whose parameters the outer-loop optimizer trains."""

    def loss(self, model: nn.Module, episodes: Episodes, ways: int) -> tuple[Tensor, Tensor]:
        """(mean query loss [], mean query accuracy []) of a batch, in training mode."""

    def accuracy(self, model: nn.Module, episodes: Episodes, ways: int) -> Tensor:
        """Query accuracy of each episode [T], as evaluated on unseen classes."""


class ProtoNetAlgorithm:
    """fastmeta.ProtoNet around conv4 (images) or an MLP (vectors); conv4's blocks run
    as the fused conv_block / bn_relu_pool ops in training (fuse=True)."""

    ops = ("class_prototypes", "prototypical_cross_entropy", "squared_distances", *FUSED_BLOCK_OPS)

    def build(self, input_shape: Sequence[int], ways: int) -> nn.Module:
        return fastmeta.ProtoNet(encoder(input_shape)[0], fuse=True)

    def loss(self, model: nn.Module, episodes: Episodes, ways: int) -> tuple[Tensor, Tensor]:
        model.train()
        return model.loss(*episodes, num_classes=ways)

    def accuracy(self, model: nn.Module, episodes: Episodes, ways: int) -> Tensor:
        model.eval()
        with torch.no_grad():
            logits = model(episodes.support_x, episodes.support_y, episodes.query_x, ways)
        return (logits.argmax(-1) == episodes.query_y).float().mean(-1)


class MAMLAlgorithm:
    """fastmeta.MAML or fastmeta.MetaSGD around conv4 or an MLP with a `ways`-way
    linear head; cross-entropy. Batch norm uses each task's batch statistics, in
    training and evaluation alike (as in the MAML reference code)."""

    ops = ("inner_update", *FUSED_BLOCK_OPS)

    def __init__(self, args: Namespace, meta_sgd: bool):
        self.meta_sgd = meta_sgd
        self.inner_lr, self.first_order = args.inner_lr, args.first_order
        self.steps, self.eval_steps = args.inner_steps, args.eval_inner_steps
        # bounded memory (fastmeta.maml.meta_step); absent from runs saved before them
        self.memory = {
            "max_memory": getattr(args, "max_memory", None),
            "chunk_size": getattr(args, "chunk_size", None),
            "checkpoint": getattr(args, "checkpoint_inner", False),
        }

    def build(self, input_shape: Sequence[int], ways: int) -> nn.Module:
        body, size = encoder(input_shape)
        meta = fastmeta.MetaSGD if self.meta_sgd else fastmeta.MAML
        return meta(
            nn.Sequential(body, nn.Linear(size, ways)),
            lr=self.inner_lr,
            first_order=self.first_order,
        )

    @staticmethod
    def _check_head(model: nn.Module, ways: int) -> None:
        head = model.module[-1].out_features
        if ways != head:
            raise ValueError(f"this model has a {head}-way head; evaluate it with --ways {head}")

    def _query_logits(
        self, model: nn.Module, episodes: Episodes, ways: int, steps: int, first_order: bool
    ) -> Tensor:
        """[T, N*Q, ways] after `steps` inner steps on each task's support set."""
        self._check_head(model, ways)
        model.train()
        learner = model.adapt_batch(
            episodes.support_x,
            episodes.support_y,
            F.cross_entropy,
            steps=steps,
            first_order=first_order,
        )
        return learner(episodes.query_x)

    def loss(self, model: nn.Module, episodes: Episodes, ways: int) -> tuple[Tensor, Tensor]:
        logits = self._query_logits(model, episodes, ways, self.steps, self.first_order)
        loss = F.cross_entropy(logits.flatten(0, 1), episodes.query_y.flatten())
        return loss, (logits.argmax(-1) == episodes.query_y).float().mean()

    def train_step(
        self, model: nn.Module, episodes: Episodes, ways: int, weight: float
    ) -> tuple[Tensor, Tensor]:
        """loss()'s (loss, accuracy), with weight times the loss's gradient accumulated
        into .grad by model.meta_step: a chunk of tasks at a time under --max-memory
        or --chunk-size, the inner loop recomputed with --checkpoint-inner."""
        self._check_head(model, ways)
        model.train()
        result = model.meta_step(
            *episodes,
            F.cross_entropy,
            steps=self.steps,
            first_order=self.first_order,
            scale=weight,
            **self.memory,
        )
        return result.loss, result.accuracy

    def accuracy(self, model: nn.Module, episodes: Episodes, ways: int) -> Tensor:
        logits = self._query_logits(model, episodes, ways, self.eval_steps, first_order=True)
        return (logits.argmax(-1) == episodes.query_y).float().mean(-1)


class MetaNetAlgorithm:
    """fastmeta.MetaNetwork: conv4 (images) or MLP (vectors) base and representation
    learners with augmented layers; a `ways`-way classifier; d as --task-generator."""

    ops = ("attention_read", "gradient_mlp", "gradient_lstm", *FUSED_BLOCK_OPS)

    def __init__(self, args: Namespace):
        # absent from an older run's arguments: what that run was trained with
        self.task_generator = getattr(args, "task_generator", BEFORE_IT_EXISTED["task_generator"])
        self.attention_scale = getattr(
            args, "attention_scale", BEFORE_IT_EXISTED["attention_scale"]
        )

    def build(self, input_shape: Sequence[int], ways: int) -> nn.Module:
        networks = metanet_networks(input_shape, ways)
        return fastmeta.MetaNetwork(
            *networks, task_generator=self.task_generator, attention_scale=self.attention_scale
        )

    def loss(self, model: nn.Module, episodes: Episodes, ways: int) -> tuple[Tensor, Tensor]:
        model.train()
        return model.loss(*episodes)

    def accuracy(self, model: nn.Module, episodes: Episodes, ways: int) -> Tensor:
        model.eval()  # the support-set gradients are still taken: no torch.no_grad
        logits = model(episodes.support_x, episodes.support_y, episodes.query_x).detach()
        return (logits.argmax(-1) == episodes.query_y).float().mean(-1)


@dataclass(frozen=True)
class Entry:
    requires: str  # the fastmeta attribute the algorithm is built on
    make: Callable[[Namespace], Algorithm] | None  # None: no CLI trainer for it yet
    fixed_ways: bool = True  # its model has a --ways-way output layer


REGISTRY: dict[str, Entry] = {
    "protonet": Entry("ProtoNet", lambda args: ProtoNetAlgorithm(), fixed_ways=False),
    "maml": Entry("MAML", lambda args: MAMLAlgorithm(args, meta_sgd=False)),
    "metasgd": Entry("MetaSGD", lambda args: MAMLAlgorithm(args, meta_sgd=True)),
    "metanet": Entry("MetaNetwork", MetaNetAlgorithm),
}


def train_step(
    algorithm: Algorithm, model: nn.Module, episodes: Episodes, ways: int, weight: float
) -> tuple[Tensor, Tensor]:
    """The batch's (loss, accuracy); weight times the loss's gradient is accumulated
    into .grad: by the algorithm's own train_step where it has one (MAML, Meta-SGD:
    bounded memory), else by loss().backward()."""
    own = getattr(algorithm, "train_step", None)
    if own is not None:
        return own(model, episodes, ways, weight)
    loss, accuracy = algorithm.loss(model, episodes, ways)
    with phase("outer_backward"):
        (loss * weight).backward()
    return loss, accuracy


def available(name: str) -> bool:
    entry = REGISTRY[name]
    return entry.make is not None and hasattr(fastmeta, entry.requires)


def get(name: str, args: Namespace) -> Algorithm:
    """The algorithm `name`, configured from args; a ValueError if this build lacks it."""
    if not available(name):
        raise ValueError(
            f"algorithm {name} is not available in this build of fastmeta yet "
            f"(it needs fastmeta.{REGISTRY[name].requires}); available: "
            f"{', '.join(n for n in REGISTRY if available(n))}"
        )
    return REGISTRY[name].make(args)
