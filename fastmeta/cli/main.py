"""fastmeta train ALGORITHM [options]    train, validate, checkpoint, test
fastmeta eval --out DIR [options]       evaluate a trained run on other episodes
fastmeta profile train ALGORITHM [options]
                                        a few training steps under torch.profiler: where
                                        a step's time goes, and a Chrome/Perfetto trace
fastmeta build [--force]                compile fastmeta._C for this torch now, if the
                                        install has none for it (waits for one running)
fastmeta reproduce omniglot --data-dir DIR
                                        train and test every README Omniglot recipe,
                                        one combined table (hours on a CPU)

(also `python -m fastmeta ...`). Bad input is one line on stderr and exit status 2.
Under torchrun (WORLD_SIZE > 1) the ranks share the work (fastmeta.distributed)."""

import argparse
import contextlib
import math
import os
import re
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fastmeta
from fastmeta import _extension, distributed
from fastmeta.cli import algorithms, breakdown, checkpoint, profile, report
from fastmeta.cli import data as task_data
from fastmeta.cli.evaluate import evaluate, format_accuracy
from fastmeta.cli.train import EPISODE_SHAPE, TEST_SEED, complete_args, train
from fastmeta.metanet.model import ATTENTION_SCALE, TASK_GENERATORS

HELD_OUT = "Japanese_(katakana),Sanskrit,Tagalog"


