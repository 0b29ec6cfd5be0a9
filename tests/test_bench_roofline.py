"""python -m fastmeta.bench roofline: the work formulas on hand-counted sizes, the bound
arithmetic on hand-made numbers, and a quick CPU run that covers every registered op
(timings are not asserted)."""

import csv
import json
import math
import sys

import pytest

from fastmeta import backend
from fastmeta.bench.__main__ import main
from fastmeta.bench.roofline import Ceilings, make_row, roofline_bound
from fastmeta.bench.roofline_ops import (
    Cost,
    OpWork,
    bn_relu_pool_cost,
    class_prototypes_cost,
    conv_block_cost,
    gradient_lstm_cost,
    inner_update_cost,
    squared_distances_cost,
)
from fastmeta.bench.roofline_plot import plot_roofline
from fastmeta.ops.prototypical_cross_entropy import DISTANCES


def test_squared_distances_work_counted_by_hand():
    # q [2, 3, 5], c [2, 4, 5] -> d [2, 3, 4]: 30 + 40 + 24 floats.
    # FLOPs: GEMM 2*2*3*4*5 = 240, norms 2 * (30 + 40) = 140, epilogue 3 * 24 = 72.
    forward, backward = squared_distances_cost(B=2, M=3, C=4, D=5)
    assert forward == Cost(bytes=4 * (30 + 40 + 24), flops=240 + 140 + 72)
    # reads gd, q, c; writes d_q, d_c. Two GEMMs 480, 3 per q/c element 210, sums 48.
    assert backward == Cost(bytes=4 * (24 + 2 * 30 + 2 * 40), flops=480 + 210 + 48)


def test_class_prototypes_and_inner_update_work_counted_by_hand():
    # support [2, 6, 4] (48 floats), labels [2, 6] int64 (12 x 8 bytes), prototypes [2, 3, 4]
    forward, backward = class_prototypes_cost(B=2, S=6, C=3, D=4)
    assert forward == Cost(bytes=4 * 48 + 8 * 12 + 4 * 24, flops=48 + 24)
    assert backward == Cost(bytes=4 * 24 + 8 * 12 + 4 * 48, flops=48)
    # theta [10], alpha [], g [3, 10] -> out [3, 10]; backward go -> d_theta, d_g
    forward, backward = inner_update_cost(T=3, P=10)
    assert forward == Cost(bytes=4 * (10 + 1 + 30 + 30), flops=60)
    assert backward == Cost(bytes=4 * (30 + 1 + 10 + 30), flops=60)


def test_gradient_lstm_work_counted_by_hand():
    # grads [2, 3, 1] (B = 2 episodes, N = 3 examples, P = 1) -> out [2, 1]; H = 1:
    # w_ih [4, 2], w_hh [4, 1], b [4], w_out [1], b_out []: 18 floats.
    # A step per coordinate: products 8 + 16, bias 4, 5 activations x 3, cell and
    # hidden 4, preprocessing 5 = 52; its backward 16 + 53 + 5 = 74; the output 2.
    forward, backward = gradient_lstm_cost(n=2, N=3, H=1)
    assert forward == Cost(bytes=4 * (6 + 2 + 18), flops=2 * (3 * 52 + 2))
    # reads grad_out, grads, the weights; writes d_grads and the weights' gradients;
    # recomputes the forward (it keeps no state)
    assert backward == Cost(bytes=4 * (2 + 6 + 6 + 2 * 18), flops=2 * (3 * (52 + 74) + 2))


def test_conv_block_and_bn_relu_pool_work_counted_by_hand():
    # x [2, 1, 4, 4] (32), weight [3, 1, 3, 3] (27), padding 1: c [2, 3, 4, 4] (96, never
    # stored), pooled [2, 3, 2, 2]: out and c_max 24 floats each, 24 uint8 windows.
    # Patch moments: 2*4*4 positions x 9 taps x (9 + 2) = 3168 FLOPs.
    forward, backward = conv_block_cost((2, 1, 4, 4), (3, 1, 3, 3), (1, 1))
    assert forward == Cost(bytes=4 * (32 + 27 + 2 * 24 + 5 * 3) + 24, flops=96 * 23 + 3168)
    assert backward == Cost(bytes=4 * (32 + 2 * 27 + 2 * 24 + 8 * 3) + 24, flops=24 * 25 + 3168)
    # c [2, 3, 4, 4]: 96 floats; pooled [2, 3, 2, 2]: 24 floats and 24 uint8 windows
    forward, backward = bn_relu_pool_cost((2, 3, 4, 4))
    assert forward == Cost(bytes=4 * (96 + 3 + 3 + 24 + 3 + 3) + 24, flops=7 * 96)
    # reads grad_out, c, gamma, beta, mean, rstd, windows; writes d_c, d_gamma, d_beta
    # FLOPs: d_c = a + b c on every element (2), the sums and k dy at the 24 maxima (10)
    assert backward == Cost(bytes=4 * (24 + 96 + 4 * 3 + 96 + 2 * 3) + 24, flops=2 * 96 + 240)


