"""scripts/gpu_summary.py, the summary table of scripts/gpu_check.sh, on a tiny work folder
(the check itself is rehearsed on CPU by `scripts/gpu_check.sh --rehearse` in CI)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_summary.py"
spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPT)
gpu_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_summary)

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
  <testcase classname="tests.test_protonet" name="test_forward[cuda-cuda]" time="0.1"/>
  <testcase classname="tests.test_protonet" name="test_forward[triton-cuda]" time="0.2"/>
  <testcase classname="tests.test_protonet" name="test_backward[triton-cuda]" time="0.3">
    <failure message="AssertionError: rel_err 0.5 &gt; 1e-5&#10;second line">trace</failure>
  </testcase>
  <testcase classname="tests.test_protonet" name="test_big[cuda-cuda]" time="0.0">
    <error message="RuntimeError: CUDA error: an illegal memory access">trace</error>
  </testcase>
  <testcase classname="tests.test_protonet" name="test_half[cuda-cuda]" time="0.0">
    <skipped type="pytest.skip" message="no half kernel">skip</skipped>
  </testcase>
</testsuite></testsuites>
"""

BENCH = """case,config,name,device,median_ms,ratio_to_fastmeta,gbps,peak_mib
inner_update,T=32 P=12M,per-task loop,cuda,4.0,2.0,200.0,1536.0
inner_update,T=32 P=12M,fastmeta[cuda],cuda,2.0,1.0,400.0,1536.0
inner_update,T=32 P=12M,fastmeta[triton],cuda,2.5,1.25,320.0,
"""


def rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table under `heading` (header and rule dropped)."""
    table = text.split(heading, 1)[1].split("\n\n")[1].splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table]


def test_summary_counts_tests_lists_failures_and_puts_fastmeta_first(tmp_path):
    (tmp_path / "machine.log").write_text("NVIDIA H200, 570.00, 143771 MiB, 9.0\n")
    (tmp_path / "steps.tsv").write_text(
        "build\tok\t95\t240\n"
        "test_protonet\tFAILED (exit 1)\t40\t150\n"
        "bench-maml\tTIMEOUT\t150\t150\n"
    )
    (tmp_path / "test_protonet.xml").write_text(JUNIT)
    (tmp_path / "test_race.xml").write_text(JUNIT.split("<testcase", 1)[0] + "<testcase")  # cut off
    (tmp_path / "bench-inner_update.csv").write_text(BENCH)

    text = gpu_summary.summary(tmp_path)

    assert "NVIDIA H200, 570.00" in text
    assert rows(text, "## Steps") == [
        ["build", "ok", "95", "240"],
        ["test_protonet", "FAILED (exit 1)", "40", "150"],
        ["bench-maml", "TIMEOUT", "150", "150"],
    ]
    tests = rows(text, "## Tests")
    assert tests[0] == ["test_protonet", "2", "1", "1", "1"]  # passed, failed, errors, skipped
    assert tests[1][0] == "test_race" and tests[1][1].startswith("unreadable JUnit XML")
    assert tests[2] == ["**total**", "**2**", "**1**", "**1**", "**1**"]
    assert (
        "- tests.test_protonet::test_backward[triton-cuda]: AssertionError: rel_err 0.5 > 1e-5"
        in text.splitlines()
    )
    assert (
        "- tests.test_protonet::test_big[cuda-cuda]: RuntimeError: CUDA error: an illegal "
        "memory access" in text.splitlines()
    )
    assert rows(text, "## Benchmarks") == [
        ["inner_update", "T=32 P=12M", "fastmeta[cuda]", "2.000", "1.00", "400.0", "1536.0"],
        ["inner_update", "T=32 P=12M", "per-task loop", "4.000", "2.00", "200.0", "1536.0"],
        ["inner_update", "T=32 P=12M", "fastmeta[triton]", "2.500", "1.25", "320.0", "-"],
    ]


def test_summary_of_a_run_cut_off_before_any_step_ended(tmp_path):
    text = gpu_summary.summary(tmp_path)
    assert rows(text, "## Steps") == []
    assert rows(text, "## Tests") == [["**total**", "**0**", "**0**", "**0**", "**0**"]]
    assert rows(text, "## Benchmarks") == []
