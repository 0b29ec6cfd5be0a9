"""The summary table of scripts/gpu_check.sh, as Markdown on stdout.

    python scripts/gpu_summary.py WORK_DIR

WORK_DIR holds what the check has produced so far: `machine.log` (card, driver,
versions), `steps.tsv` (one line per finished step: name, result, seconds, limit),
one JUnit XML per test step (`NAME.xml`) and the benchmark CSVs (`bench-CASE.csv`,
written by `python -m fastmeta.bench --out WORK_DIR --stem bench-CASE`). Anything
missing or unreadable is reported as such: the check calls this after every step,
so it must work on a run that was cut off.
"""

import csv
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OUTCOMES = ("passed", "failed", "errors", "skipped")
LISTED_PROBLEMS = 60  # failing tests listed by name, at most


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(cells) + " |" for cells in lines]


def outcome(case: ET.Element) -> str:
    for tag, name in (("error", "errors"), ("failure", "failed"), ("skipped", "skipped")):
        if case.find(tag) is not None:
            return name
    return "passed"


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """Counts per outcome, and `test id: first line of the message` for each failure
    or error. Raises ET.ParseError for a truncated file."""
    counts = dict.fromkeys(OUTCOMES, 0)
    problems = []
    for case in ET.parse(path).getroot().iter("testcase"):
        result = outcome(case)
        counts[result] += 1
        if result in ("failed", "errors"):
            detail = case.find("error" if result == "errors" else "failure")
            message = (detail.get("message") or "").strip().splitlines() or [""]
            problems.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200]}")
    return counts, problems


def steps_section(work: Path) -> list[str]:
    path = work / "steps.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []
    return ["## Steps", "", *table(["step", "result", "seconds", "limit s"], rows)]


def tests_section(work: Path) -> list[str]:
    rows, problems = [], []
    total = dict.fromkeys(OUTCOMES, 0)
    for path in sorted(work.glob("*.xml")):
        try:
            counts, failed = junit_counts(path)
        except ET.ParseError as error:
            rows.append([path.stem, f"unreadable JUnit XML ({error})", "", "", ""])
            continue
        rows.append([path.stem, *(str(counts[k]) for k in OUTCOMES)])
        total = {k: total[k] + counts[k] for k in OUTCOMES}
        problems += failed
    rows.append(["**total**", *(f"**{total[k]}**" for k in OUTCOMES)])
    lines = ["## Tests", "", *table(["test step", *OUTCOMES], rows)]
    if problems:
        lines += ["", "Failed tests:", ""] + [f"- {p}" for p in problems[:LISTED_PROBLEMS]]
        if len(problems) > LISTED_PROBLEMS:
            lines.append(f"- ... and {len(problems) - LISTED_PROBLEMS} more (see the logs)")
    return lines


def number(text: str, digits: int) -> str:
    return f"{float(text):.{digits}f}" if text not in ("", None) else "-"


def bench_section(work: Path) -> list[str]:
    """One row per implementation; `x fastmeta` is its time over the fastmeta row's of
    the same config (> 1: fastmeta is faster), so each config lists fastmeta first."""
    rows = []
    for path in sorted(work.glob("bench-*.csv")):
        try:
            with open(path, newline="") as f:
                results = list(csv.DictReader(f))
            results.sort(key=lambda r: float(r["ratio_to_fastmeta"]) != 1.0)  # stable
            results.sort(key=lambda r: (r["case"], r["config"]))
            rows += [
                [
                    r["case"],
                    r["config"],
                    r["name"],
                    number(r["median_ms"], 3),
                    number(r["ratio_to_fastmeta"], 2),
                    number(r["gbps"], 1),
                    number(r["peak_mib"], 1),
                ]
                for r in results
            ]
        except (KeyError, ValueError, csv.Error) as error:
            rows.append(
                [path.stem, f"unreadable CSV ({type(error).__name__}: {error})", "", "", "", "", ""]
            )
    header = ["case", "config", "implementation", "median ms", "x fastmeta", "GB/s", "peak MiB"]
    return ["## Benchmarks (median; x fastmeta = its time / fastmeta's)", "", *table(header, rows)]


def summary(work: Path) -> str:
    machine = work / "machine.log"
    lines = ["# fastmeta GPU check", ""]
    if machine.exists():
        lines += ["```", machine.read_text().rstrip(), "```", ""]
    for section in (steps_section, tests_section, bench_section):
        lines += [*section(work), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit(f"usage: {sys.argv[0]} WORK_DIR")
    print(summary(Path(sys.argv[1])))
