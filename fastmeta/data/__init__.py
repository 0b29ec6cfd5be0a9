"""Episodic data: batches of few-shot tasks, Omniglot, synthetic task families.

sampler = EpisodeSampler(x, y, ways=N, shots=K, queries=Q, tasks=T, seed=0)
sampler.sample() -> Episodes(support_x [T, N*K, ...], support_y [T, N*K] in 0..N-1,
                             query_x [T, N*Q, ...],   query_y [T, N*Q])
train, val, test = split_classes(y.unique(), (0.7, 0.15, 0.15), seed=0)  # disjoint

omniglot = load_omniglot(root)      # images [S, 1, 28, 28] in [0, 1], ink = 1; labels [S]
kept, held_out = omniglot.alphabet_split(["Sanskrit"])   # character labels
omniglot.rotated()                  # 4x characters: 0/90/180/270 degrees as new classes

SinusoidTasks(shots=K, queries=Q, tasks=T).sample()   # x, y [T, K, 1] / [T, Q, 1]
x, y = gaussian_clusters(num_classes, per_class, dim)  # [C*P, dim], [C*P]
"""

from fastmeta.data.omniglot import Omniglot, load_omniglot, rotate_classes
from fastmeta.data.sampler import Episodes, EpisodeSampler, split_classes
from fastmeta.data.synthetic import SinusoidTasks, gaussian_clusters

__all__ = [
    "EpisodeSampler",
    "Episodes",
    "Omniglot",
    "SinusoidTasks",
    "gaussian_clusters",
    "load_omniglot",
    "rotate_classes",
    "split_classes",
]
