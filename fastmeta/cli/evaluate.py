"""Mean accuracy with a 95% confidence interval over many episodes."""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastmeta.cli.algorithms import Algorithm
from fastmeta.cli.data import TaskData
from fastmeta.distributed import Ranks

EVAL_IMAGES = 1024  # examples per evaluation batch: bounds conv4 activations (~200 MB each)


def format_accuracy(mean: float, ci95: float, **_) -> str:
    """ "92.53% ± 0.42%"; takes an Accuracy's dict (extra keys ignored)."""
    return f"{100 * mean:.2f}% ± {100 * ci95:.2f}%"


@dataclass(frozen=True)
class Accuracy:
    mean: float
    ci95: float  # half-width: 1.96 * std / sqrt(episodes)
    episodes: int

    def __str__(self) -> str:
        return format_accuracy(self.mean, self.ci95)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    algorithm: Algorithm,
    model: nn.Module,
    data: TaskData,
    split: str,
    *,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int,
    ranks: Ranks,
) -> Accuracy:
    """Accuracy over `episodes` ways-way shots-shot episodes of `split`'s classes,
    the same episodes for the same seed. Batches hold at most EVAL_IMAGES examples.
    Each of several ranks scores its share of every batch and the per-episode
    accuracies [batches, T] are summed over the ranks (zeros elsewhere): the result
    does not depend on the number of ranks, and every rank gets it."""
    tasks = max(1, min(episodes, EVAL_IMAGES // (ways * (shots + queries))))
    sampler = data.sampler(split, ways=ways, shots=shots, queries=queries, tasks=tasks, seed=seed)
    share = ranks.share(tasks)
    accuracies = torch.zeros(-(-episodes // tasks), tasks, dtype=torch.float64, device=ranks.device)
    for batch in accuracies:
        mine = sampler.sample(share)  # every rank draws every batch: the streams stay equal
        if share.stop > share.start:
            batch[share] = algorithm.accuracy(model, mine, ways)
    accuracies = ranks.all_reduce_(accuracies, f"evaluation on the {split} classes")
    accuracies = accuracies.flatten()[:episodes].cpu()
    std = float(accuracies.std()) if episodes > 1 else 0.0
    return Accuracy(float(accuracies.mean()), 1.96 * std / math.sqrt(episodes), episodes)
