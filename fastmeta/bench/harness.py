"""Timing harness shared by the benchmark cases.

A case is a list of Candidates (callables doing one forward+backward) for one
configuration. On CPU the candidates are timed interleaved (round robin, after
warm-up) and each reports its median, so a noisy machine slows all of them alike;
on a GPU each is timed with triton.testing.do_bench (median, CUDA events). Ratios
are always against the fastmeta row of the same configuration in the same run.
Each row also records the noise between its repeats (relative_spread) and, with
check=True, whether its output matches the fastmeta row's (check_outputs).
"""

import csv
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import statistics
import time
from typing import Callable

import torch

from fastmeta.cpu_pool import empty_cpu_cache

# Relative error (norm of the difference over the reference's norm) a candidate's output
# may have against the fastmeta row's under check=True, by the reference's dtype: far
# above what rounding gives to another formulation of the same math (in float32 cdist ** 2,
# a square root squared, differs most: the sweep's check column has the errors), far
# below what a wrong gradient gives.
CHECK_TOLERANCE = {
    torch.float64: 1e-8,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


@dataclasses.dataclass
class Candidate:
    name: str  # e.g. "fastmeta[cpu]", "per-task loop"
    fn: Callable[[], object]
    is_fastmeta: bool = False
    bytes_moved: int | None = None  # fewest bytes the work must read + write, for GB/s
    # False for rows whose output is not the fastmeta row's (a floor: "GEMMs only",
    # "copy") or that check themselves (maml): check_outputs marks them "exempt"
    comparable: bool = True
    peak_mib: float | None = None  # measured by the case already (its first call)
    skip_reason: str | None = None  # set: not run (see skipped()), e.g. too big


@dataclasses.dataclass
class Result:
    case: str
    config: str
    name: str
    device: str
    median_ms: float
    ratio_to_fastmeta: float  # this row's time / the fastmeta row's time
    gbps: float | None = None
    peak_mib: float | None = None
    noise: float | None = None  # relative_spread of the per-repeat times
    is_fastmeta: bool = False  # the row the ratios refer to
    check: str | None = None  # check_outputs' verdict; None: not checked
    point: dict | None = None  # a sweep's axis values (fastmeta/bench/sweep.py)


@dataclasses.dataclass
class Sweepable:
    """What `python -m fastmeta.bench sweep` (fastmeta/bench/sweep.py) needs from a
    case: its axes, the candidates at one point and an upper estimate of the bytes a
    point needs (the sweep skips a point that would not fit in the memory available)."""

    axes: dict[str, int]  # name -> default; every axis is a positive integer
    about: str  # what each axis is, for --help
    candidates: Callable[[str, dict[str, int], int], list[Candidate]]  # device, point, bytes
    footprint: Callable[[dict[str, int]], int]
    warmup: int = 2  # warm-up rounds before timing (CPU)


def skipped(name: str, reason: str) -> Candidate:
    """A row that is not run (run_config leaves it out); a sweep records the reason."""

    def not_run():
        raise RuntimeError(f"{name} is skipped: {reason}")

    return Candidate(name, not_run, skip_reason=reason)


def relative_spread(samples: list[float]) -> float:
    """The interquartile range of the per-repeat times over their median (0 for a
    single sample): the noise compare.py holds a change of the median against."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(samples)


def time_candidates(
    candidates: list[Candidate],
    device: str,
    warmup: int = 2,
    repeats: int = 9,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Milliseconds of each timed call, per candidate. CPU: by `clock`, wall time by
    default; time.thread_time with torch.set_num_threads(1) gives the work's own CPU
    time, which other jobs on a shared machine change far less."""
    if device == "cuda":
        import triton.testing

        return {
            c.name: list(triton.testing.do_bench(c.fn, warmup=25, rep=200, return_mode="all"))
            for c in candidates
        }
    for _ in range(warmup):
        for c in candidates:
            c.fn()
    samples = {c.name: [] for c in candidates}
    order = list(candidates)
    shuffle = random.Random(0).shuffle  # a new order each round (seeded): no candidate
    for _ in range(repeats):  # always runs in the caches another one left
        shuffle(order)
        for c in order:
            start = clock()
            c.fn()
            samples[c.name].append((clock() - start) * 1e3)
    return samples


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_peak_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident memory of one call above the resident memory before it (Linux:
    the kernel's high-water mark, reset through /proc/self/clear_refs). Idle
    allocator caches (glibc's, fastmeta's CPU pool) are emptied first, so memory a
    call reuses from them counts as new."""
    try:
        gc.collect()
        empty_cpu_cache()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return (_rss_kib("VmHWM") - before) / 1024
    except (OSError, StopIteration, AttributeError):
        return None


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory of one call above what was in use before it, in MiB."""
    if device != "cuda":
        return _cpu_peak_mib(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _tensors(output) -> list[torch.Tensor]:
    """The tensors in a candidate's output (a tensor, or nested tuples/lists of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _flat(output) -> torch.Tensor | None:
    tensors = _tensors(output)
    if not tensors:
        return None
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def check_outputs(candidates: list[Candidate]) -> dict[str, str]:
    """Calls each comparable candidate once and compares its output with the fastmeta
    row's: all its tensors concatenated, in float64, as relative error ||got - want|| /
    ||want|| (one norm over every gradient, as the maml and metanet cases compare:
    a per-tensor error is meaningless where a gradient is zero but for rounding). Verdict
    per name: "ok <error>", "MISMATCH <error> > <tolerance>" (or "MISMATCH: <why>"
    for outputs of other sizes), or "exempt" (not comparable, or the fastmeta row gives
    no tensors). The tolerance is CHECK_TOLERANCE of the fastmeta output's dtype."""
    reference = next(c for c in candidates if c.is_fastmeta)
    output = reference.fn() if reference.comparable else None
    want = _flat(output)
    if want is None:
        return {c.name: "exempt" for c in candidates}
    tolerance = CHECK_TOLERANCE.get(_tensors(output)[0].dtype, CHECK_TOLERANCE[torch.float32])
    verdicts = {}
    for c in candidates:
        if not c.comparable:
            verdicts[c.name] = "exempt"
            continue
        got = want if c is reference else _flat(c.fn())
        if got is None or got.numel() != want.numel():
            size = "no tensors" if got is None else f"{got.numel()} values"
            verdicts[c.name] = f"MISMATCH: {size}, fastmeta's {want.numel()}"
            continue
        error = float((got - want).norm() / want.norm().clamp_min(1e-300))
        verdicts[c.name] = (
            f"ok {error:.0e}" if error <= tolerance else f"MISMATCH {error:.0e} > {tolerance:.0e}"
        )
    return verdicts


def run_config(
    case: str,
    config: str,
    device: str,
    candidates: list[Candidate],
    memory: bool = False,
    check: bool = False,
    point: dict | None = None,
    **timing,
) -> list[Result]:
    """Times the candidates side by side (those with a skip_reason left out); with
    memory=True also measures each one's peak memory (one extra call each), with
    check=True first compares their outputs (check_outputs: one extra call each)."""
    candidates = [c for c in candidates if c.skip_reason is None]
    verdicts = check_outputs(candidates) if check else {}
    samples = time_candidates(candidates, device, **timing)
    times = {name: statistics.median(ts) for name, ts in samples.items()}
    reference = next(times[c.name] for c in candidates if c.is_fastmeta)
    return [
        Result(
            case=case,
            config=config,
            name=c.name,
            device=device,
            median_ms=times[c.name],
            ratio_to_fastmeta=times[c.name] / reference,
            gbps=c.bytes_moved / times[c.name] / 1e6 if c.bytes_moved else None,
            peak_mib=(peak_memory_mib(c.fn, device) if memory or device == "cuda" else c.peak_mib),
            noise=relative_spread(samples[c.name]),
            is_fastmeta=c.is_fastmeta,
            check=verdicts.get(c.name),
            point=point,
        )
        for c in candidates
    ]


def format_table(results: list[Result]) -> str:
    """One line per row; `noise %`: relative_spread of its repeats; `check`: the
    verdict of check_outputs, a column only when a row was checked."""
    checked = any(r.check is not None for r in results)
    width = max([34, *(len(r.config) for r in results)])  # a sweep's config: its point
    lines = [
        f"{'case':<14} {'config':<{width}} {'implementation':<26} {'median ms':>10} "
        f"{'x fastmeta':>10} {'GB/s':>8} {'peak MiB':>9} {'noise %':>7}"
        + ("  check" if checked else "")
    ]
    for r in results:
        gbps = f"{r.gbps:8.1f}" if r.gbps is not None else f"{'-':>8}"
        peak = f"{r.peak_mib:9.1f}" if r.peak_mib is not None else f"{'-':>9}"
        noise = f"{100 * r.noise:7.1f}" if r.noise is not None else f"{'-':>7}"
        lines.append(
            f"{r.case:<14} {r.config:<{width}} {r.name:<26} {r.median_ms:10.3f} "
            f"{r.ratio_to_fastmeta:10.2f} {gbps} {peak} {noise}"
            + (f"  {r.check or '-'}" if checked else "")
        )
    return "\n".join(lines)


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages; None where the system keeps none."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_description(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    load = load_average()
    if load is not None:  # other jobs on the machine slow every row alike
        info["load_1_5_15_min"] = load
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def available_memory_bytes(device: str) -> int:
    """Memory a new allocation can get now: the GPU's free memory, or Linux's
    MemAvailable (other systems: the physical memory)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            return next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


CSV_COLUMNS = [field.name for field in dataclasses.fields(Result)]


def csv_row(result) -> dict:
    """A result dataclass as a CSV row: a Result's point as JSON ({"ways": 5, "dim": 64}),
    empty if none."""
    row = dataclasses.asdict(result)
    if "point" in row:
        row["point"] = json.dumps(row["point"]) if row["point"] is not None else ""
    return row


def write_json_atomic(path: str, content: dict) -> None:
    """Writes path.tmp, then renames it over path: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)


def write_results(
    results: list, out_dir: str, stem: str, extra: dict, row_type: type = Result
) -> list[str]:
    """Writes stem.csv and stem.json (rows plus machine, date and command); the rows
    are row_type dataclasses (its fields: the columns)."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(csv_path, "w", newline="") as f:  # no results (a case skipped): the header
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(row_type)])
        writer.writeheader()
        writer.writerows(csv_row(r) for r in results)
    write_json_atomic(json_path, {**extra, "results": [dataclasses.asdict(r) for r in results]})
    return [csv_path, json_path]
