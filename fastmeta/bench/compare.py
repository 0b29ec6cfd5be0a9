"""python -m fastmeta.bench compare OLD.json NEW.json

Matches the rows of two result files (a fixed run's or a sweep's JSON) by (case,
config, implementation); a sweep's config holds its point. Prints, per row, the old
and new median ms, new/old, and the noise: the sum of both rows' relative spread
between repeats (harness.relative_spread: interquartile range over median). A row is
flagged `slower` when new/old - 1 exceeds that noise, `faster` when old/new - 1 does.
A row without a recorded noise (files written before it was recorded) is never
flagged. Rows in one file only are listed after. Timings never fail it: the exit
status is 0, or 2 for a file it cannot read.
"""

import argparse
import dataclasses
import json

Key = tuple[str, str, str]  # case, config, implementation


@dataclasses.dataclass
class Comparison:
    key: Key
    old_ms: float
    new_ms: float
    noise: float | None  # the sum of both rows' relative spreads; None if one has none

    @property
    def ratio(self) -> float:
        return self.new_ms / self.old_ms

    @property
    def flag(self) -> str:
        if self.noise is None:
            return ""
        if self.ratio - 1 > self.noise:
            return "slower"
        if 1 / self.ratio - 1 > self.noise:
            return "faster"
        return ""


def load_rows(path: str) -> tuple[dict, dict[Key, dict]]:
    """(the file's header, its rows by key); ValueError (or OSError) for a file that is
    not a result file or has two rows with one key."""
    with open(path) as f:
        content = json.load(f)
    if not isinstance(content, dict) or not isinstance(content.get("results"), list):
        raise ValueError("not a result file of python -m fastmeta.bench (no 'results' list)")
    rows: dict[Key, dict] = {}
    for row in content["results"]:
        key = (row["case"], row["config"], row["name"])
        if key in rows:
            raise ValueError(f"two rows for {' | '.join(key)}")
        rows[key] = row
    return {k: v for k, v in content.items() if k != "results"}, rows


def compare(old: dict[Key, dict], new: dict[Key, dict]) -> list[Comparison]:
    """The rows in both, in the new file's order."""
    comparisons = []
    for key, row in new.items():
        if key not in old:
            continue
        noises = (old[key].get("noise"), row.get("noise"))
        comparisons.append(
            Comparison(
                key,
                old[key]["median_ms"],
                row["median_ms"],
                None if None in noises else noises[0] + noises[1],
            )
        )
    return comparisons


def format_report(comparisons: list[Comparison], only_old: list[Key], only_new: list[Key]) -> str:
    header = ("case", "config", "implementation", "old ms", "new ms", "new/old", "noise %", "")
    cells = [
        (
            *c.key,
            f"{c.old_ms:.3f}",
            f"{c.new_ms:.3f}",
            f"{c.ratio:.3f}",
            "-" if c.noise is None else f"{100 * c.noise:.1f}",
            c.flag,
        )
        for c in comparisons
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in [header, *cells]
    ]
    flags = [c.flag for c in comparisons]
    lines.append(
        f"{len(comparisons)} rows in both: {flags.count('slower')} slower and "
        f"{flags.count('faster')} faster than the noise between repeats"
    )
    for label, keys in (("OLD", only_old), ("NEW", only_new)):
        if keys:
            lines.append(f"only in {label} ({len(keys)}):")
            lines += [f"  {' | '.join(key)}" for key in keys]
    return "\n".join(lines)


def _describe(path: str, header: dict) -> str:
    machine = header.get("machine", {})
    load = machine.get("load_1_5_15_min")
    return (
        f"{path}: {machine.get('date', 'date unknown')}"
        + (f", load {' '.join(map(str, load))}" if load else "")
        + (f", {header['command']}" if "command" in header else "")
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastmeta.bench compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("old", metavar="OLD.json")
    parser.add_argument("new", metavar="NEW.json")
    args = parser.parse_args(argv)
    loaded = []
    for path in (args.old, args.new):
        try:
            loaded.append(load_rows(path))
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"{path}: {type(error).__name__}: {error}")
    (old_header, old), (new_header, new) = loaded
    print(f"old: {_describe(args.old, old_header)}")
    print(f"new: {_describe(args.new, new_header)}")
    only_old = [key for key in old if key not in new]
    only_new = [key for key in new if key not in old]
    print(format_report(compare(old, new), only_old, only_new))
    return 0
