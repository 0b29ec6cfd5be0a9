"""Timing harness shared by the benchmark cases.

A case is a list of Candidates (callables doing one forward+backward) for one
configuration. On CPU the candidates are timed interleaved (round robin, after
warm-up) and each reports its median, so a noisy machine slows all of them alike;
on a GPU each is timed with triton.testing.do_bench (median, CUDA events). Ratios
are always against the fastmeta row of the same configuration in the same run.
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


@dataclasses.dataclass
class Candidate:
    name: str  # e.g. "fastmeta[cpu]", "per-task loop"
    fn: Callable[[], object]
    is_fastmeta: bool = False
    bytes_moved: int | None = None  # fewest bytes the work must read + write, for GB/s


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


def time_candidates(
    candidates: list[Candidate],
    device: str,
    warmup: int = 2,
    repeats: int = 9,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median milliseconds per candidate. CPU: by `clock`, wall time by default;
    time.thread_time with torch.set_num_threads(1) gives the work's own CPU time,
    which other jobs on a shared machine change far less."""
    if device == "cuda":
        import triton.testing

        return {
            c.name: float(triton.testing.do_bench(c.fn, warmup=25, rep=200, return_mode="median"))
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
    return {name: statistics.median(ts) for name, ts in samples.items()}


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


def run_config(
    case: str, config: str, device: str, candidates: list[Candidate], memory: bool = False, **timing
) -> list[Result]:
    """Times the candidates side by side; with memory=True also measures each one's
    peak memory (one extra call each)."""
    times = time_candidates(candidates, device, **timing)
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
            peak_mib=peak_memory_mib(c.fn, device) if memory or device == "cuda" else None,
        )
        for c in candidates
    ]


def format_table(results: list[Result]) -> str:
    lines = [
        f"{'case':<14} {'config':<34} {'implementation':<26} {'median ms':>10} "
        f"{'x fastmeta':>10} {'GB/s':>8} {'peak MiB':>9}"
    ]
    for r in results:
        gbps = f"{r.gbps:8.1f}" if r.gbps is not None else f"{'-':>8}"
        peak = f"{r.peak_mib:9.1f}" if r.peak_mib is not None else f"{'-':>9}"
        lines.append(
            f"{r.case:<14} {r.config:<34} {r.name:<26} {r.median_ms:10.3f} "
            f"{r.ratio_to_fastmeta:10.2f} {gbps} {peak}"
        )
    return "\n".join(lines)


def machine_description(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):  # other jobs on the machine slow every row alike
        info["load_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(results: list[Result], out_dir: str, stem: str, extra: dict) -> list[str]:
    """Writes stem.csv and stem.json (rows plus machine, date and command)."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    json_path = os.path.join(out_dir, f"{stem}.json")
    rows = [dataclasses.asdict(r) for r in results]
    columns = [field.name for field in dataclasses.fields(Result)]
    with open(csv_path, "w", newline="") as f:  # no results (a case skipped): the header
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as f:
        json.dump({**extra, "results": rows}, f, indent=2)
    return [csv_path, json_path]
