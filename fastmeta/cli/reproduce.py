"""fastmeta reproduce omniglot: the README's Omniglot table, every recipe trained and tested.

    python -m fastmeta reproduce omniglot --data-dir OMNIGLOT_DIR [--out DIR]
        [--only NAME,...] [--steps N] [--episodes N] [--force] [--list]

Each recipe (RECIPES) is one `fastmeta train` run on the README's split (the union of the
background sets, the --held-out alphabets of `fastmeta train` for test, a share of the
other characters for validation) in OUT/NAME, then a test of 1-shot episodes of the
held-out alphabets at each of its (ways, queries per class): the training run's own test
where that is the episode it trains on, `fastmeta eval` otherwise. A recipe whose
summary.json is in its directory is not trained again (an interrupted reproduction goes
on where it stopped; --force retrains), unless that run was trained with other arguments
than the recipe's (an older recipe, other --steps or --episodes): then an error that names
them. The combined table of every recipe finished in OUT, those of earlier --only runs
too, goes to OUT/results.md and OUT/results.json (with each run's command, training time
and backend).

--steps and --episodes shorten every run (smoke runs: the numbers then mean nothing).
Bad arguments: one line on stderr, exit status 2; a failing run stops the reproduction
with that run's status.
"""

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from fastmeta.cli import checkpoint
from fastmeta.cli.checkpoint import SAME_ON_RESUME
from fastmeta.cli.evaluate import format_accuracy
from fastmeta.cli.main import _positive_int
from fastmeta.cli.main import build_parser as build_train_parser
from fastmeta.cli.main import main as cli
from fastmeta.cli.train import EPISODE_SHAPE


@dataclass(frozen=True)
class Recipe:
    """One training run: `fastmeta train ALGORITHM --data omniglot ARGS`, tested at each
    (ways, queries per class) of `tests` with 1-shot episodes."""

    algorithm: str
    args: tuple[str, ...]
    tests: tuple[tuple[int, int], ...]

    def tested(self, name: str) -> str:
        """The value of the training run's own test episodes' `name` (ways, shots,
        queries): --eval-NAME where given, else the training episodes' --NAME."""
        options = dict(zip(self.args, self.args[1:]))
        return options.get(f"--eval-{name}", options[f"--{name}"])

    def needs_eval(self, ways: int, queries: int) -> bool:
        """Whether the 1-shot test at (ways, queries) is not the training run's own
        test, so `fastmeta eval` runs it."""
        own = tuple(self.tested(name) for name in EPISODE_SHAPE)
        return own != (str(ways), "1", str(queries))


def _episodes(ways: int, queries: int, tasks: int, steps: int, shots: int = 1) -> tuple[str, ...]:
    """The training episodes' options: `shots` (1) and `queries` per class, `tasks` a step."""
    sizes = {"--ways": ways, "--shots": shots, "--queries": queries, "--tasks": tasks}
    sizes["--steps"] = steps
    return tuple(text for option, value in sizes.items() for text in (option, str(value)))


MAML_INNER = ("--inner-lr", "0.4", "--inner-steps", "1", "--eval-inner-steps", "3")
METANET_SCHEDULE = ("--lr-halve-every", "400", "--val-every", "250")
RECIPES = {
    # ProtoNet's embedding does not depend on the number of ways: one run, two tests
    "protonet": Recipe(
        "protonet",
        _episodes(20, 5, 1, 4000) + ("--lr-halve-every", "1000", "--val-fraction", "0.15"),
        ((5, 15), (20, 15)),
    ),
    # MAML's and Meta Networks' output layers have a fixed number of ways: a run each
    "maml-5w": Recipe(
        "maml",
        _episodes(5, 15, 16, 3000)
        + MAML_INNER
        + ("--lr-halve-every", "1000", "--val-every", "500"),
        ((5, 15),),
    ),
    "maml-20w": Recipe(
        "maml",
        _episodes(20, 5, 8, 2000) + MAML_INNER + ("--lr-halve-every", "600", "--val-every", "250"),
        ((20, 5),),
    ),
    "metanet-5w": Recipe("metanet", _episodes(5, 5, 16, 1000) + METANET_SCHEDULE, ((5, 15),)),
    "metanet-5w-lstm": Recipe(
        "metanet",
        _episodes(5, 5, 16, 500) + METANET_SCHEDULE + ("--task-generator", "lstm"),
        ((5, 15),),
    ),
    "metanet-20w": Recipe(
        "metanet",
        _episodes(20, 5, 8, 800) + ("--lr-halve-every", "300", "--val-every", "200"),
        ((20, 5),),
    ),
}
TEST_EPISODES = 1000


