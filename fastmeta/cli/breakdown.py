"""Where a profiled training step's time goes: the phases of fastmeta.profiling and
the top fastmeta and ATen ops, from torch.profiler's events.

Phase times are wall times of the phase ranges on the thread that ran the steps, each
less the phase ranges nested in it, so the phases plus "other" (the step range's own
time: what no phase covers) add up to the step exactly. Work that another thread does
meanwhile (autograd's device threads run a CUDA backward) counts to the phase whose
range the stepping thread is in. On CUDA each phase also gets the time of the kernels
launched while it ran (by the launch's start, from any thread).
"""

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch.autograd import DeviceType

from fastmeta.profiling import PHASES, PREFIX, STEP, range_name

OTHER = "other"
FASTMETA_OP_PREFIXES = ("fastmeta::", "fastmeta_C::")
ATEN_PREFIX = "aten::"
SORT_KEYS = ("self", "total")


@dataclass(frozen=True)
class Span:
    """One host event: its name, thread, start and end (microseconds) and the
    microseconds of the device kernels it launched."""

    name: str
    thread: int
    start: float
    end: float
    kernel_us: float = 0.0


@dataclass
class _Node:
    """A step or phase range, and the time of the ranges directly nested in it."""

    span: Span
    children_us: float = 0.0

    @property
    def phase(self) -> str:
        return self.span.name.removeprefix(PREFIX)


def spans(events: Iterable) -> list[Span]:
    """Spans of torch.profiler's host events (FunctionEvents, device events left out)."""
    return [
        Span(
            e.name,
            e.thread,
            e.time_range.start,
            e.time_range.end,
            sum(k.duration for k in e.kernels),
        )
        for e in events
        if e.device_type == DeviceType.CPU
    ]


def phase_times(events: Sequence[Span], steps: int) -> dict:
    """{"phases": per phase that ran (of PHASES, in order) and OTHER: {"ms_per_step",
    "percent" of the step, and with kernels "device_ms_per_step"}, "step_ms": each
    step's wall time}. A ValueError if the events do not hold `steps` step ranges on
    one thread."""
    step_name = range_name(STEP)
    step_spans = [e for e in events if e.name == step_name]
    threads = {e.thread for e in step_spans}
    if len(step_spans) != steps or len(threads) != 1:
        raise ValueError(
            f"expected {steps} {step_name} ranges on one thread in the profile, found "
            f"{len(step_spans)} on {len(threads)} thread(s)"
        )
    (thread,) = threads
    names = {range_name(name) for name in (STEP, *PHASES)}
    ranges = sorted(
        (e for e in events if e.thread == thread and e.name in names),
        key=lambda e: (e.start, -e.end),
    )
    nodes = _nest(ranges)
    self_us = dict.fromkeys((*PHASES, STEP), 0.0)
    for node in nodes:
        self_us[node.phase] += node.span.end - node.span.start - node.children_us
    device_us = _device_times(events, nodes)
    step_us = sum(e.end - e.start for e in step_spans)
    self_us[OTHER] = self_us.pop(STEP)
    device_us[OTHER] = device_us.pop(STEP)
    ran = {node.phase for node in nodes} | {OTHER}
    phases = {
        name: {
            "ms_per_step": us / steps / 1e3,
            "percent": 100 * us / step_us if step_us else 0.0,
        }
        for name, us in self_us.items()
        if name in ran
    }
    if any(e.kernel_us for e in events):
        for name in phases:
            phases[name]["device_ms_per_step"] = device_us[name] / steps / 1e3
    return {"phases": phases, "step_ms": [(e.end - e.start) / 1e3 for e in step_spans]}


def _nest(ranges: list[Span]) -> list[_Node]:
    """Nodes of the ranges (sorted by start, outer first), each knowing the time of
    the ranges directly nested in it."""
    nodes: list[_Node] = []
    open_nodes: list[_Node] = []
    for span in ranges:
        while open_nodes and open_nodes[-1].span.end <= span.start:
            open_nodes.pop()
        node = _Node(span)
        if open_nodes:
            open_nodes[-1].children_us += span.end - span.start
        open_nodes.append(node)
        nodes.append(node)
    return nodes


