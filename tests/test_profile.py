"""`fastmeta profile train`: the trace and the breakdown it writes, its arguments, the
phase ranges (fastmeta.profiling) and the breakdown's arithmetic (fastmeta/cli/
breakdown.py). Tiny synthetic runs on the CPU (--device cpu also where a GPU is visible)."""

import json
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastmeta import profiling
from fastmeta.cli import breakdown
from fastmeta.cli.breakdown import Span
from fastmeta.cli.main import main

TINY = ["--device", "cpu", "--tasks", "2", "--queries", "3"]
STEPS = ["--profile-steps", "2", "--profile-warmup", "1"]
RAN = {
    "protonet": {"data", "query_pass", "loss", "outer_backward", "optimizer"},
    "maml": set(profiling.PHASES),
    "metanet": set(profiling.PHASES),
}


def run_profile(algorithm: str, out, *options: str) -> int:
    return main(["profile", "train", algorithm, *TINY, *STEPS, "--out", str(out), *options])


@pytest.mark.parametrize("algorithm", sorted(RAN))
def test_profile_writes_a_trace_with_the_phases_and_fastmeta_ops(tmp_path, capsys, algorithm):
    assert run_profile(algorithm, tmp_path) == 0
    trace = tmp_path / "trace.json"
    assert trace.stat().st_size > 0
    events = json.loads(trace.read_text())["traceEvents"]
    names = {event.get("name", "") for event in events}
    ranges = {profiling.range_name(name) for name in (profiling.STEP, *RAN[algorithm])}
    assert ranges <= names
    steps = [e for e in events if e.get("name") == profiling.range_name(profiling.STEP)]
    assert len(steps) == 2  # the recorded steps only, not the warm-up ones
    assert any(name.startswith(breakdown.FASTMETA_OP_PREFIXES) for name in names)

    report = json.loads((tmp_path / "profile.json").read_text())
    assert list(report["phases"]) == [
        *(p for p in profiling.PHASES if p in RAN[algorithm]),
        breakdown.OTHER,
    ]
    phases = report["phases"].values()
    assert math.isclose(sum(p["ms_per_step"] for p in phases), report["step_ms_mean"])
    assert math.isclose(sum(p["percent"] for p in phases), 100)
    assert all(p["ms_per_step"] >= 0 for p in phases)
    assert report["phases"]["outer_backward"]["ms_per_step"] > 0
    assert len(report["step_ms"]) == 2 and report["unprofiled_step_ms"] > 0
    assert report["fastmeta_ops"] and report["aten_ops"]
    assert all(op["name"].startswith("aten::") for op in report["aten_ops"])
    self_ms = [op["self_ms_per_step"] for op in report["aten_ops"]]
    assert self_ms == sorted(self_ms, reverse=True)
    assert report["trace"] == str(trace) and report["backend"]

    printed = capsys.readouterr().out
    assert f"{algorithm} on synthetic, 5-way 1-shot, 2 tasks, cpu" in printed
    assert "outer_backward" in printed and "ATen ops by self time" in printed


def test_trace_option_sort_by_total_and_top(tmp_path):
    trace = tmp_path / "traces" / "maml.json"
    options = ["--trace", str(trace), "--sort", "total", "--top", "3"]
    assert run_profile("maml", tmp_path / "run", *options) == 0
    assert json.loads(trace.read_text())["traceEvents"]
    report = json.loads((tmp_path / "run" / "profile.json").read_text())
    total_ms = [op["total_ms_per_step"] for op in report["aten_ops"]]
    assert len(total_ms) == 3 and total_ms == sorted(total_ms, reverse=True)