def _recipe_names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in RECIPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown recipe(s) {', '.join(unknown) or repr(text)}; "
            f"choose from {', '.join(RECIPES)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmeta reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("benchmark", choices=("omniglot",))
    parser.add_argument("--data-dir", help="Omniglot directory (default: $FASTMETA_OMNIGLOT)")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce-omniglot"))
    parser.add_argument(
        "--only",
        type=_recipe_names,
        default=list(RECIPES),
        metavar="NAME,...",
        help=f"these recipes only ({', '.join(RECIPES)})",
    )
    parser.add_argument("--steps", type=_positive_int, help="override every run's steps")
    parser.add_argument(
        "--episodes",
        type=_positive_int,
        default=TEST_EPISODES,
        help="test (and validation) episodes per number",
    )
    parser.add_argument("--force", action="store_true", help="retrain finished recipes")
    parser.add_argument("--list", action="store_true", help="print the commands, run nothing")
    return parser


def train_argv(name: str, args: argparse.Namespace) -> list[str]:
    """The `fastmeta train` arguments of recipe `name` under these options."""
    recipe = RECIPES[name]
    data_dir = args.data_dir or "OMNIGLOT_DIR"  # --list without a directory
    argv = ["train", recipe.algorithm, "--data", "omniglot", "--data-dir", data_dir]
    argv += [*recipe.args, "--out", str(args.out / name)]
    argv += ["--test-episodes", str(args.episodes)]
    if args.steps is not None:  # a smoke run: validate once, at the end
        argv += ["--steps", str(args.steps), "--val-every", str(args.steps)]
        argv += ["--val-episodes", str(args.episodes)]
    return argv


def eval_argv(name: str, ways: int, queries: int, args: argparse.Namespace) -> list[str]:
    """The `fastmeta eval` arguments of recipe `name`'s test at (ways, queries)."""
    argv = ["eval", "--out", str(args.out / name), "--ways", str(ways), "--shots", "1"]
    return argv + ["--queries", str(queries), "--episodes", str(args.episodes)]


def _run(argv: list[str]) -> None:
    print(f"\n$ python -m fastmeta {shlex.join(argv)}", flush=True)
    status = cli(argv)
    if status != 0:
        raise SystemExit(status)


class StaleRun(Exception):
    """A recipe's finished run in OUT was trained with other arguments than the recipe's."""


def _stale(name: str, args: argparse.Namespace, summary: dict) -> str:
    """What recipe `name`'s finished run in OUT was trained with that the recipe (under
    these options) no longer asks for, as `--option run-value (recipe: value)`; '' if
    nothing (the trajectory settings, the steps and the test episodes are compared)."""
    wanted = build_train_parser().parse_args(train_argv(name, args))
    keys = (*SAME_ON_RESUME, "steps", "test_episodes")
    differences = checkpoint.changed(summary["args"], wanted, keys)
    return ", ".join(f"{option} {was} (recipe: {now})" for option, was, now in differences)


