"""python -m fastmeta.bench sweep --case CASE --vary AXIS=V1,V2,... [--vary ...] [--set AXIS=V]

Times the case's candidates at every point of the cartesian product of the --vary lists
(the other axes at their defaults, or at --set values), side by side as the fixed run
does (harness.run_config: interleaved rounds after warm-up, medians, the noise between
repeats, peak memory). After each point its rows are appended to STEM.csv and STEM.json
is rewritten whole (atomically), and one line goes to stderr; a sweep cut off (Ctrl-C)
keeps the points it finished (SIGTERM, as timeout(1) sends, stops it as Ctrl-C does).
At the end, or at the interruption, the plots are drawn
beside them (fastmeta/bench/plots.py): STEM-time.png, STEM-memory.png, STEM-speedup.png.

A point whose estimated footprint (the case's) exceeds MEMORY_FRACTION of the memory
available is not run, nor is a candidate the case skips at that point (protonet's
[B, M, C, D] broadcast); both are listed under "skipped" in STEM.json. --check compares
each candidate's output with the fastmeta row's (harness.check_outputs) and exits 1
naming the rows that differ. Exit status 130 after an interruption.
"""

import argparse
import csv
import dataclasses
import gc
import itertools
import os
import signal
import sys
import time

import torch

import fastmeta
from fastmeta.bench import harness, inner_update, maml, metanet, plots, protonet

SWEEPS = {case.CASE: case.SWEEP for case in (inner_update, maml, metanet, protonet)}
MEMORY_FRACTION = 0.7  # of the memory available before the point
DEFAULT_REPEATS = 5


def parse_axis(text: str, option: str, axes: dict[str, int]) -> tuple[str, list[int]]:
    """'ways=5,20' -> ('ways', [5, 20]). A ValueError names the option, what it got and
    what is wrong: no '=', an unknown axis, no values, a value that is not a positive
    integer, a value given twice."""
    name, equals, values = text.partition("=")
    if not equals:
        raise ValueError(f"{option} {text!r}: expected AXIS=V1,V2,... (e.g. ways=5,20)")
    if name not in axes:
        raise ValueError(f"{option} {text!r}: unknown axis {name!r} (axes: {', '.join(axes)})")
    if not values.strip():
        raise ValueError(f"{option} {text!r}: empty list of values")
    parsed = []
    for item in values.split(","):
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{option} {text!r}: {item!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"{option} {text!r}: {value} is not a positive integer")
        if value in parsed:
            raise ValueError(f"{option} {text!r}: {value} is given twice")
        parsed.append(value)
    return name, parsed


def points(axes: dict[str, int], varied: dict[str, list[int]], fixed: dict[str, int]) -> list:
    """Every combination of the varied values (the last axis changing fastest), each a
    dict over all axes in the case's order."""
    return [
        {axis: chosen.get(axis, fixed.get(axis, default)) for axis, default in axes.items()}
        for chosen in (dict(zip(varied, values)) for values in itertools.product(*varied.values()))
    ]


def config_name(point: dict[str, int]) -> str:
    return " ".join(f"{axis}={value}" for axis, value in point.items())


class SweepFiles:
    """STEM.csv, a row appended per result as points finish, and STEM.json (the header,
    every row so far, the skipped ones, how many points are done), rewritten whole
    after each point."""

    def __init__(self, out_dir: str, stem: str, header: dict):
        os.makedirs(out_dir, exist_ok=True)
        self.csv_path = os.path.join(out_dir, f"{stem}.csv")
        self.json_path = os.path.join(out_dir, f"{stem}.json")
        self.content = {**header, "points_done": 0, "interrupted": False}
        self.content |= {"load_after_point": [], "results": [], "skipped": []}
        with open(self.csv_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=harness.CSV_COLUMNS).writeheader()
        harness.write_json_atomic(self.json_path, self.content)

    def add_point(self, results: list[harness.Result], skipped: list[dict]) -> None:
        """Appends the point's rows and rewrites the JSON, with the load averages now
        (other jobs on the machine slow every row of a point alike)."""
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=harness.CSV_COLUMNS)
            writer.writerows(harness.csv_row(r) for r in results)
        self.content["results"] += [dataclasses.asdict(r) for r in results]
        self.content["skipped"] += skipped
        self.content["points_done"] += 1
        self.content["load_after_point"].append(harness.load_average())
        harness.write_json_atomic(self.json_path, self.content)

    def mark_interrupted(self) -> None:
        self.content["interrupted"] = True
        harness.write_json_atomic(self.json_path, self.content)


def run_point(case: str, device: str, point: dict[str, int], check: bool, repeats: int):
    """(results, skipped) at one point: nothing run if its footprint does not fit."""
    spec = SWEEPS[case]
    config = config_name(point)
    available = harness.available_memory_bytes(device)
    need, limit = spec.footprint(point), int(MEMORY_FRACTION * available)
    if need > limit:
        reason = f"needs about {need / 2**30:.1f} GiB, {limit / 2**30:.1f} GiB usable"
        return [], [{"point": point, "name": "(every row)", "reason": reason}]
    # A fresh torch.compile cache per point: the compiled rows recompile for each shape,
    # and Dynamo falls back to eager after recompile_limit shapes of one function.
    torch._dynamo.reset()
    torch.manual_seed(0)
    candidates = spec.candidates(device, point, limit)
    skipped = [
        {"point": point, "name": c.name, "reason": c.skip_reason}
        for c in candidates
        if c.skip_reason is not None
    ]
    results = harness.run_config(
        case,
        config,
        device,
        candidates,
        memory=True,
        check=check,
        point=point,
        warmup=spec.warmup,
        repeats=repeats,
    )
    return results, skipped


