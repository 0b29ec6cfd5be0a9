"""python -m fastmeta.bench sweep, plot and compare: argument parsing and bad input, a tiny
ProtoNet sweep with --check (CI's correctness run of the benchmark candidates; timings
are never asserted), results kept when a sweep is cut off, points and rows skipped for
memory, the plots (valid PNGs of the planned size) and compare's arithmetic. On the CPU
also where a GPU is visible: every sweep passes --device cpu."""

import csv
import json
import os
import signal
import struct
import sys
import time

import pytest
import torch

from fastmeta.bench import compare, harness, plots, sweep
from fastmeta.bench.__main__ import main
from fastmeta.bench.harness import Candidate, Sweepable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_png_size(panels: int) -> tuple[int, int]:
    width, height = plots.figure_inches(panels)
    return round(width * plots.DPI), round(height * plots.DPI)


def run_sweep(tmp_path, *options: str) -> int:
    return main(["sweep", "--device", "cpu", "--out", str(tmp_path), "--stem", "s", *options])


def load(tmp_path) -> dict:
    return json.loads((tmp_path / "s.json").read_text())


def csv_rows(tmp_path) -> list[dict]:
    with open(tmp_path / "s.csv", newline="") as f:
        return list(csv.DictReader(f))


def fake_case(wrong: bool = False, footprint: int = 0) -> Sweepable:
    """A case of 1-d tensors: fastmeta's output 2x, the alternative's 2x (or 3x: wrong),
    a floor returning nothing and a row the case skips."""

    def candidates(device, point, memory_limit):
        x = torch.arange(1.0, point["n"] + 1)
        return [
            Candidate("fastmeta[fake]", lambda: (x * 2,), is_fastmeta=True),
            Candidate("alternative", lambda: [x * (3 if wrong else 2)]),
            Candidate("floor", lambda: None, comparable=False),
            harness.skipped("broadcast", "too big for the test"),
        ]

    return Sweepable({"n": 4, "m": 1}, "n values, m unused", candidates, lambda p: footprint)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--case", "nope", "--vary", "ways=5"], "invalid choice: 'nope'"),
        (["--case", "protonet", "--vary", "wayz=5"], "unknown axis 'wayz'"),
        (["--case", "protonet", "--vary", "ways="], "'ways=': empty list of values"),
        (["--case", "protonet", "--vary", "ways=5,x"], "'x' is not an integer"),
        (["--case", "protonet", "--vary", "dim=6.5"], "'6.5' is not an integer"),
        (["--case", "protonet", "--vary", "ways=5,,20"], "'' is not an integer"),
        (["--case", "protonet", "--vary", "ways=0"], "0 is not a positive integer"),
        (["--case", "protonet", "--vary", "ways"], "expected AXIS=V1,V2,..."),
        (["--case", "protonet", "--vary", "ways=5,5"], "5 is given twice"),
        (["--case", "protonet", "--vary", "ways=5", "--vary", "ways=6"], "'ways' is given twice"),
        (["--case", "protonet", "--vary", "ways=5", "--set", "ways=6"], "'ways' is given twice"),
        (["--case", "protonet", "--vary", "ways=5", "--set", "dim=1,2"], "one value"),
        (["--case", "protonet", "--vary", "ways=5", "--repeats", "0"], "--repeats: must be at"),
        (["--case", "inner_update", "--vary", "ways=5"], "(axes: T, P)"),
        (["--case", "protonet"], "the following arguments are required: --vary"),
    ],
)
def test_bad_sweep_arguments_are_named(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        run_sweep(tmp_path, *options)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_points_are_the_product_of_the_varied_values_over_every_axis():
    axes = {"episodes": 1, "ways": 5, "shots": 5, "dim": 64}
    name, values = sweep.parse_axis("ways=5, 20", "--vary", axes)
    assert (name, values) == ("ways", [5, 20])
    grid = sweep.points(axes, {"ways": values, "dim": [64, 512]}, {"shots": 1})
    assert grid == [
        {"episodes": 1, "ways": w, "shots": 1, "dim": d} for w in (5, 20) for d in (64, 512)
    ]
    assert sweep.config_name(grid[1]) == "episodes=1 ways=5 shots=1 dim=512"


def test_tiny_protonet_sweep_checks_every_candidate_and_writes_plots(tmp_path, capsys, monkeypatch):
    # Seconds, not an Inductor build: the compiled row runs eagerly. (Not through
    # torch._dynamo.config.disable: that name is hidden, so monkeypatch's undo deleted
    # it and broke every later torch.compile in the session.)
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    options = ["--case", "protonet", "--vary", "ways=2,3", "--vary", "dim=4,8"]
    options += ["--set", "shots=1", "--set", "queries=2", "--repeats", "1", "--check"]
    assert run_sweep(tmp_path, *options) == 0
    result = load(tmp_path)
    assert result["points"] == result["points_done"] == 4 and not result["interrupted"]
    assert len(result["load_after_point"]) == 4
    assert result["varied"] == {"ways": [2, 3], "dim": [4, 8]}
    assert result["fixed"] == {"episodes": 1, "shots": 1, "queries": 2}
    rows = result["results"]
    points = {json.dumps(r["point"]) for r in rows}
    assert len(points) == 4
    names = {r["name"] for r in rows}
    assert {"fastmeta[cpu]", "euclidean_dist (ProtoNets)", "matmul", "GEMMs only (floor)"} <= names
    for r in rows:
        assert r["median_ms"] > 0 and r["peak_mib"] is not None and r["noise"] == 0.0
        assert r["config"] == sweep.config_name(r["point"])
        if r["name"] == "GEMMs only (floor)":
            assert r["check"] == "exempt"
        else:
            assert r["check"].startswith("ok "), r
    assert sum(r["is_fastmeta"] for r in rows) == 4
    assert all(r["ratio_to_fastmeta"] == 1.0 for r in rows if r["is_fastmeta"])
    written = csv_rows(tmp_path)
    assert len(written) == len(rows)
    assert [json.loads(r["point"]) for r in written] == [r["point"] for r in rows]
    for metric in ("time", "memory", "speedup"):
        assert png_size(tmp_path / f"s-{metric}.png") == expected_png_size(2)  # dim=4, dim=8
    printed = capsys.readouterr()
    assert "[4/4] episodes=1 ways=3 shots=1 queries=2 dim=8: fastmeta[cpu]" in printed.err
    assert "matmul" in printed.out and "check" in printed.out


def test_inner_update_sweep_along_one_axis(tmp_path):
    options = ["--case", "inner_update", "--vary", "P=10,1000", "--set", "T=3"]
    assert run_sweep(tmp_path, *options, "--repeats", "2", "--check", "--no-plots") == 0
    rows = load(tmp_path)["results"]
    assert {r["point"]["P"] for r in rows} == {10, 1000} and {r["point"]["T"] for r in rows} == {3}
    checks = {r["name"]: r["check"] for r in rows}
    assert checks.pop("copy, same bytes (floor)") == "exempt"
    assert {"per-task loop", "torch._foreach", "broadcast (stacked)"} <= set(checks)
    assert all(check.startswith("ok ") for check in checks.values())
    assert not list(tmp_path.glob("*.png"))


def test_check_fails_naming_the_row_that_differs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sweep.SWEEPS, "fake", fake_case(wrong=True))
    assert run_sweep(tmp_path, "--case", "fake", "--vary", "n=3", "--check", "--no-plots") == 1
    err = capsys.readouterr().err
    assert "check failed: fake n=3 m=1 alternative: MISMATCH 5e-01 > 1e-03" in err
    checks = {r["name"]: r["check"] for r in load(tmp_path)["results"]}
    assert checks == {"fastmeta[fake]": "ok 0e+00", "alternative": "MISMATCH 5e-01 > 1e-03"} | {
        "floor": "exempt"
    }