def reproduce(name: str, args: argparse.Namespace) -> None:
    """Trains recipe `name` (unless its run in OUT is finished) and runs the tests that
    are not the run's own. StaleRun if the finished run is not the recipe's."""
    recipe = RECIPES[name]
    summary_path = args.out / name / "summary.json"
    if args.force or not summary_path.is_file():
        _run(train_argv(name, args))
    elif stale := _stale(name, args, json.loads(summary_path.read_text())):
        raise StaleRun(f"{summary_path.parent} was trained with {stale}; --force retrains it")
    else:
        print(f"\n{name}: trained already ({summary_path}; --force retrains)")
    for ways, queries in recipe.tests:
        if recipe.needs_eval(ways, queries):
            _run(eval_argv(name, ways, queries, args))


def results(name: str, args: argparse.Namespace) -> list[dict]:
    """Recipe `name`'s result rows, one per test, from its run in OUT; [] where the run,
    one of its tests, is missing or the run is not the recipe's."""
    recipe = RECIPES[name]
    summary_path = args.out / name / "summary.json"
    if not summary_path.is_file():
        return []
    summary = json.loads(summary_path.read_text())
    if _stale(name, args, summary):
        return []
    rows = []
    for ways, queries in recipe.tests:
        test = summary["test"]
        if recipe.needs_eval(ways, queries):
            path = args.out / name / f"eval-test-{ways}w1s.json"
            if not path.is_file():
                return []
            test = json.loads(path.read_text())
            tested = (test["ways"], test["queries"], test["episodes"], test["step"])
            if tested != (ways, queries, args.episodes, summary["steps"]):
                return []
        rows.append(
            {
                "recipe": name,
                "algorithm": recipe.algorithm,
                "ways": ways,
                "shots": 1,
                "queries": queries,
                "accuracy": test["mean"],
                "ci95": test["ci95"],
                "episodes": test["episodes"],
                "val_accuracy": summary["val"]["mean"],
                "steps": summary["steps"],
                "tasks": summary["args"]["tasks"],
                "train_ways": summary["args"]["ways"],
                "train_shots": summary["args"]["shots"],
                "train_seconds": summary["train_seconds"],
                "backend": sorted(set(summary["backend"]["ran"].values())),
                "command": f"python -m fastmeta {shlex.join(train_argv(name, args))}",
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = [
        "| recipe | test: held-out alphabets, 1-shot | accuracy (95% CI) | validation | training |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        test = f"{r['ways']}-way, {r['queries']} queries, {r['episodes']} episodes"
        accuracy = format_accuracy(r["accuracy"], r["ci95"])
        episode = f"{r['train_ways']}-way {r['train_shots']}-shot"
        training = f"{r['steps']} steps x {r['tasks']} {episode} episodes, "
        training += f"{r['train_seconds']:.0f} s"
        lines.append(
            f"| {r['recipe']} | {test} | **{accuracy}** | {100 * r['val_accuracy']:.2f}% "
            f"| {training} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`fastmeta reproduce ...`; the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    args.data_dir = args.data_dir or os.environ.get("FASTMETA_OMNIGLOT")
    if args.list:
        for name in args.only:
            recipe = RECIPES[name]
            print(f"python -m fastmeta {shlex.join(train_argv(name, args))}")
            for ways, queries in recipe.tests:
                if recipe.needs_eval(ways, queries):
                    print(f"python -m fastmeta {shlex.join(eval_argv(name, ways, queries, args))}")
        return 0
    if not args.data_dir or not Path(args.data_dir).is_dir():
        print(
            f"fastmeta reproduce: error: --data-dir: not a directory: {args.data_dir!r} "
            "(Omniglot's zip archives; or set FASTMETA_OMNIGLOT)",
            file=sys.stderr,
        )
        return 2
    try:
        for name in args.only:
            reproduce(name, args)
    except StaleRun as stale:
        print(f"fastmeta reproduce: error: {stale}", file=sys.stderr)
        return 2
    except SystemExit as failed:
        print(f"fastmeta reproduce: error: recipe {name} failed", file=sys.stderr)
        return int(failed.code or 1)
    rows = [row for name in RECIPES for row in results(name, args)]  # finished earlier too
    text = table(rows)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{text}\nwritten: {args.out / 'results.md'}, {args.out / 'results.json'}")
    return 0