CEILINGS = Ceilings(
    copy_gbps=10.0, gemm_gflops=100.0, copy_mib=1.0, gemm_n=1, float32_matmul_precision="highest"
)


def _work(forward: Cost) -> OpWork:
    return OpWork("inner_update", "", "T=1 P=1", (), lambda out: (), forward, forward)


def test_bound_is_the_lower_ceiling_at_the_intensity():
    assert CEILINGS.ridge == 10.0
    assert roofline_bound(2.0, CEILINGS) == (20.0, "memory")
    assert roofline_bound(50.0, CEILINGS) == (100.0, "compute")
    assert roofline_bound(10.0, CEILINGS) == (100.0, "compute")  # the ridge itself


def test_percent_of_roofline_memory_bound_compute_bound_and_no_flops():
    # 1 MB, 2 MFLOP in 1 ms: 1 GB/s, 2 GFLOP/s at 2 FLOP/B, bound 20: 10 % (= 1 / 10 GB/s)
    row = make_row(_work(Cost(10**6, 2 * 10**6)), "forward", "cpu", "cpu", 1.0, CEILINGS)
    assert (row.gbps, row.gflops, row.intensity) == (1.0, 2.0, 2.0)
    assert (row.bound, row.bound_gflops, row.pct_of_roofline) == ("memory", 20.0, 10.0)
    # 50 MFLOP on the same bytes in 1 ms: 50 GFLOP/s under the 100 GFLOP/s GEMM: 50 %
    row = make_row(_work(Cost(10**6, 50 * 10**6)), "backward", "cpu", "cpu", 1.0, CEILINGS)
    assert (row.bound, row.bound_gflops, row.pct_of_roofline) == ("compute", 100.0, 50.0)
    # no FLOPs: 1 MB in 0.5 ms is 2 GB/s of the copy's 10: 20 %
    row = make_row(_work(Cost(10**6, 0)), "forward", "cpu", "cpu", 0.5, CEILINGS)
    assert (row.bound, row.gbps, row.pct_of_roofline) == ("memory", 2.0, 20.0)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline")
    argv = ["roofline", "--device", "cpu", "--quick", "--repeats", "1", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_quick_run_writes_csv_json_and_png(quick_run):
    with open(quick_run / "roofline-cpu-quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows
    for r in rows:
        assert float(r["median_ms"]) > 0 and int(r["bytes"]) > 0 and int(r["flops"]) > 0
        expected = 100 * float(r["gflops"]) / float(r["bound_gflops"])
        assert math.isclose(float(r["pct_of_roofline"]), expected, rel_tol=1e-9)
    meta = json.loads((quick_run / "roofline-cpu-quick.json").read_text())
    assert meta["command"].startswith("python -m fastmeta.bench roofline --device cpu")
    assert meta["machine"]["torch"] and len(meta["results"]) == len(rows)
    assert meta["ceilings"]["copy_gbps"] > 0 and meta["ceilings"]["gemm_gflops"] > 0
    png = (quick_run / "roofline-cpu-quick.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_quick_run_covers_every_registered_op_both_directions_every_cpu_backend(quick_run):
    with open(quick_run / "roofline-cpu-quick.csv") as f:
        seen = {(r["op"], r["direction"], r["backend"]) for r in csv.DictReader(f)}
    ops = {op.split("[")[0] for op, _, _ in seen}
    assert ops == set(backend.ops()), "an op without a roofline entry (roofline_ops.WORK)"
    for op in backend.ops():
        labels = [f"{op}[{d}]" for d in DISTANCES] if op == "prototypical_cross_entropy" else [op]
        for label in labels:
            for name in ("cpu", "reference"):
                assert (label, "forward", name) in seen
            backwards = {b for o, d, b in seen if o == label and d == "backward"}
            assert backwards in ({"cpu", "reference"}, {"torch"}), (label, backwards)


def test_bad_arguments_are_argparse_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["roofline", "--repeats", "0", "--out", str(tmp_path)])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err


def test_plot_without_matplotlib_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    path = str(tmp_path / "r.png")
    assert plot_roofline(path, [], CEILINGS, "t") is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()