def point_line(point: dict[str, int], results: list[harness.Result], skipped: list[dict]) -> str:
    """The point, the fastmeta row's time, each other row's time over it, what was skipped."""
    if not results:
        return f"{config_name(point)}: skipped ({skipped[0]['reason']})"
    reference = next(r for r in results if r.is_fastmeta)
    others = ", ".join(f"{r.name} {r.ratio_to_fastmeta:.2f}x" for r in results if not r.is_fastmeta)
    skips = f"; skipped: {', '.join(s['name'] for s in skipped)}" if skipped else ""
    return f"{config_name(point)}: {reference.name} {reference.median_ms:.3f} ms; {others}{skips}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sweep_points(
    case: str, device: str, todo: list, files: SweepFiles, check: bool, repeats: int
) -> tuple[list[harness.Result], bool]:
    """Runs the points in order, each written to files as it ends, with a line on stderr:
    (the results, whether it was interrupted: Ctrl-C or SIGTERM)."""
    results: list[harness.Result] = []
    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for k, point in enumerate(todo, 1):
            point_start = time.monotonic()
            point_results, skipped = run_point(case, device, point, check, repeats)
            files.add_point(point_results, skipped)
            results += point_results
            now = time.monotonic()
            left = (now - start) / k * (len(todo) - k)
            load = files.content["load_after_point"][-1]
            print(
                f"[{k}/{len(todo)}] {point_line(point, point_results, skipped)} "
                f"({now - point_start:.0f} s, about {left:.0f} s left"
                + (f"; load {load[0]})" if load else ")"),
                file=sys.stderr,
                flush=True,
            )
            gc.collect()
    except KeyboardInterrupt:
        files.mark_interrupted()
        done = files.content["points_done"]
        print(f"interrupted after {done} of {len(todo)} points", file=sys.stderr)
        return results, True
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return results, False


def _parser() -> argparse.ArgumentParser:
    axes = "\n".join(
        f"  {case}: "
        + " ".join(f"{axis}={default}" for axis, default in spec.axes.items())
        + f"\n    ({spec.about})"
        for case, spec in sorted(SWEEPS.items())
    )
    parser = argparse.ArgumentParser(
        prog="python -m fastmeta.bench sweep",
        description=__doc__,
        epilog=f"axes and their defaults:\n{axes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--case", required=True, choices=sorted(SWEEPS))
    parser.add_argument(
        "--vary",
        action="append",
        required=True,
        metavar="AXIS=V1,V2,...",
        help="an axis and its values (repeatable, one per axis)",
    )
    parser.add_argument(
        "--set",
        dest="fixed",
        action="append",
        default=[],
        metavar="AXIS=V",
        help="a value other than the default for an axis not varied (repeatable)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="CPU timing rounds per point (default: %(default)s)",
    )
    parser.add_argument(
        "--check", action="store_true", help="compare every row's output with fastmeta's"
    )
    parser.add_argument(
        "--out", default="benchmarks/results/local", help="directory (default: %(default)s)"
    )
    parser.add_argument("--stem", help="file name stem (default: sweep-CASE-DEVICE)")
    parser.add_argument("--no-plots", action="store_true", help="CSV and JSON only")
    return parser


def _axes_from(args, parser) -> tuple[dict[str, list[int]], dict[str, int]]:
    axes = SWEEPS[args.case].axes
    varied, fixed = {}, {}
    try:
        for option, texts in (("--vary", args.vary), ("--set", args.fixed)):
            for text in texts:
                name, values = parse_axis(text, option, axes)
                if name in varied or name in fixed:
                    raise ValueError(f"{option} {text!r}: axis {name!r} is given twice")
                if option == "--set" and len(values) > 1:
                    raise ValueError(f"--set {text!r}: one value (to vary it: --vary)")
                if option == "--vary":
                    varied[name] = values
                else:
                    fixed[name] = values[0]
    except ValueError as error:
        parser.error(str(error))
    return varied, fixed


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    varied, fixed = _axes_from(args, parser)
    if args.repeats < 1:
        parser.error(f"--repeats: must be at least 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    spec = SWEEPS[args.case]
    todo = points(spec.axes, varied, fixed)
    machine = harness.machine_description(args.device)
    header = {
        "machine": machine,
        "command": "python -m fastmeta.bench sweep " + " ".join(argv),
        "case": args.case,
        "device": args.device,
        "varied": varied,
        "fixed": {a: v for a, v in todo[0].items() if a not in varied},
        "repeats": args.repeats,
        "points": len(todo),
    }
    files = SweepFiles(args.out, args.stem or f"sweep-{args.case}-{args.device}", header)
    print(fastmeta.backends(), end="\n\n")
    print(f"{args.case}: {len(todo)} points, {args.repeats} repeats each", file=sys.stderr)
    results, interrupted = sweep_points(
        args.case, args.device, todo, files, args.check, args.repeats
    )
    written = [files.csv_path, files.json_path]
    if not args.no_plots:
        try:
            written += plots.draw(files.content, files.json_path.removesuffix(".json"))
        except ImportError as error:
            print(f"plots skipped: {error}", file=sys.stderr)
    print(f"machine: {machine}")
    print(f"written: {', '.join(written)}")
    print(harness.format_table(results))
    mismatches = [r for r in results if r.check is not None and r.check.startswith("MISMATCH")]
    for r in mismatches:
        print(f"check failed: {r.case} {r.config} {r.name}: {r.check}", file=sys.stderr)
    return 130 if interrupted else 1 if mismatches else 0