def test_skipped_rows_and_points_are_recorded_not_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sweep.SWEEPS, "fake", fake_case())
    assert run_sweep(tmp_path, "--case", "fake", "--vary", "n=2,3", "--no-plots") == 0
    result = load(tmp_path)
    assert {r["name"] for r in result["results"]} == {"fastmeta[fake]", "alternative", "floor"}
    assert [(s["point"]["n"], s["name"]) for s in result["skipped"]] == [
        (2, "broadcast"),
        (3, "broadcast"),
    ]
    monkeypatch.setitem(sweep.SWEEPS, "fake", fake_case(footprint=1 << 62))
    assert run_sweep(tmp_path, "--case", "fake", "--vary", "n=2", "--no-plots") == 0
    result = load(tmp_path)
    assert result["results"] == [] and result["points_done"] == 1
    (skip,) = result["skipped"]
    assert skip["name"] == "(every row)" and skip["reason"].startswith("needs about 4294967296.0")
    assert "[1/1] n=2 m=1: skipped (needs about" in capsys.readouterr().err


def ctrl_c():
    raise KeyboardInterrupt


def sigterm():  # as timeout(1) sends it (scripts/gpu_check.sh)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this ends


@pytest.mark.parametrize("interrupt", [ctrl_c, sigterm])
def test_an_interrupted_sweep_keeps_its_finished_points_and_plots_them(
    tmp_path, capsys, monkeypatch, interrupt
):
    monkeypatch.setitem(sweep.SWEEPS, "fake", fake_case())
    run_point, calls = sweep.run_point, []

    def interrupted_at_the_second_point(*args):
        calls.append(args)
        if len(calls) == 2:
            interrupt()
        return run_point(*args)

    monkeypatch.setattr(sweep, "run_point", interrupted_at_the_second_point)
    handler = signal.getsignal(signal.SIGTERM)
    assert run_sweep(tmp_path, "--case", "fake", "--vary", "n=2,3,4", "--vary", "m=1,2") == 130
    assert "interrupted after 1 of 6 points" in capsys.readouterr().err
    result = load(tmp_path)
    assert result["interrupted"] and result["points_done"] == 1
    assert {r["config"] for r in result["results"]} == {"n=2 m=1"}
    assert len(csv_rows(tmp_path)) == 3
    assert png_size(tmp_path / "s-time.png") == expected_png_size(2)  # m=1, m=2
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


