"""fastmeta profile train ALGORITHM [training options] [--profile-steps N]
[--profile-warmup W] [--trace FILE] [--sort self|total] [--top K] [--nvtx]

Runs the training step of `fastmeta train` (fastmeta/cli/train.py) on a fresh model:
W steps without the profiler (timed: their median is the unprofiled step time), one
under the profiler's warm-up (discarded), then N recorded by torch.profiler (CPU
activity, and CUDA on a GPU). Prints where a step's time goes: per phase
(fastmeta.profiling: data, inner_loop, query_pass, loss, outer_backward, optimizer, and
"other", the rest of the step range) the ms per step and the share of the step, then
the top fastmeta ops and the top ATen ops by self (or total) time. Writes the trace
(Chrome/Perfetto JSON: open it at ui.perfetto.dev or chrome://tracing) and
profile.json (these tables, the machine and the arguments) to the run directory
(--out). The options of the training loop alone (--steps, --val-*, --test-episodes)
do not apply; --resume is refused.
"""

import contextlib
import statistics
import time
from argparse import Namespace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, schedule

import fastmeta
from fastmeta import profiling
from fastmeta.bench.harness import machine_description
from fastmeta.cli import breakdown
from fastmeta.cli.report import write_json
from fastmeta.cli.train import Session, complete_args, ran_backends
from fastmeta.distributed import Ranks


def profile_command(args: Namespace, ranks: Ranks) -> int:
    if ranks.world_size > 1:
        raise ValueError(
            f"fastmeta profile runs in one process, not on {ranks.world_size} ranks "
            f"(WORLD_SIZE is set: run it without torchrun)"
        )
    if args.resume:
        raise ValueError("--resume: fastmeta profile trains a fresh model, run it without")
    device = ranks.device
    if args.nvtx and device.type != "cuda":
        raise ValueError(f"--nvtx: NVTX ranges need a CUDA device, got --device {device}")
    complete_args(args)
    out = Path(args.out)
    trace = Path(args.trace) if args.trace else out / "trace.json"
    for folder in {out, trace.parent}:
        folder.mkdir(parents=True, exist_ok=True)

    session = Session(args, ranks)
    warmup_ms = []
    for done in range(args.profile_warmup):
        start = time.perf_counter()
        session.step(done)
        warmup_ms.append((time.perf_counter() - start) * 1e3)
    prof = record(session, args.profile_steps, args.profile_warmup, device, args.nvtx)
    prof.export_chrome_trace(str(trace))
    report = build_report(args, session, prof, warmup_ms, trace)
    path = write_json(out / "profile.json", report)
    print(headline(report))
    print(breakdown.format_breakdown(report))
    print(f"written: {trace}, {path}")
    return 0


def record(
    session: Session, steps: int, done: int, device: torch.device, nvtx: bool
) -> torch.profiler.profile:
    """`steps` training steps recorded by torch.profiler after one step of its warm-up."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    ranges = profiling.nvtx_ranges() if nvtx else contextlib.nullcontext()
    plan = schedule(wait=0, warmup=1, active=steps, repeat=1)
    with ranges, torch.profiler.profile(activities=activities, schedule=plan) as prof:
        for i in range(steps + 1):
            session.step(done + i)
            prof.step()
    return prof


def build_report(
    args: Namespace,
    session: Session,
    prof: torch.profiler.profile,
    warmup_ms: list[float],
    trace: Path,
) -> dict:
    """profile.json: the phases, the op tables, the machine and the arguments."""
    steps = args.profile_steps
    times = breakdown.phase_times(breakdown.spans(prof.events()), steps)
    averages = prof.key_averages()
    ops = dict(steps=steps, sort=args.sort, top=args.top)
    return {
        "algorithm": args.algorithm,
        "data": args.data,
        "device": str(session.ranks.device),
        "args": vars(args),
        "machine": machine_description(session.ranks.device.type),
        "backend": ran_backends(session.algorithm),
        "profile_steps": steps,
        "profile_warmup": args.profile_warmup,
        "unprofiled_step_ms": statistics.median(warmup_ms) if warmup_ms else None,
        "step_ms": times["step_ms"],
        "step_ms_mean": statistics.fmean(times["step_ms"]),
        "phases": times["phases"],
        "sort": args.sort,
        "fastmeta_ops": breakdown.top_ops(averages, prefixes=breakdown.FASTMETA_OP_PREFIXES, **ops),
        "aten_ops": breakdown.top_ops(averages, prefixes=(breakdown.ATEN_PREFIX,), **ops),
        "trace": str(trace),
        "fastmeta_version": fastmeta.__version__,
        "torch_version": torch.__version__,
    }


def headline(report: dict) -> str:
    a = report["args"]
    unprofiled = report["unprofiled_step_ms"]
    without = f"{unprofiled:.1f} ms without it" if unprofiled is not None else "no warm-up"
    ran = ", ".join(sorted(set(report["backend"].values()))) or "-"
    return (
        f"{a['algorithm']} on {a['data']}, {a['ways']}-way {a['shots']}-shot, {a['tasks']} "
        f"tasks, {report['device']} (fastmeta backend {ran}): {report['profile_steps']} "
        f"steps profiled after {report['profile_warmup']} warm-up, "
        f"{report['step_ms_mean']:.1f} ms per step under the profiler ({without})"
    )