def failing(argv: list[str], capsys) -> str:
    """Exit status 2 and the last line of stderr, which must not be a traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["profile", "train", "reptile"], "invalid choice: 'reptile'"),
        (["profile", "evaluate", "maml"], "invalid choice: 'evaluate'"),
        (["profile"], "the following arguments are required"),
        (["profile", "train", "maml", "--ways", "0"], "--ways: must be an integer >= 1, got 0"),
        (["profile", "train", "maml", "--lr", "nan"], "--lr: must be a finite number > 0"),
        (["profile", "train", "maml", "--profile-steps", "0"], "--profile-steps: must be"),
        (["profile", "train", "maml", "--profile-warmup", "-1"], "--profile-warmup: must be"),
        (["profile", "train", "maml", "--sort", "name"], "--sort: invalid choice: 'name'"),
        (["profile", "train", "maml", *TINY, "--resume"], "--resume: fastmeta profile trains"),
        (["profile", "train", "maml", *TINY, "--nvtx"], "--nvtx: NVTX ranges need a CUDA"),
        (["profile", "train", "maml", *TINY, "--ways", "500"], "exceeds the"),
        (["profile", "train", "maml", *TINY, "--data", "omniglot"], "needs --data-dir"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("FASTMETA_OMNIGLOT", raising=False)
    if argv[1:2] == ["train"]:
        argv = [*argv, "--out", str(tmp_path)]
    assert message in failing(argv, capsys)


def test_phase_is_a_range_only_while_a_profiler_runs():
    assert profiling.phase("loss") is profiling.phase("inner_loop")  # the shared no-op
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with profiling.phase("loss"):
            torch.ones(2).sum()
    assert profiling.range_name("loss") in {e.name for e in prof.events()}
    with pytest.raises(ValueError, match="name must be one of .* got 'backward'"):
        profiling.phase("backward")


def step_spans(thread: int = 1) -> list[Span]:
    """Two steps of 10 ms on `thread`: inner_loop 4 ms holding a loss of 1 ms (nested
    phases count once), outer_backward 3 ms; the rest of each step is other."""
    spans = []
    for start in (0.0, 20_000.0):
        spans += [
            Span("fastmeta.step", thread, start, start + 10_000),
            Span("fastmeta.inner_loop", thread, start + 1_000, start + 5_000),
            Span("fastmeta.loss", thread, start + 2_000, start + 3_000),
            Span("aten::mm", thread, start + 2_500, start + 2_600, kernel_us=200),
            Span("fastmeta.outer_backward", thread, start + 6_000, start + 9_000),
            # the backward's ops on an autograd thread: counted to the open range
            Span("aten::mm", thread + 1, start + 7_000, start + 7_100, kernel_us=500),
            Span("aten::add", thread, start + 9_500, start + 9_600, kernel_us=50),
        ]
    return spans


def test_phase_times_nest_add_up_and_attribute_kernels_by_time():
    times = breakdown.phase_times(step_spans(), steps=2)
    phases = times["phases"]
    assert list(phases) == ["inner_loop", "loss", "outer_backward", "other"]
    ms = {name: p["ms_per_step"] for name, p in phases.items()}
    assert ms == pytest.approx({"inner_loop": 3, "loss": 1, "outer_backward": 3, "other": 3})
    assert phases["loss"]["percent"] == pytest.approx(10)
    device = {name: p["device_ms_per_step"] for name, p in phases.items()}
    assert device == pytest.approx(
        {"inner_loop": 0, "loss": 0.2, "outer_backward": 0.5, "other": 0.05}
    )
    assert times["step_ms"] == [10, 10]


def test_phase_times_without_kernels_report_no_device_time():
    spans = [s for s in step_spans() if not s.kernel_us]
    phases = breakdown.phase_times(spans, steps=2)["phases"]
    assert all("device_ms_per_step" not in p for p in phases.values())


def test_phase_times_need_the_steps_on_one_thread():
    with pytest.raises(ValueError, match="expected 3 fastmeta.step ranges .* found 2 on 1"):
        breakdown.phase_times(step_spans(), steps=3)
    with pytest.raises(ValueError, match="found 4 on 2 thread"):
        breakdown.phase_times(step_spans(1) + step_spans(5), steps=4)
