"""The labelled data a run samples episodes from, split into disjoint train / val /
test classes."""

from argparse import Namespace
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmeta.data import EpisodeSampler, gaussian_clusters, load_omniglot, split_classes

SPLITS = ("train", "val", "test")
# Gaussian clusters in 32 dimensions; ProtoNet 5-way 1-shot: ~73% after 1 step, ~81% after 300.
SYNTHETIC = {"num_classes": 200, "per_class": 20, "dim": 32, "noise": 1.0}
SYNTHETIC_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class TaskData:
    """x [S, ...] and y [S] on the run's device; classes[split]: the label values of
    "train", "val" and "test" [C_split], disjoint."""

    name: str
    x: Tensor
    y: Tensor
    classes: dict[str, Tensor]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def sampler(
        self, split: str, *, ways: int, shots: int, queries: int, tasks: int, seed: int
    ) -> EpisodeSampler:
        """Episodes of `split`'s classes; a ValueError names the split."""
        try:
            return EpisodeSampler(
                self.x,
                self.y,
                ways=ways,
                shots=shots,
                queries=queries,
                tasks=tasks,
                classes=self.classes[split],
                seed=seed,
            )
        except ValueError as error:
            raise ValueError(f"{self.name} {split} classes: {error}") from None


def load(args: Namespace, device: torch.device) -> TaskData:
    """The data named by args.data (synthetic | omniglot), with args.data_dir,
    args.held_out (omniglot test alphabets), args.val_fraction (share of the
    non-test classes held for validation) and args.augment (omniglot: rotated
    copies of the training characters as new classes)."""
    if args.data == "synthetic":
        x, y = gaussian_clusters(**SYNTHETIC, seed=0)
        kept = 1 - SYNTHETIC_TEST_FRACTION
        train, val, test = split_classes(
            SYNTHETIC["num_classes"],
            (kept * (1 - args.val_fraction), kept * args.val_fraction, SYNTHETIC_TEST_FRACTION),
        )
    else:
        omniglot = load_omniglot(args.data_dir)
        kept, test = omniglot.alphabet_split(args.held_out)
        train, val = split_classes(kept, (1 - args.val_fraction, args.val_fraction))
        x, y = omniglot.images, omniglot.labels
        if args.augment:  # character c turned by k * 90 degrees is class 4c + k
            rotated = omniglot.rotated()
            x, y = rotated.images, rotated.labels
            train = (4 * train[:, None] + torch.arange(4)).flatten()
            val, test = 4 * val, 4 * test
    return TaskData(args.data, x.to(device), y.to(device), dict(zip(SPLITS, (train, val, test))))
