"""python -m fastmeta.cli.demo [--omniglot DIR] [--steps N] [--out DIR]  (`make demo`)

Trains every algorithm this build has for a few steps on synthetic Gaussian-cluster
tasks, twice: with fastmeta's default backend and with the pure-PyTorch `reference`
backend (same seed, same episodes), then prints one table: test accuracy with its
95% interval, training throughput of each backend and the speedup. With --omniglot
it also trains ProtoNet (conv4) briefly on that Omniglot directory.
"""

import argparse
import json
import sys
from pathlib import Path

from fastmeta.cli import algorithms
from fastmeta.cli.evaluate import format_accuracy
from fastmeta.cli.main import main as cli

SYNTHETIC = ["--ways", "5", "--shots", "1", "--queries", "15", "--tasks", "8"]
OMNIGLOT = [
    "--ways",
    "5",
    "--shots",
    "1",
    "--queries",
    "5",
    "--tasks",
    "4",
    "--val-episodes",
    "100",
    "--test-episodes",
    "600",
]


def train(name: str, out: Path, backend: str, steps: int, options: list[str]) -> dict:
    """One CLI run (in this process); its summary.json."""
    print(f"\n== {name}, {backend} backend ({out})", flush=True)
    argv = [
        "train",
        name,
        "--steps",
        str(steps),
        "--val-every",
        str(steps),
        "--out",
        str(out),
        "--backend",
        backend,
        *options,
    ]
    if cli(argv) != 0:
        raise SystemExit(f"demo: `fastmeta {' '.join(argv)}` failed")
    return json.loads((out / "summary.json").read_text())


def row(name: str, data: str, fast: dict, reference: dict | None) -> list[str]:
    cells = [name, data, format_accuracy(**fast["test"]), f"{fast['episodes_per_second']:.0f}"]
    if reference is None:
        return cells + ["-", "-", fast["paths"]["summary"]]
    ratio = fast["episodes_per_second"] / reference["episodes_per_second"]
    return cells + [
        f"{reference['episodes_per_second']:.0f}",
        f"{ratio:.2f}x",
        fast["paths"]["summary"],
    ]


def table(rows: list[list[str]]) -> str:
    header = [
        "algorithm",
        "data",
        "test accuracy (95% CI)",
        "episodes/s fastmeta",
        "episodes/s reference",
        "speedup",
        "summary.json (curve.png beside it)",
    ]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastmeta.cli.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--omniglot", metavar="DIR", help="also train ProtoNet on Omniglot")
    parser.add_argument("--steps", type=int, default=1000, help="synthetic training steps")
    parser.add_argument("--omniglot-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)

    rows, missing = [], []
    for name in algorithms.REGISTRY:
        if not algorithms.available(name):
            missing.append(name)
            continue
        runs = [
            train(name, args.out / f"{name}-{backend}", backend, args.steps, SYNTHETIC)
            for backend in ("auto", "reference")
        ]
        rows.append(row(name, "synthetic 5w1s", *runs))
    if args.omniglot:
        fast = train(
            "protonet",
            args.out / "protonet-omniglot",
            "auto",
            args.omniglot_steps,
            ["--data", "omniglot", "--data-dir", args.omniglot, *OMNIGLOT],
        )
        rows.append(row("protonet", "omniglot 5w1s", fast, None))
    print(
        f"\nfastmeta demo: {args.steps} training steps of 8 episodes on synthetic tasks; "
        f"speedup = fastmeta's default backend over `--backend reference`, same run"
    )
    print(table(rows))
    if missing:
        print(f"not available in this build of fastmeta yet: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
