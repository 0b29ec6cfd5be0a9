"""Synthetic task families that need no download: sinusoid regression (Finn et al.,
2017) and few-shot classification of Gaussian clusters."""

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from fastmeta.data.sampler import Episodes, check_positive, make_generator


class SinusoidTasks:
    """Batches of T sinusoid regression tasks y = A sin(x - phase), as in MAML:
    A ~ U[0.1, 5], phase ~ U[0, pi] per task, x ~ U[-5, 5] per point.

    sample() -> Episodes(support_x [T, K, 1], support_y [T, K, 1],
                         query_x [T, Q, 1], query_y [T, Q, 1]), float32 on `device`.
    Iteration is endless. Reproducible from `seed` (None: drawn from torch's global RNG).
    """

    def __init__(
        self,
        *,
        shots: int,
        queries: int,
        tasks: int = 1,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ):
        check_positive(shots=shots, queries=queries, tasks=tasks)
        self.shots, self.queries, self.tasks = shots, queries, tasks
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.device = torch.device(device)
        self.generator = make_generator(seed, self.device)

    def _uniform(self, bounds: tuple[float, float], *shape: int) -> Tensor:
        low, high = bounds
        u = torch.rand(*shape, generator=self.generator, device=self.device)
        return u.mul_(high - low).add_(low)

    def sample(self) -> Episodes:
        t = self.tasks
        amplitude = self._uniform(self.amplitude, t, 1, 1)
        phase = self._uniform(self.phase, t, 1, 1)
        support_x = self._uniform(self.x_range, t, self.shots, 1)
        query_x = self._uniform(self.x_range, t, self.queries, 1)
        return Episodes(
            support_x,
            amplitude * torch.sin(support_x - phase),
            query_x,
            amplitude * torch.sin(query_x - phase),
        )

    def __iter__(self) -> Iterator[Episodes]:
        while True:
            yield self.sample()


def gaussian_clusters(
    num_classes: int, per_class: int, dim: int, *, noise: float = 0.1, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A labelled dataset of Gaussian clusters, for EpisodeSampler.

    Class centers ~ N(0, I_dim); examples = center + noise * N(0, I_dim).
    Returns x [num_classes * per_class, dim] float32 and y [num_classes * per_class]
    int64 (class-major: per_class examples of class 0, then of class 1, ...).
    """
    check_positive(num_classes=num_classes, per_class=per_class, dim=dim)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, 1, dim, generator=generator)
    x = centers + noise * torch.randn(num_classes, per_class, dim, generator=generator)
    return x.reshape(-1, dim), torch.arange(num_classes).repeat_interleave(per_class)
