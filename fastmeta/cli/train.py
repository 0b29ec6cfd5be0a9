"""The training loop: outer-loop steps on batches of training episodes, periodic
validation and checkpoints, resume, and the final evaluation on the test classes.
On several ranks (fastmeta.distributed) each adapts its share of every batch, the
gradients are summed during the backward, and rank 0 logs and writes the checkpoints."""

import time
from argparse import Namespace
from pathlib import Path

import torch

import fastmeta
from fastmeta.cli import algorithms, checkpoint
from fastmeta.cli import data as task_data
from fastmeta.cli.evaluate import evaluate
from fastmeta.cli.progress import Progress
from fastmeta.distributed import GradientReducer, Ranks

# Seeds of the evaluation episodes, offset from --seed: the same episodes every time.
VAL_SEED, TEST_SEED = 1, 2


def train(args: Namespace, out: Path, ranks: Ranks) -> tuple[dict, dict]:
    """Trains args.algorithm for args.steps steps (continuing from out/checkpoint.pt
    with args.resume), then evaluates on the test classes. Returns the summary and
    the history (per step: step, loss, accuracy; val: one dict per validation), the
    same on every rank. args.tasks is the batch of all ranks together."""
    if args.tasks < ranks.world_size:
        raise ValueError(
            f"--tasks {args.tasks} is less than the {ranks.world_size} ranks: "
            f"each rank needs at least one task of the batch"
        )
    device = ranks.device
    data = task_data.load(args, device)
    algorithm = algorithms.get(args.algorithm, args)
    fastmeta.backend.forget_last_backends(algorithm.ops)  # the summary reports this run's
    episode = dict(ways=args.ways, shots=args.shots, queries=args.queries)
    for split in ("val", "test"):  # bad ways/shots for these splits fail now, not later
        data.sampler(split, **episode, tasks=1, seed=0)
    torch.manual_seed(args.seed)
    model = algorithm.build(data.input_shape, args.ways).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = data.sampler("train", **episode, tasks=args.tasks, seed=args.seed)
    share, weight = ranks.share(args.tasks), ranks.weight(args.tasks)
    reducer = GradientReducer(model.parameters(), ranks)
    run = {
        "step": 0,
        "train_seconds": 0.0,
        "history": {"step": [], "loss": [], "accuracy": [], "val": []},
    }
    if args.resume:
        run = checkpoint.restore(
            checkpoint.load_on_all_ranks(out, ranks), args, model, optimizer, sampler
        )
    history = run["history"]

    progress = Progress(args.steps, enabled=ranks.is_main)
    if run["step"]:
        progress.message(f"resuming from step {run['step']} ({out / checkpoint.FILE})")
    while run["step"] < args.steps:
        if args.lr_halve_every:  # from the step alone: a resumed run gets the same rate
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 ** (run["step"] // args.lr_halve_every)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # weight T_r / T: the ranks' sum is the batch mean
        episodes = sampler.sample(share)
        loss, accuracy = algorithms.train_step(algorithm, model, episodes, args.ways, weight)
        reducer.wait()
        optimizer.step()
        metrics = torch.stack((loss, accuracy.to(loss.dtype))).detach() * weight
        loss, accuracy = ranks.all_reduce_(metrics, "the loss all-reduce").tolist()
        run["train_seconds"] += time.perf_counter() - start
        run["step"] += 1
        step = run["step"]
        for key, value in (("step", step), ("loss", loss), ("accuracy", accuracy)):
            history[key].append(value)
        progress.update(step, loss, accuracy, step * args.tasks / run["train_seconds"])
        if step % args.val_every == 0 or step == args.steps:
            ranks.average_buffers_(model, "the batch-norm statistics all-reduce")
            val = evaluate(
                algorithm,
                model,
                data,
                "val",
                **episode,
                episodes=args.val_episodes,
                seed=args.seed + VAL_SEED,
                ranks=ranks,
            )
            history["val"].append({"step": step, **val.to_dict()})
            progress.message(f"step {step}: validation accuracy {val}")
            if ranks.is_main:
                checkpoint.save(out, args, model, optimizer, sampler, run)
    progress.close()

    test = evaluate(
        algorithm,
        model,
        data,
        "test",
        **episode,
        episodes=args.test_episodes,
        seed=args.seed + TEST_SEED,
        ranks=ranks,
    )
    return _summary(args, algorithm, ranks, run, test.to_dict()), history


def _summary(
    args: Namespace, algorithm: algorithms.Algorithm, ranks: Ranks, run: dict, test: dict
) -> dict:
    episodes = run["step"] * args.tasks  # all ranks' episodes
    return {
        "algorithm": args.algorithm,
        "data": args.data,
        "args": vars(args),
        "backend": {
            "requested": args.backend,
            "ran": {
                op: fastmeta.last_backend(op) for op in algorithm.ops if fastmeta.last_backend(op)
            },
        },
        "device": str(ranks.device),
        "world_size": ranks.world_size,
        "steps": run["step"],
        "episodes": episodes,
        "train_seconds": run["train_seconds"],
        "episodes_per_second": episodes / run["train_seconds"],
        "val": run["history"]["val"][-1],
        "test": test,
        "val_history": run["history"]["val"],
        "fastmeta_version": fastmeta.__version__,
        "torch_version": torch.__version__,
    }