def test_plot_redraws_a_saved_sweep_and_says_when_matplotlib_is_missing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sweep.SWEEPS, "fake", fake_case())
    options = [
        "--case",
        "fake",
        "--vary",
        "n=1,30",
        "--vary",
        "m=1,2,3,4",
        "--no-plots",
        "--repeats",
        "1",
    ]
    assert run_sweep(tmp_path, *options) == 0
    assert main(["plot", str(tmp_path / "s.json")]) == 0
    for metric in ("time", "memory", "speedup"):
        assert png_size(tmp_path / f"s-{metric}.png") == expected_png_size(4)  # 2 rows of panels
    assert expected_png_size(4)[1] > expected_png_size(3)[1]

    for module in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it fails
    assert main(["plot", str(tmp_path / "s.json")]) == 1
    assert "the plots need matplotlib (pip install matplotlib)" in capsys.readouterr().err
    assert run_sweep(tmp_path, "--case", "fake", "--vary", "n=2") == 0
    assert "plots skipped: the plots need matplotlib" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "s.csv")])
    assert exit_info.value.code == 2


def test_relative_spread_is_the_interquartile_range_over_the_median():
    assert harness.relative_spread([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((4 - 2) / 3)
    assert harness.relative_spread([7.0]) == 0.0


def result_file(path, rows: list[tuple]) -> str:
    """rows: (config, name, median_ms, noise or None)."""
    results = [
        {"case": "c", "config": config, "name": name, "median_ms": ms}
        | ({} if noise is None else {"noise": noise})
        for config, name, ms, noise in rows
    ]
    path.write_text(json.dumps({"command": "made by hand", "results": results}))
    return str(path)


def test_compare_prints_ratios_and_flags_changes_beyond_the_noise(tmp_path, capsys):
    old = result_file(
        tmp_path / "old.json",
        [
            ("p", "slower", 10.0, 0.02),
            ("p", "within noise", 10.0, 0.10),
            ("p", "faster", 10.0, 0.01),
            ("p", "no noise recorded", 10.0, None),
            ("p", "gone", 1.0, 0.0),
        ],
    )
    new = result_file(
        tmp_path / "new.json",
        [
            ("p", "slower", 11.0, 0.03),  # 1.1 - 1 > 0.02 + 0.03
            ("p", "within noise", 11.0, 0.05),  # 0.1 <= 0.15
            ("p", "faster", 8.0, 0.01),  # 10 / 8 - 1 > 0.02
            ("p", "no noise recorded", 20.0, 0.01),
            ("q", "slower", 1.0, 0.0),  # another config: another row
        ],
    )
    assert main(["compare", old, new]) == 0  # timing never fails it
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[2]: line.split() for line in lines if line.startswith("c ")}
    assert table["slower"][3:] == ["10.000", "11.000", "1.100", "5.0", "slower"]
    assert table["within"][5:] == ["11.000", "1.100", "15.0"]
    assert table["faster"][3:] == ["10.000", "8.000", "0.800", "2.0", "faster"]
    assert table["no"][6:] == ["20.000", "2.000", "-"]
    assert "4 rows in both: 1 slower and 1 faster than the noise between repeats" in lines
    assert lines[lines.index("only in OLD (1):") + 1] == "  c | p | gone"
    assert lines[lines.index("only in NEW (1):") + 1] == "  c | q | slower"


def test_compare_arithmetic_and_unreadable_files(tmp_path, capsys):
    row = compare.Comparison(("c", "p", "n"), old_ms=4.0, new_ms=5.0, noise=0.25)
    assert row.ratio == 1.25 and row.flag == ""  # 0.25 is not more than the noise
    assert compare.Comparison(("c", "p", "n"), 4.0, 5.0, 0.2).flag == "slower"
    (tmp_path / "bad.json").write_text('{"rows": []}')
    good = result_file(tmp_path / "good.json", [("p", "n", 1.0, 0.0)])
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", good, str(tmp_path / "bad.json")])
    assert exit_info.value.code == 2
    assert "no 'results' list" in capsys.readouterr().err
    twice = result_file(tmp_path / "twice.json", [("p", "n", 1.0, 0.0), ("p", "n", 2.0, 0.0)])
    with pytest.raises(SystemExit):
        main(["compare", good, twice])
    assert "two rows for c | p | n" in capsys.readouterr().err
