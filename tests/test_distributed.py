"""fastmeta.distributed and `fastmeta train` under torchrun: 2 CPU ranks (gloo) take the
same steps as 1 process on the whole meta-batch; a lost rank fails the other promptly.
Every run passes --device cpu: with one GPU visible, rank 1 would ask for cuda:1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastmeta import distributed
from fastmeta.cli import algorithms
from fastmeta.cli.main import main
from fastmeta.cli.train import train
from fastmeta.data import EpisodeSampler, gaussian_clusters

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

# 3 tasks on 2 ranks: shares of 1 and 2 tasks, so the T_r / T weighting is exercised.
TINY = [
    "--device",
    "cpu",
    "--steps",
    "4",
    "--val-every",
    "2",
    "--val-episodes",
    "10",
    "--test-episodes",
    "20",
    "--tasks",
    "3",
    "--queries",
    "3",
    "--seed",
    "1",
]
# ProtoNet's last encoder bias shifts every embedding alike, which the distances cancel:
# its true gradient is 0, its computed one rounding noise that Adam scales up to steps of
# ~lr, different in every summation order. It does not change the model's outputs.
NOISE_ONLY = {"protonet": {"encoder.2.bias"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int) -> dict:
    """What torchrun gives each of 2 workers."""
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )


def torchrun_train(algorithm: str, *options: str, timeout: float = 120):
    """`fastmeta train ALGORITHM OPTIONS` on 2 CPU ranks under torchrun; asserts exit 0."""
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "fastmeta",
            "train",
            algorithm,
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    return launched


# --- shares of the batch ----------------------------------------------------------------


@pytest.mark.parametrize("tasks,world_size", [(3, 2), (8, 3), (2, 4), (32, 1)])
def test_shares_partition_the_batch(tasks, world_size):
    ranks = [distributed.Ranks(r, world_size) for r in range(world_size)]
    covered = [t for r in ranks for t in range(tasks)[r.share(tasks)]]
    assert covered == list(range(tasks))
    assert sum(r.weight(tasks) for r in ranks) == pytest.approx(1.0)


def test_sampled_parts_make_up_the_whole_batch():
    """One sampler per rank, seeded alike, each sampling its part: the parts of every
    step make up the one-process batch."""
    x, y = gaussian_clusters(20, 10, 4)
    whole, *ranks = (
        EpisodeSampler(x, y, ways=3, shots=2, queries=2, tasks=5, seed=7) for _ in range(4)
    )
    for _ in range(3):
        expected = whole.sample()
        parts = [
            sampler.sample(part)
            for sampler, part in zip(ranks, (slice(0, 2), slice(2, 2), slice(2, 5)))
        ]
        assert [len(p.support_x) for p in parts] == [2, 0, 3]
        for got, want in zip(zip(*parts), expected):
            assert torch.equal(torch.cat(got), want)


def test_fewer_tasks_than_ranks_is_refused():
    with pytest.raises(ValueError, match="--tasks 1 is less than the 2 ranks"):
        train(Namespace(tasks=1), Path("unused"), distributed.Ranks(0, 2))


# --- the gradient reducer ---------------------------------------------------------------


def _reduce_on_rank(rank: int, port: int, out: Path) -> None:
    """Two steps on 3 parameters, a bucket each: `used` gets rank-dependent gradients,
    `rank0_only` a gradient on rank 0 only, `never` none. Saves, per step, the .grads
    and how many buckets had started before wait()."""
    os.environ.update(rank_env(rank, port))
    with distributed.launch("cpu", timeout=30) as ranks:
        never, rank0_only, used = (nn.Parameter(torch.ones(n)) for n in (5, 7, 300))
        # buckets in reverse order: used, rank0_only, never
        reducer = distributed.GradientReducer([never, rank0_only, used], ranks, bucket_mb=1e-6)
        steps = []
        for step in range(2):
            for p in (used, rank0_only, never):
                p.grad = None
            loss = (used * torch.arange(300.0) * (rank + 1 + step)).sum()
            if rank == 0:
                loss = loss + 2 * rank0_only.sum()
            loss.backward()
            started = reducer._started  # buckets whose all-reduce the backward started
            reducer.wait()
            steps.append((started, [p.grad for p in (used, rank0_only, never)]))
        torch.save(steps, out / f"rank{rank}.pt")


def test_reducer_sums_gradients_and_keeps_missing_ones_consistent(tmp_path):
    mp.spawn(_reduce_on_rank, args=(free_port(), tmp_path), nprocs=2)
    for rank in range(2):
        steps = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for step, (started, (used, rank0_only, never)) in enumerate(steps):
            assert started == (2 if rank == 0 else 1)  # in order, up to the first missing one
            assert torch.equal(used, torch.arange(300.0) * (3 + 2 * step))  # (1 + 2) + 2 step
            assert torch.equal(rank0_only, torch.full((7,), 2.0))  # zeros on rank 1
            assert never is None  # as in one process


# --- fastmeta train under torchrun ------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "metanet"])
def test_two_ranks_take_the_steps_of_one_process(tmp_path, algorithm):
    if not algorithms.available(algorithm):
        pytest.skip(f"{algorithm} is not in this build of fastmeta")
    launched = torchrun_train(algorithm, *TINY, "--out", str(tmp_path / "two"))
    assert main(["train", algorithm, *TINY, "--out", str(tmp_path / "one")]) == 0

    two, one = (
        torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("two", "one")
    )
    assert two["model"].keys() == one["model"].keys()
    for name in one["model"].keys() - NOISE_ONLY.get(algorithm, set()):
        torch.testing.assert_close(
            two["model"][name],
            one["model"][name],
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    torch.testing.assert_close(
        two["run"]["history"]["loss"], one["run"]["history"]["loss"], rtol=1e-5, atol=0
    )
    summaries = [
        json.loads((tmp_path / run / "summary.json").read_text()) for run in ("two", "one")
    ]
    assert summaries[0]["world_size"] == 2 and summaries[0]["episodes"] == 12
    for split in ("val", "test"):
        assert summaries[0][split] == summaries[1][split]
    assert launched.stderr.count("step 4/4") == 1  # the progress line of rank 0 only
    assert launched.stdout.count("test accuracy") == 1


@pytest.mark.parametrize(
    "sig,victim", [(signal.SIGKILL, 1), (signal.SIGSTOP, 0)], ids=["killed", "hung"]
)
def test_a_lost_rank_fails_the_other_with_a_clear_error(tmp_path, sig, victim):
    """A killed peer closes its connections: the survivor fails at its next collective,
    long before --dist-timeout. A hung one (stopped) fails it after --dist-timeout."""
    timeout = 60 if sig == signal.SIGKILL else 4
    argv = [
        "-m",
        "fastmeta",
        "train",
        "maml",
        "--device",
        "cpu",
        "--steps",
        "100000",
        "--val-every",
        "3",
        "--val-episodes",
        "2",
        "--tasks",
        "2",
        "--queries",
        "3",
        "--out",
        str(tmp_path),
        "--dist-timeout",
        str(timeout),
    ]
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=rank_env(rank, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "checkpoint.pt").exists():  # step 3 done: both are stepping
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
                procs[0].stderr.read() if procs[0].poll() is not None else "no start"
            )
            time.sleep(0.1)
        procs[victim].send_signal(sig)
        lost = time.monotonic()
        _, err = procs[1 - victim].communicate(timeout=timeout + 30)
        elapsed = time.monotonic() - lost
    finally:
        for p in procs:
            p.kill()
            p.wait()
    survivor = 1 - victim
    assert procs[survivor].returncode == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"fastmeta train: error: rank {survivor} of 2 lost contact with its peers during "
    ), last
    if sig == signal.SIGKILL:
        assert elapsed < 20, f"{elapsed:.1f} s to notice a killed peer"
    else:
        assert elapsed < timeout + 20, f"{elapsed:.1f} s to give up on a hung peer"
        assert "Timed out" in last  # the survivor may have waited since before the stop
