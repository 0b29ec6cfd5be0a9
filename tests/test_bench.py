"""The benchmark entry point runs end to end (a smoke run; timings are not asserted)."""

import csv
import json

from fastmeta.bench.__main__ import main


def test_quick_benchmark_writes_table_csv_and_json(tmp_path, capsys):
    assert main(["--quick", "--repeats", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "per-task loop" in printed and "torch._foreach" in printed
    with open(tmp_path / "bench-cpu-quick.csv") as f:
        rows = list(csv.DictReader(f))
    names = {r["name"] for r in rows}
    assert {"fastmeta[cpu]", "fastmeta[reference]", "per-task loop", "torch._foreach"} <= names
    for row in rows:
        assert float(row["median_ms"]) > 0
        if row["name"] == "fastmeta[cpu]":
            assert float(row["ratio_to_fastmeta"]) == 1.0
    meta = json.loads((tmp_path / "bench-cpu-quick.json").read_text())
    assert meta["command"].startswith("python -m fastmeta.bench") and meta["machine"]["torch"]
