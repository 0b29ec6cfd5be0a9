"""The training loop: outer-loop steps on batches of training episodes, periodic
validation and checkpoints, resume, and the final evaluation on the test classes.
On several ranks (fastmeta.distributed) each adapts its share of every batch, the
gradients are summed during the backward, and rank 0 logs and writes the checkpoints."""

import os
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
from fastmeta.profiling import STEP, phase

# Seeds of the evaluation episodes, offset from --seed: the same episodes every time.
VAL_SEED, TEST_SEED = 1, 2
# An episode's shape: --ways, --shots, --queries; --eval-NAME for validation and test.
EPISODE_SHAPE = ("ways", "shots", "queries")


def complete_args(args: Namespace) -> None:
    """Fills in the defaults that depend on other arguments or the environment:
    --data-dir ($FASTMETA_OMNIGLOT), --eval-ways/shots/queries, --eval-inner-steps, --out;
    a ValueError for --data omniglot without a directory, or for --eval-ways other than
    --ways where the model has a --ways-way output layer."""
    args.data_dir = args.data_dir or os.environ.get("FASTMETA_OMNIGLOT")
    if args.data == "omniglot" and not args.data_dir:
        raise ValueError("--data omniglot needs --data-dir DIR (or FASTMETA_OMNIGLOT)")
    for name in EPISODE_SHAPE:
        setattr(args, f"eval_{name}", getattr(args, f"eval_{name}") or getattr(args, name))
    if args.eval_ways != args.ways and algorithms.REGISTRY[args.algorithm].fixed_ways:
        raise ValueError(
            f"--eval-ways {args.eval_ways}: a {args.algorithm} model has a --ways "
            f"{args.ways}-way output layer, so it is validated and tested at {args.ways} ways"
        )
    args.eval_inner_steps = args.eval_inner_steps or args.inner_steps
    args.out = args.out or f"runs/{args.algorithm}-{args.data}-{args.ways}w{args.shots}s"


class Session:
    """What a training step touches, built fresh from args: the data, the algorithm, its
    model, the Adam optimizer, the training-episode sampler and the gradient reducer.
    step() is the training step of `fastmeta train` and `fastmeta profile train`."""

    def __init__(self, args: Namespace, ranks: Ranks):
        if args.tasks < ranks.world_size:
            raise ValueError(
                f"--tasks {args.tasks} is less than the {ranks.world_size} ranks: "
                f"each rank needs at least one task of the batch"
            )
        self.args, self.ranks = args, ranks
        self.data = task_data.load(args, ranks.device)
        self.algorithm = algorithms.get(args.algorithm, args)
        # the summary reports this run's backends
        fastmeta.backend.forget_last_backends(self.algorithm.ops)
        self.episode = {name: getattr(args, name) for name in EPISODE_SHAPE}
        self.eval_episode = {name: getattr(args, f"eval_{name}") for name in EPISODE_SHAPE}
        for split in ("val", "test"):  # bad ways/shots for these splits fail now, not later
            self.data.sampler(split, **self.eval_episode, tasks=1, seed=0)
        torch.manual_seed(args.seed)
        self.model = self.algorithm.build(self.data.input_shape, args.ways).to(ranks.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.sampler = self.data.sampler("train", **self.episode, tasks=args.tasks, seed=args.seed)
        self.share, self.weight = ranks.share(args.tasks), ranks.weight(args.tasks)
        self.reducer = GradientReducer(self.model.parameters(), ranks)

    def step(self, done: int) -> tuple[float, float]:
        """One outer-loop step after `done` steps (the learning-rate schedule's
        position): the batch's mean loss and accuracy, over all ranks. Inside a
        fastmeta.profiling "step" range, with its phases."""
        args, optimizer = self.args, self.optimizer
        with phase(STEP):
            if args.lr_halve_every:  # from the step alone: a resumed run gets the same rate
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * 0.5 ** (done // args.lr_halve_every)
            with phase("optimizer"):
                optimizer.zero_grad(set_to_none=True)
            with phase("data"):
                episodes = self.sampler.sample(self.share)
            # weight T_r / T: the ranks' sum is the batch mean
            loss, accuracy = algorithms.train_step(
                self.algorithm, self.model, episodes, args.ways, self.weight
            )
            self.reducer.wait()
            with phase("optimizer"):
                if args.clip_grad:  # after the all-reduce: every rank clips the same gradient
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
                optimizer.step()
            metrics = torch.stack((loss, accuracy.to(loss.dtype))).detach() * self.weight
            loss, accuracy = self.ranks.all_reduce_(metrics, "the loss all-reduce").tolist()
        return loss, accuracy


def train(args: Namespace, out: Path, ranks: Ranks) -> tuple[dict, dict]:
    """Trains args.algorithm for args.steps steps (continuing from out/checkpoint.pt
    with args.resume), then evaluates on the test classes. Returns the summary and
    the history (per step: step, loss, accuracy; val: one dict per validation), the
    same on every rank. args.tasks is the batch of all ranks together."""
    session = Session(args, ranks)
    algorithm, model = session.algorithm, session.model
    data, episode = session.data, session.eval_episode
    run = {
        "step": 0,
        "train_seconds": 0.0,
        "history": {"step": [], "loss": [], "accuracy": [], "val": []},
    }
    if args.resume:
        saved = checkpoint.load_on_all_ranks(out, ranks)
        run = checkpoint.restore(saved, args, model, session.optimizer, session.sampler)
    history = run["history"]

    progress = Progress(args.steps, enabled=ranks.is_main)
    if run["step"]:
        progress.message(f"resuming from step {run['step']} ({out / checkpoint.FILE})")
    while run["step"] < args.steps:
        start = time.perf_counter()
        loss, accuracy = session.step(run["step"])
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
                checkpoint.save(out, args, model, session.optimizer, session.sampler, run)
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


def ran_backends(algorithm: algorithms.Algorithm) -> dict[str, str]:
    """The backend each of the algorithm's fastmeta ops last ran on (ops that ran)."""
    return {op: fastmeta.last_backend(op) for op in algorithm.ops if fastmeta.last_backend(op)}


def _summary(
    args: Namespace, algorithm: algorithms.Algorithm, ranks: Ranks, run: dict, test: dict
) -> dict:
    episodes = run["step"] * args.tasks  # all ranks' episodes
    return {
        "algorithm": args.algorithm,
        "data": args.data,
        "args": vars(args),
        "backend": {"requested": args.backend, "ran": ran_backends(algorithm)},
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
