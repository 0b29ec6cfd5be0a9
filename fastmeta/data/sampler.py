"""Batches of N-way K-shot episodes from a labelled dataset, and disjoint class splits."""

from collections.abc import Hashable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset


class Episodes(NamedTuple):
    """T tasks of one batch, on the sampler's device. For N-way classification:
    support_x [T, N*K, ...], support_y [T, N*K] int64, query_x [T, N*Q, ...],
    query_y [T, N*Q] int64, labels 0..N-1 in class-major order (0,..,0, 1,..,1, ...).
    Regression tasks (SinusoidTasks) hold float targets [T, K, 1] / [T, Q, 1] instead.
    Unpacks in ProtoNet.loss's order: model.loss(*episodes)."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


def check_positive(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or with a seed drawn from torch's
    global RNG when None (so torch.manual_seed makes it reproducible too)."""
    if seed is None:
        seed = int(torch.randint(2**62, ()))
    return torch.Generator(device=device).manual_seed(seed)


def _as_tensors(x: Tensor | Dataset, y: Tensor | None) -> tuple[Tensor, Tensor]:
    if isinstance(x, Tensor):
        if y is None:
            raise ValueError("y (labels [N]) is required when x is a tensor")
        return x, torch.as_tensor(y)
    if y is not None:
        raise ValueError("y must be None when x is a Dataset: its items are (x, y) pairs")
    if isinstance(x, TensorDataset) and len(x.tensors) == 2:
        return x.tensors
    # Any other Dataset is read once, item by item, into two tensors.
    items = [x[i] for i in range(len(x))]
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"Dataset items must be (x, y) pairs, got {type(item).__name__} at index {i}"
            )
    return (
        torch.stack([torch.as_tensor(item[0]) for item in items]),
        torch.as_tensor([item[1] for item in items]),
    )


def _check_labels(x: Tensor, y: Tensor) -> None:
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"y must be 1-D integer labels, got shape {list(y.shape)} dtype {y.dtype}")
    if x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same length, got x {list(x.shape)} and y {list(y.shape)}"
        )


class EpisodeSampler:
    """Samples batches of `tasks` (T) tasks, each `ways`-way (N) `shots`-shot (K) with
    `queries` (Q) query examples per class; all four >= 1 (a task without queries has
    nothing to score).

    x [S, ...] and y [S] (integer labels, any values), or a Dataset of (x, y) pairs
    (read once into tensors; a TensorDataset is used as is). classes restricts
    sampling to those label values (a class split). Each task draws N distinct
    classes uniformly, then K + Q distinct examples per class uniformly; batches are
    reproducible from `seed` (None: drawn from torch's global RNG).

    The data stays where it is: indices are drawn and examples gathered on x's
    device, then the batch moves to `device` (default: x's device). Put x on the GPU
    first to gather there. sample() costs a few tensor ops whatever N, K, Q and T
    are: an index table [C, max examples per class] built here, random keys with
    topk for the classes and the examples, and one index_select.

    sample() and iteration (endless: `zip(range(steps), sampler)`) give Episodes.
    Attributes: classes [C] (label values sampled from), counts [C] (examples each).
    """

    def __init__(
        self,
        x: Tensor | Dataset,
        y: Tensor | None = None,
        *,
        ways: int,
        shots: int,
        queries: int,
        tasks: int = 1,
        classes: Tensor | Sequence[int] | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ):
        check_positive(ways=ways, shots=shots, queries=queries, tasks=tasks)
        x, y = _as_tensors(x, y)
        _check_labels(x, y)
        y = y.to(device=x.device, dtype=torch.int64)
        self.x, self.ways, self.shots, self.queries, self.tasks = x, ways, shots, queries, tasks
        self.device = torch.device(device) if device is not None else x.device

        rows = torch.arange(len(y), device=x.device)
        if classes is not None:
            wanted = torch.as_tensor(classes, dtype=torch.int64, device=x.device).reshape(-1)
            missing = wanted[~torch.isin(wanted, y)]
            if len(missing):
                raise ValueError(f"classes not present in y: {missing[:10].tolist()}")
            rows = rows[torch.isin(y, wanted)]
        self.classes, inverse, self.counts = torch.unique(
            y[rows], return_inverse=True, return_counts=True
        )
        if ways > len(self.classes):
            raise ValueError(f"ways={ways} exceeds the {len(self.classes)} classes available")
        short = self.counts < shots + queries
        if short.any():
            raise ValueError(
                f"each class needs shots + queries = {shots + queries} examples, "
                f"but classes {self.classes[short][:10].tolist()} have only "
                f"{self.counts[short][:10].tolist()}"
            )

        # table[c, j]: row of the j-th example of class c; padding marked in _padding.
        order = torch.argsort(inverse, stable=True)
        by_class = inverse[order]
        starts = self.counts.cumsum(0) - self.counts
        position = torch.arange(len(order), device=x.device) - starts[by_class]
        self._table = torch.zeros(
            len(self.classes), int(self.counts.max()), dtype=torch.int64, device=x.device
        )
        self._table[by_class, position] = rows[order]
        self._padding = torch.arange(self._table.shape[1], device=x.device) >= self.counts[:, None]
        self.generator = make_generator(seed, x.device)
        label = torch.arange(ways, device=self.device)
        self._support_y = label.repeat_interleave(shots).repeat(tasks, 1)
        self._query_y = label.repeat_interleave(queries).repeat(tasks, 1)

    def sample(self, part: slice | None = None) -> Episodes:
        """One batch: support_x [T, N*K, ...], support_y [T, N*K], query_x [T, N*Q, ...],
        query_y [T, N*Q], on `device`.

        part: only these tasks of the batch, e.g. slice(8, 16) -> T' = 8 tasks (a rank's
        share in data-parallel training). The random numbers of the whole batch are
        drawn all the same and only the part's examples gathered, so samplers seeded
        alike, each sampling one part of a partition of the T tasks, together give
        exactly sample()'s batches, step after step."""
        n, k, q = self.ways, self.shots, self.queries
        rand = dict(generator=self.generator, device=self._table.device)
        class_keys = torch.rand(self.tasks, len(self.classes), **rand)
        keys = torch.rand(self.tasks, n, self._table.shape[1], **rand)
        if part is not None:
            class_keys, keys = class_keys[part], keys[part]
        t = len(keys)
        ways = class_keys.topk(n, dim=1).indices  # [T, N]
        keys.masked_fill_(self._padding[ways], -1.0)  # never picked
        rows = self._table[ways.unsqueeze(2), keys.topk(k + q, dim=2).indices]  # [T, N, K+Q]
        rows = torch.cat((rows[..., :k].reshape(-1), rows[..., k:].reshape(-1)))
        batch = self.x.index_select(0, rows).to(self.device)
        support_x, query_x = batch.split((t * n * k, t * n * q))
        shape = self.x.shape[1:]
        return Episodes(
            support_x.view(t, n * k, *shape),
            self._support_y[:t].clone(),
            query_x.view(t, n * q, *shape),
            self._query_y[:t].clone(),
        )

    def __iter__(self) -> Iterator[Episodes]:
        while True:
            yield self.sample()


