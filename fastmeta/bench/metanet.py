"""Benchmark: one Meta Networks training step (support gradients, fast weights, memory
read, query loss, backward) on conv4 28x28 episodes.

Model: fastmeta.MetaNetwork(ways=5): conv4 base and representation learners, their
last conv layer (and the base's output layer) augmented, generators m and d with 20
hidden units. One model, one batch of episodes; every row computes the mean query
cross-entropy and calls .backward():
  fastmeta                 fused=True: per-example gradients from one backward
                           (dz_i^T rows_i), the gradient_mlp and attention_read ops
                           on the default backend
  fastmeta[reference ops]  the same with the ops' plain-PyTorch reference backend
  plain PyTorch            fused=False: per-example weight copies and autograd, the
                           generators' [.., hidden] activations and every query's mixed
                           weights [M, O, K] built (the oracle of tests/test_metanet.py)
Before timing, the rows' loss and gradients (all parameters concatenated) are compared
with plain PyTorch's (relative errors printed). Peak memory: one extra call each (CPU:
the process's high-water mark). Sweeps (SWEEP): over episodes, ways, shots, queries.
"""

import torch

import fastmeta
from fastmeta.bench.harness import Candidate, Sweepable, run_config

CASE = "metanet"
CONFIGS = {"(a) 5w1s 15q B=16 conv4 28x28": (16, 5, 1, 15)}  # episodes, ways, shots, queries
QUICK = {"(a) 5w1s 5q B=2 conv4 28x28": (2, 5, 1, 5)}


def training_step(model, batch, fused: bool = True, backend: str | None = None):
    """One training step of model on batch (loss and .backward()), as a Candidate's fn."""

    def step():
        model.fused = fused
        model.zero_grad(set_to_none=True)
        forced = fastmeta.use_backend(backend) if backend else torch.enable_grad()
        with forced:
            loss, _ = model.loss(*batch)
            loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    return step


def _relative_error(got, expected) -> tuple[float, float]:
    """(loss, all parameter gradients concatenated): relative errors. Per parameter
    they are not meaningful for the conv biases before batch norm, whose gradient is
    zero but for rounding."""
    (loss, grads), (ref_loss, ref_grads) = got, expected
    flat = torch.cat([g.flatten() for g in grads])
    ref_flat = torch.cat([r.flatten() for r in ref_grads])
    return (
        float((loss - ref_loss).abs() / ref_loss.abs()),
        float((flat - ref_flat).norm() / ref_flat.norm()),
    )


def random_episodes(device: str, B: int, ways: int, shots: int, queries: int) -> tuple:
    """(support_x [B, ways shots, 1, 28, 28], support_y, query_x [B, ways queries, 1, 28,
    28], query_y) of random images."""
    support_y = torch.arange(ways, device=device).repeat_interleave(shots).repeat(B, 1)
    return (
        torch.randn(B, ways * shots, 1, 28, 28, device=device),
        support_y,
        torch.randn(B, ways * queries, 1, 28, 28, device=device),
        torch.randint(0, ways, (B, ways * queries), device=device),
    )


def candidates(device: str, B: int, ways: int, shots: int, queries: int) -> list[Candidate]:
    torch.manual_seed(0)
    model = fastmeta.MetaNetwork(ways=ways).to(device)
    batch = random_episodes(device, B, ways, shots, queries)
    rows = [
        Candidate("fastmeta", training_step(model, batch, True), is_fastmeta=True),
        Candidate("fastmeta[reference ops]", training_step(model, batch, True, "reference")),
        Candidate("plain PyTorch", training_step(model, batch, False)),
    ]
    expected = rows[-1].fn()
    for row in rows[:-1]:
        loss_error, grad_error = _relative_error(row.fn(), expected)
        print(
            f"  {row.name} vs plain PyTorch: loss {loss_error:.1e}, gradients "
            f"{grad_error:.1e} (relative errors)"
        )
    return rows


SWEEP = Sweepable(
    axes={"episodes": 16, "ways": 5, "shots": 1, "queries": 15},
    about="episodes B, ways, shots and queries per class (conv4, 28x28)",
    candidates=lambda device, p, memory: candidates(
        device, p["episodes"], p["ways"], p["shots"], p["queries"]
    ),
    # about 3 MiB per 28x28 image (activations, per-example weights of plain PyTorch)
    footprint=lambda p: 3 * 2**20 * p["episodes"] * p["ways"] * (p["shots"] + p["queries"]),
    warmup=1,  # candidates() has called each row once
)


def run(device: str, quick: bool = False, **timing):
    results = []
    for config, sizes in (QUICK if quick else CONFIGS).items():
        print(f"{CASE} {config}:")
        results += run_config(
            CASE, config, device, candidates(device, *sizes), memory=True, **timing
        )
    return results