def _device_times(events: Sequence[Span], nodes: list[_Node]) -> dict[str, float]:
    """Kernel microseconds per phase, each kernel counted to the innermost range
    open when its launching event started; kernels launched outside the steps are
    left out."""
    device_us = dict.fromkeys((*PHASES, STEP), 0.0)
    starts = [node.span.start for node in nodes]
    for event in events:
        if not event.kernel_us:
            continue
        i = bisect.bisect_right(starts, event.start) - 1
        while i >= 0 and nodes[i].span.end < event.start:  # the innermost one still open
            i -= 1
        if i >= 0:
            device_us[nodes[i].phase] += event.kernel_us
    return device_us


def top_ops(averages: Iterable, steps: int, *, prefixes: tuple[str, ...], sort: str, top: int):
    """The `top` ops whose names start with one of `prefixes`, by self or total time
    (device time when there is any, else host): calls, total and self ms per step."""
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {SORT_KEYS}, got {sort!r}")
    rows = []
    for avg in averages:
        if not avg.key.startswith(prefixes):
            continue
        row = {
            "name": avg.key,
            "calls_per_step": avg.count / steps,
            "total_ms_per_step": avg.cpu_time_total / steps / 1e3,
            "self_ms_per_step": avg.self_cpu_time_total / steps / 1e3,
        }
        if avg.device_time_total:
            row["device_total_ms_per_step"] = avg.device_time_total / steps / 1e3
            row["device_self_ms_per_step"] = avg.self_device_time_total / steps / 1e3
        rows.append(row)
    on_device = any("device_total_ms_per_step" in row for row in rows)
    key = f"device_{sort}_ms_per_step" if on_device else f"{sort}_ms_per_step"
    return sorted(rows, key=lambda row: -row.get(key, 0.0))[:top]


def format_breakdown(report: dict) -> str:
    """The phase table and the two op tables of a profile report (profile.json)."""
    phases = report["phases"]
    device = any("device_ms_per_step" in p for p in phases.values())
    lines = [
        f"{'phase':<16}{'ms/step':>10}{'% of step':>11}" + (f"{'device ms':>11}" if device else "")
    ]
    for name, p in phases.items():
        extra = f"{p['device_ms_per_step']:11.3f}" if device else ""
        lines.append(f"{name:<16}{p['ms_per_step']:10.3f}{p['percent']:10.1f}%{extra}")
    step_ms = report["step_ms_mean"]
    lines.append(f"{'step':<16}{step_ms:10.3f}{100.0:10.1f}%")
    for title, rows in (
        ("fastmeta ops", report["fastmeta_ops"]),
        (f"ATen ops by {report['sort']} time", report["aten_ops"]),
    ):
        lines += ["", _op_table(title, rows)]
    return "\n".join(lines)


def _op_table(title: str, rows: list[dict]) -> str:
    if not rows:
        return f"{title}: none in the profile"
    device = "device_total_ms_per_step" in rows[0]
    width = max(len(title), *(len(row["name"]) for row in rows)) + 2
    header = f"{title:<{width}}{'calls/step':>11}{'total ms':>10}{'self ms':>10}"
    lines = [header + (f"{'dev total':>10}{'dev self':>10}" if device else "")]
    for row in rows:
        line = (
            f"{row['name']:<{width}}{row['calls_per_step']:11.1f}"
            f"{row['total_ms_per_step']:10.3f}{row['self_ms_per_step']:10.3f}"
        )
        if device:
            line += (
                f"{row.get('device_total_ms_per_step', 0.0):10.3f}"
                f"{row.get('device_self_ms_per_step', 0.0):10.3f}"
            )
        lines.append(line)
    return "\n".join(lines)