def _parsed(text: str, kind: type, requirement: str, ok: Callable[[Any], bool]):
    """text as kind (int or float) if ok(value); else an ArgumentTypeError, argparse's
    one line "argument --x: must be REQUIREMENT, got TEXT"."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _parsed(text, int, "an integer >= 1", lambda value: value >= 1)


def _count(text: str) -> int:
    return _parsed(text, int, "an integer >= 0", lambda value: value >= 0)


def _rate(text: str) -> float:
    """A learning rate: a finite number > 0 (NaN trained NaN to the end, exit 0)."""
    return _parsed(text, float, "a finite number > 0", lambda value: 0 < value < math.inf)


def _attention_scale(text: str) -> float | None:
    """--attention-scale: a finite number > 0, or "none" (the paper's unscaled cosines)."""
    if text.lower() == "none":
        return None
    return _parsed(text, float, 'a finite number > 0 or "none"', lambda v: 0 < v < math.inf)


def _fraction(text: str) -> float:
    return _parsed(text, float, "a number in (0, 1)", lambda value: 0 < value < 1)


def _seconds(text: str) -> float:
    return _parsed(text, float, "a number of seconds > 0", lambda value: value > 0)


MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _memory(text: str) -> int | float:
    """--max-memory: bytes (4294967296, 4GiB, 4G, 4GB, 512MiB: binary units) or a fraction of
    the free memory in (0, 1] (0.5)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|(b))?\s*", text, re.I)
    if match:
        number, unit = match.group(1), (match.group(2) or match.group(3) or "").lower()
        if unit or "." not in number:
            value = int(float(number) * MEMORY_UNITS[unit])
            if value >= 1:
                return value
        elif 0 < float(number) <= 1:
            return float(number)
    raise argparse.ArgumentTypeError(
        f"must be bytes (e.g. 4GiB, 512MiB, 1000000) or a fraction of the free memory "
        f"in (0, 1] (e.g. 0.5), got {text!r}"
    )


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("no CUDA GPU is visible")
    return text


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `fastmeta train` (and of `fastmeta profile train`)."""
    parser.add_argument("algorithm", choices=list(algorithms.REGISTRY))
    parser.add_argument("--data", choices=("synthetic", "omniglot"), default="synthetic")
    parser.add_argument(
        "--held-out",
        type=_names,
        default=_names(HELD_OUT),
        metavar="A,B,...",
        help="omniglot: the test alphabets",
    )
    parser.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        help="share of the non-test classes held out for validation",
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="omniglot: training characters rotated by 90/180/270 degrees as new classes",
    )
    parser.add_argument("--ways", type=_positive_int, default=5)
    parser.add_argument("--shots", type=_positive_int, default=1)
    parser.add_argument("--queries", type=_positive_int, default=15, help="per class")
    for name in EPISODE_SHAPE:  # protonet may train with more ways or shots than it tests
        parser.add_argument(
            f"--eval-{name}",
            type=_positive_int,
            metavar=name.upper(),
            help=f"{name} of the validation and test episodes (default: --{name})",
        )
    parser.add_argument(
        "--tasks",
        type=_positive_int,
        default=4,
        help="episodes per batch (under torchrun: of all ranks together)",
    )
    parser.add_argument("--steps", type=_positive_int, default=1000, help="training iterations")
    parser.add_argument("--lr", type=_rate, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--lr-halve-every",
        type=_positive_int,
        metavar="STEPS",
        help="halve --lr every STEPS steps (default: constant)",
    )
    parser.add_argument(
        "--clip-grad",
        type=_rate,
        metavar="NORM",
        help="scale the gradient down to global L2 norm NORM before each Adam step when it "
        "is larger (default: no clipping)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="run directory (default: runs/ALGORITHM-DATA-NwKs)")
    parser.add_argument("--val-every", type=_positive_int, default=250, metavar="STEPS")
    parser.add_argument("--val-episodes", type=_positive_int, default=200)
    parser.add_argument("--test-episodes", type=_positive_int, default=600)
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --out"
    )
    maml = parser.add_argument_group("maml, metasgd")
    maml.add_argument(
        "--inner-lr",
        type=_rate,
        default=0.4,
        help="inner-loop learning rate (metasgd: its initial value)",
    )
    maml.add_argument("--inner-steps", type=_positive_int, default=1)
    maml.add_argument(
        "--eval-inner-steps",
        type=_positive_int,
        help="inner steps at evaluation (default: --inner-steps)",
    )
    maml.add_argument("--first-order", action="store_true")
    bounded = maml.add_mutually_exclusive_group()
    bounded.add_argument(
        "--max-memory",
        type=_memory,
        metavar="BYTES|FRACTION",
        help="bound the memory of each training step's graphs: adapt and differentiate "
        "the tasks a chunk at a time, sized from this budget (4GiB, 512MiB, or 0.5 of "
        "the free memory); the gradient is the same (default: all tasks at once)",
    )
    bounded.add_argument(
        "--chunk-size",
        type=_positive_int,
        metavar="TASKS",
        help="adapt and differentiate this many tasks at a time (default: all)",
    )
    maml.add_argument(
        "--checkpoint-inner",
        action="store_true",
        help="second order: keep only each inner step's fast weights and recompute the "
        "step's graph in the backward (memory flat in --inner-steps; one more "
        "first-order support pass per step)",
    )
    metanet = parser.add_argument_group("metanet")
    metanet.add_argument(
        "--task-generator",
        choices=TASK_GENERATORS,
        default="mlp",
        help="the generator d of the task-level fast weights: mlp, the mean over the "
        "support examples of a coordinate-wise MLP; lstm, the paper's coordinate-wise "
        "LSTM over them in order",
    )
    metanet.add_argument(
        "--attention-scale",
        type=_attention_scale,
        default=ATTENTION_SCALE,
        metavar="S|none",
        help="the queries' attention over the support set is softmax(s * cosine) with s "
        "learned from S; none: softmax(cosine), the paper's",
    )


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastmeta profile train` beside the training arguments."""
    group = parser.add_argument_group("profile")
    group.add_argument(
        "--profile-steps",
        type=_positive_int,
        default=5,
        metavar="STEPS",
        help="steps recorded and reported",
    )
    group.add_argument(
        "--profile-warmup",
        type=_count,
        default=3,
        metavar="STEPS",
        help="steps run before, without the profiler (their median: the unprofiled step time)",
    )
    group.add_argument(
        "--trace",
        metavar="FILE",
        help="the Chrome/Perfetto trace (default: trace.json in the run directory, --out)",
    )
    group.add_argument(
        "--sort",
        choices=breakdown.SORT_KEYS,
        default="self",
        help="order of the op tables: an op's own time, or with the ops it calls",
    )
    group.add_argument(
        "--top", type=_positive_int, default=10, metavar="ROWS", help="rows of each op table"
    )
    group.add_argument(
        "--nvtx",
        action="store_true",
        help="CUDA: the phases also as NVTX ranges (torch.cuda.nvtx), for nsys",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmeta", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    common.add_argument(
        "--backend",
        choices=("auto", *fastmeta.BACKENDS),
        default="auto",
        help="force a fastmeta backend (default: the fastest usable one)",
    )
    common.add_argument(
        "--data-dir", help="Omniglot directory (default: $FASTMETA_OMNIGLOT; eval: the run's)"
    )
    common.add_argument(
        "--dist-timeout",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: a rank waiting longer than this for its peers "
        "fails (one that exits fails them at once)",
    )
    formatter = argparse.ArgumentDefaultsHelpFormatter

    run = commands.add_parser(
        "train",
        parents=[common],
        formatter_class=formatter,
        help="train an algorithm, then test it",
        description="Train on episodes of the training classes, "
        "validate periodically, checkpoint, test on held-out classes.",
    )
    add_train_arguments(run)

    traced = commands.add_parser(
        "profile",
        help="profile a few training steps",
        description="Profile training steps: fastmeta profile train ALGORITHM [options].",
    )
    targets = traced.add_subparsers(dest="target", required=True)
    steps = targets.add_parser(
        "train",
        parents=[common],
        formatter_class=formatter,
        help="profile `fastmeta train`'s step",
        description=profile.__doc__,
    )
    add_train_arguments(steps)
    add_profile_arguments(steps)

    test = commands.add_parser(
        "eval",
        parents=[common],
        formatter_class=formatter,
        help="evaluate a trained run",
        description="Evaluate the checkpoint of a training run on "
        "episodes of its test (or validation) classes.",
    )
    test.add_argument("--out", required=True, help="the training run's directory")
    test.add_argument("--split", choices=("test", "val"), default="test")
    for name in EPISODE_SHAPE:
        test.add_argument(f"--{name}", type=_positive_int, help="default: the run's test's")
    test.add_argument("--episodes", type=_positive_int, default=600)
    return parser


def train_command(args: Namespace, ranks: distributed.Ranks) -> int:
    complete_args(args)
    out = Path(args.out)
    if ranks.is_main and not args.resume:
        out.mkdir(parents=True, exist_ok=True)
    summary, history = train(args, out, ranks)
    if not ranks.is_main:
        return 0
    paths = {
        "summary": out / "summary.json",
        "checkpoint": out / checkpoint.FILE,
        "curve": report.plot_curve(out / "curve.png", history),
    }
    summary["paths"] = {name: str(path) for name, path in paths.items() if path}
    report.write_json(paths["summary"], summary)
    ran = ", ".join(sorted(set(summary["backend"]["ran"].values()))) or "-"
    on = f" on {ranks.world_size} ranks" if ranks.world_size > 1 else ""
    print(
        f"{args.algorithm} on {args.data}, {args.ways}-way {args.shots}-shot: "
        f"{summary['steps']} steps ({summary['episodes']} episodes){on} in "
        f"{summary['train_seconds']:.1f} s, {summary['episodes_per_second']:.1f} episodes/s, "
        f"fastmeta backend {ran}"
    )
    for split in ("val", "test"):
        print(
            f"{split} accuracy {format_accuracy(**summary[split])} ({args.eval_ways}-way "
            f"{args.eval_shots}-shot, {summary[split]['episodes']} episodes)"
        )
    print(f"written: {', '.join(summary['paths'].values())}")
    return 0


def eval_command(args: Namespace, ranks: distributed.Ranks) -> int:
    device = ranks.device
    out = Path(args.out)
    state = checkpoint.load_on_all_ranks(out, ranks)
    run = Namespace(**state["args"])
    trained_ways = run.ways
    for name in EPISODE_SHAPE:  # the run's test episodes (a run before --eval-*: its own)
        tested = getattr(run, f"eval_{name}", None) or getattr(run, name)
        setattr(run, name, getattr(args, name) or tested)
    run.data_dir = args.data_dir or run.data_dir
    data = task_data.load(run, device)
    algorithm = algorithms.get(run.algorithm, run)
    model = algorithm.build(data.input_shape, trained_ways).to(device)
    model.load_state_dict(state["model"])
    accuracy = evaluate(
        algorithm,
        model,
        data,
        args.split,
        ways=run.ways,
        shots=run.shots,
        queries=run.queries,
        episodes=args.episodes,
        seed=run.seed + TEST_SEED,
        ranks=ranks,
    )
    if not ranks.is_main:
        return 0
    path = report.write_json(
        out / f"eval-{args.split}-{run.ways}w{run.shots}s.json",
        {
            "algorithm": run.algorithm,
            "data": run.data,
            "split": args.split,
            "ways": run.ways,
            "shots": run.shots,
            "queries": run.queries,
            "step": state["run"]["step"],
            **accuracy.to_dict(),
        },
    )
    print(
        f"{run.algorithm} on {run.data} {args.split} classes, {run.ways}-way {run.shots}-shot: "
        f"accuracy {accuracy} ({accuracy.episodes} episodes); written: {path}"
    )
    return 0


COMMANDS = {"train": train_command, "eval": eval_command, "profile": profile.profile_command}


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 2 bad input, 130 interrupted). A rank
    that loses its peers exits the process at once with status 1."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        return _extension.build_command(argv[1:])
    if argv[:1] == ["reproduce"]:  # its own parser; it runs `train` and `eval` through main
        from fastmeta.cli import reproduce

        return reproduce.main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help (0) or a usage error argparse has printed (2)
        return int(exit.code or 0)
    forced = (
        contextlib.nullcontext() if args.backend == "auto" else fastmeta.use_backend(args.backend)
    )
    try:
        with forced, distributed.launch(args.device, args.dist_timeout) as ranks:
            return COMMANDS[args.command](args, ranks)
    except distributed.PeerLostError as error:
        print(f"fastmeta {args.command}: error: {error}", file=sys.stderr)
        # The broken group's threads may still be waiting on the lost peer: at interpreter
        # shutdown they would abort the process ("terminate called without an active
        # exception") or keep it waiting, so skip the shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except (ValueError, OSError, ImportError, fastmeta.BackendUnavailableError) as error:
        print(f"fastmeta {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train":
            saved = args.out and (Path(args.out) / checkpoint.FILE).is_file()
            hint = " (continue with --resume)" if saved else " (no checkpoint yet: none to resume)"
        print(f"fastmeta {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
