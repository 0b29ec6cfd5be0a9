"""Benchmark: the host overhead of one ProtoNet loss forward + backward.

At the episodes users train on every day the kernels take microseconds on a GPU, so
what a step costs is host work: Python, dispatch, argument checks, syncs. Each row
runs the loss and its gradients w.r.t. support and query embeddings, CALLS times in
a row (then synchronizes on a GPU), and reports milliseconds per call:
  fastmeta                  fastmeta.functional.prototypical_loss, value checks on
                            (the default; fastmeta.validation)
  fastmeta, validation off  the same inside fastmeta.validate_args(False)
  matmul                    the eager formulation users write: view(...).mean
                            prototypes, ||q||^2 + ||c||^2 - 2 q c^T, F.cross_entropy
  cdist ** 2                the same with torch.cdist
  torch.compile(matmul)     compiled (compile time not counted)
Configs: a tiny episode (2-way 1-shot, 2 queries, D=4: nothing to compute) and a
typical one (5-way 1-shot, 15 queries per class, D=64). Ratios are against the
fastmeta row (value checks on); the targets are fastmeta <= 1.3x matmul with checks
on and validation off <= 1.0x.
"""

import time

import torch

import fastmeta
from fastmeta.bench.harness import Candidate, Result
from fastmeta.bench.protonet import _plain_loss, cdist_sq, episode, matmul_dist

CASE = "overhead"
CONFIGS = {  # name: (episodes B, ways C, shots K, queries per class, D)
    "tiny 2w1s 1q D=4": (1, 2, 1, 1, 4),
    "typical 5w1s 15q D=64": (1, 5, 1, 15, 64),
}
CALLS = 50  # calls per timed sample


def candidates(device: str, B: int, C: int, K: int, Q: int, D: int) -> list[Candidate]:
    support, ys, queries, yq = episode(B, C, K, Q, D, device)
    inputs = (support, queries)

    def fastmeta_loss():
        loss, _ = fastmeta.functional.prototypical_loss(support, ys, queries, yq, C)
        return torch.autograd.grad(loss, inputs)

    def unvalidated():
        with fastmeta.validate_args(False):
            return fastmeta_loss()

    def plain(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(support, queries, yq, B, C, K), inputs)

    compiled = torch.compile(_plain_loss(matmul_dist), dynamic=False)
    return [
        Candidate("fastmeta", fastmeta_loss, is_fastmeta=True),
        Candidate("fastmeta, validation off", unvalidated),
        Candidate("matmul", plain(_plain_loss(matmul_dist))),
        Candidate("cdist ** 2", plain(_plain_loss(cdist_sq))),
        Candidate("torch.compile(matmul)", plain(compiled)),
    ]


def time_per_call(candidates: list[Candidate], device: str, repeats: int) -> dict[str, float]:
    """Median milliseconds per call: samples of CALLS calls, the candidates
    interleaved (a rotating order), after a warm-up that also compiles."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples: dict[str, list[float]] = {c.name: [] for c in candidates}
    for round_ in range(repeats + 2):  # two warm-up rounds
        for i in range(len(candidates)):
            c = candidates[(i + round_) % len(candidates)]
            sync()
            start = time.perf_counter()
            for _ in range(CALLS):
                c.fn()
            sync()
            if round_ >= 2:
                samples[c.name].append((time.perf_counter() - start) * 1e3 / CALLS)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in samples.items()}


def run(device: str, quick: bool = False, repeats: int = 9) -> list[Result]:
    results = []
    for config, sizes in CONFIGS.items():
        rows = candidates(device, *sizes)
        times = time_per_call(rows, device, 3 if quick else max(repeats, 5))
        reference = times["fastmeta"]
        results += [
            Result(CASE, config, c.name, device, times[c.name], times[c.name] / reference)
            for c in rows
        ]
    return results