def split_classes(
    classes: Tensor | Sequence[int] | int,
    sizes: Sequence[int | float],
    *,
    groups: Tensor | Sequence[Hashable] | None = None,
    seed: int = 0,
) -> tuple[Tensor, ...]:
    """Splits classes into disjoint random sets (train / val / test), reproducibly.

    classes: distinct label values [C] (e.g. y.unique()) or a count C for 0..C-1.
    sizes: one entry per split, all ints (numbers of classes) or fractions of them.
    groups [C]: a group key per class (Omniglot: its alphabet); whole groups then go
    to one split and sizes count groups. Returns one sorted int64 tensor per split.
    """
    if isinstance(classes, int):
        values = torch.arange(classes)
    else:
        values = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
    if len(values.unique()) != len(values):
        raise ValueError("classes must be distinct label values (use y.unique())")
    if groups is None:
        group_of = torch.arange(len(values))
    else:
        keys = groups.tolist() if isinstance(groups, Tensor) else list(groups)
        if len(keys) != len(values):
            raise ValueError(
                f"groups must have one key per class: {len(keys)} keys for {len(values)} classes"
            )
        index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        group_of = torch.tensor([index[key] for key in keys], dtype=torch.int64)
    units = int(group_of.max()) + 1 if len(group_of) else 0

    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be >= 0, got {list(sizes)}")
    if all(isinstance(s, int) for s in sizes):
        counts = list(sizes)
    else:
        bounds = [round(sum(sizes[: i + 1]) * units) for i in range(len(sizes))]
        counts = [b - a for a, b in zip([0] + bounds, bounds)]
    if sum(counts) > units:
        raise ValueError(
            f"sizes {list(sizes)} ask for {sum(counts)} "
            f"{'groups' if groups is not None else 'classes'}, only {units} exist"
        )

    chosen = torch.randperm(units, generator=torch.Generator().manual_seed(seed))[: sum(counts)]
    split_of_unit = torch.full((units,), -1, dtype=torch.int64)
    split_of_unit[chosen] = torch.arange(len(counts)).repeat_interleave(
        torch.tensor(counts, dtype=torch.int64)
    )
    split = split_of_unit[group_of]
    return tuple(values[split == i].sort().values for i in range(len(counts)))
