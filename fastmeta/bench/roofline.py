"""python -m fastmeta.bench roofline [--device cpu|cuda] [--quick] [--repeats N] [--out DIR]

How close every fastmeta op is to its floor. Each registered op (one representative
size, fastmeta/bench/roofline_ops.py; prototypical_cross_entropy once per distance),
forward and backward, on every backend that runs on the device (cpu and reference; on
CUDA cuda, triton and reference; the Triton interpreter is not timed), calling the
backend's kernel directly (no dispatch, no argument checks; the backward with the
forward's saved outputs). From the bytes each direction must move and the FLOPs it
must do: achieved GB/s and GFLOP/s, arithmetic intensity (FLOP/byte), and against
the machine's two ceilings, measured in the same run:
  copy   a float32 copy_ far beyond the last-level cache: (read + written bytes) / time
  GEMM   a float32 matmul n x n x n: 2 n^3 / time (CUDA: under torch's float32 matmul
         precision, recorded: "highest" keeps TF32 off)
the roofline bound at the op's intensity, min(GEMM GFLOP/s, intensity x copy GB/s),
which ceiling that is (memory or compute), and "% of roofline": achieved GFLOP/s over
the bound (for a memory-bound row the same as achieved GB/s over copy GB/s). Every
time is a median (harness.time_candidates: CPU rounds interleaved; CUDA
triton.testing.do_bench). The copy and the GEMM are timed with every op's rows (on
CPU interleaved with them: on a shared machine the load moves both alike); each row
is measured against its op's ceilings, and the run's ceilings are their medians.

Prints the table; writes STEM.csv, STEM.json (rows, the run's ceilings, machine,
command) and STEM.png (the roofline plot, under the run's ceilings) to --out.
"""

import argparse
import dataclasses
import statistics
import sys

import torch

from fastmeta import backend
from fastmeta.bench import harness, roofline_ops, roofline_plot
from fastmeta.bench.harness import Candidate
from fastmeta.bench.roofline_ops import Cost, OpWork

COPY_ELEMENTS = {"cpu": 16 << 20, "cuda": 256 << 20, "quick": 1 << 20}  # float32: 64 MiB, 1 GiB
GEMM_SIZE = {"cpu": 1536, "cuda": 8192, "quick": 256}


@dataclasses.dataclass
class Ceilings:
    copy_gbps: float  # (read + written bytes) / time of a large copy_
    gemm_gflops: float  # 2 n^3 / time of a float32 n x n matmul
    copy_mib: float  # the copied tensor's size
    gemm_n: int
    float32_matmul_precision: str  # torch's setting ("highest": no TF32 on CUDA)

    @property
    def ridge(self) -> float:
        """The intensity (FLOP/byte) where the two ceilings meet."""
        return self.gemm_gflops / self.copy_gbps


@dataclasses.dataclass
class RooflineRow:
    op: str  # e.g. "prototypical_cross_entropy[cosine]"
    direction: str  # forward | backward
    backend: str  # the backend whose kernel ran; "torch": a backward of plain torch ops
    device: str
    sizes: str
    median_ms: float
    bytes: int  # fewest bytes the direction must move
    flops: int  # FLOPs it must do
    gbps: float
    gflops: float
    intensity: float  # FLOP/byte
    bound_gflops: float  # the roofline at that intensity
    bound: str  # memory | compute
    pct_of_roofline: float
    copy_gbps: float  # the ceilings the row is measured against (timed with its op)
    gemm_gflops: float


def roofline_bound(intensity: float, ceilings: Ceilings) -> tuple[float, str]:
    """(min(peak GFLOP/s, intensity x copy GB/s), "memory" or "compute": which it is)."""
    memory = intensity * ceilings.copy_gbps
    return (
        (memory, "memory") if memory < ceilings.gemm_gflops else (ceilings.gemm_gflops, "compute")
    )


def make_row(
    work: OpWork, direction: str, backend_name: str, device: str, ms: float, ceilings: Ceilings
) -> RooflineRow:
    cost: Cost = work.forward_cost if direction == "forward" else work.backward_cost
    gbps, gflops = cost.bytes / ms / 1e6, cost.flops / ms / 1e6
    intensity = cost.flops / cost.bytes
    bound_gflops, bound = roofline_bound(intensity, ceilings)
    # With no FLOPs the roofline is the copy: achieved GB/s over copy GB/s (for any
    # memory-bound row the same number as achieved GFLOP/s over the bound).
    pct = 100 * (gflops / bound_gflops if cost.flops else gbps / ceilings.copy_gbps)
    return RooflineRow(
        op=work.label,
        direction=direction,
        backend=backend_name,
        device=device,
        sizes=work.sizes,
        median_ms=ms,
        bytes=cost.bytes,
        flops=cost.flops,
        gbps=gbps,
        gflops=gflops,
        intensity=intensity,
        bound_gflops=bound_gflops,
        bound=bound,
        pct_of_roofline=pct,
        copy_gbps=ceilings.copy_gbps,
        gemm_gflops=ceilings.gemm_gflops,
    )


class CeilingProbes:
    """The copy and the GEMM as timing candidates, timed with every op's rows (CPU:
    interleaved with them), so that a load that changes during the run moves the op
    and its ceilings alike."""

    def __init__(self, device: str, quick: bool):
        size = "quick" if quick else device
        self.src = torch.empty(COPY_ELEMENTS[size], device=device).normal_()
        dst = torch.empty_like(self.src)
        self.n = n = GEMM_SIZE[size]
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        self.candidates = [
            Candidate("ceiling: copy", lambda: dst.copy_(self.src)),
            Candidate("ceiling: GEMM", lambda: torch.mm(a, b, out=out)),
        ]

    def ceilings(self, times: dict[str, float]) -> Ceilings:
        """The ceilings from the candidates' median ms."""
        return Ceilings(
            copy_gbps=2 * self.src.nbytes / times["ceiling: copy"] / 1e6,
            gemm_gflops=2 * self.n**3 / times["ceiling: GEMM"] / 1e6,
            copy_mib=self.src.nbytes / 2**20,
            gemm_n=self.n,
            float32_matmul_precision=torch.get_float32_matmul_precision(),
        )


def backends_for(work: OpWork, device: str) -> list[str]:
    """The op's backends that run on `device` here, in fastmeta's preference order."""
    return [
        b
        for b in backend.DEFAULT_PREFERENCE[device]
        if b in work.declaration.backends
        and backend.op_unavailable_reason(work.op, b, device, torch.float32) is None
    ]


def candidates(work: OpWork, device: str) -> list[tuple[str, str, Candidate]]:
    """(direction, backend, candidate) for each direction on each backend. The backward
    gets the outputs of the same backend's forward (computed here, once)."""
    rows = []
    torch_backward_args = None
    for name in backends_for(work, device):
        forward = work.declaration.forward.function(name)
        backward_args = work.backward_args(forward(*work.forward_args))
        if torch_backward_args is None:
            torch_backward_args = backward_args
        rows.append(
            ("forward", name, Candidate(f"{name} forward", _call(forward, work.forward_args)))
        )
        if work.torch_backward is None:
            backward = work.declaration.backward.function(name)
            rows.append(
                ("backward", name, Candidate(f"{name} backward", _call(backward, backward_args)))
            )
    if work.torch_backward is not None:
        call = _call(work.torch_backward, torch_backward_args)
        rows.append(("backward", "torch", Candidate("torch backward", call)))
    return rows


def _call(fn, args):
    return lambda: fn(*args)


def run(device: str, quick: bool = False, **timing) -> tuple[list[RooflineRow], Ceilings]:
    """Every op's rows, each against the ceilings timed with its op; and the run's
    ceilings (the medians over the ops' groups)."""
    probes = CeilingProbes(device, quick)
    rows, groups = [], []
    with torch.no_grad():
        for build in roofline_ops.WORK:
            work = build(device, quick)
            timed = candidates(work, device)
            group = probes.candidates + [c for _, _, c in timed]
            samples = harness.time_candidates(group, device, **timing)
            times = {name: statistics.median(ts) for name, ts in samples.items()}
            ceilings = probes.ceilings(times)
            rows += [make_row(work, d, b, device, times[c.name], ceilings) for d, b, c in timed]
            groups.append(ceilings)
            del work, timed
    return rows, dataclasses.replace(
        groups[0],
        copy_gbps=statistics.median(c.copy_gbps for c in groups),
        gemm_gflops=statistics.median(c.gemm_gflops for c in groups),
    )


def describe_ceilings(ceilings: Ceilings) -> str:
    return (
        f"ceilings: copy {ceilings.copy_gbps:.1f} GB/s ({ceilings.copy_mib:.0f} MiB copy_), "
        f"GEMM {ceilings.gemm_gflops:.1f} GFLOP/s (float32 {ceilings.gemm_n}^3, matmul "
        f"precision {ceilings.float32_matmul_precision}); ridge {ceilings.ridge:.1f} FLOP/byte"
    )


def format_table(rows: list[RooflineRow]) -> str:
    lines = [
        f"{'op':<45} {'direction':<9} {'backend':<9} {'median ms':>10} {'GB/s':>8} "
        f"{'GFLOP/s':>8} {'FLOP/B':>7} {'bound':>8} {'% roofline':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r.op:<45} {r.direction:<9} {r.backend:<9} {r.median_ms:10.3f} {r.gbps:8.1f} "
            f"{r.gflops:8.1f} {r.intensity:7.2f} {r.bound:>8} {r.pct_of_roofline:10.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastmeta.bench roofline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke runs)")
    parser.add_argument("--repeats", type=int, default=9, help="CPU timing rounds")
    parser.add_argument(
        "--out", default="benchmarks/results/local", help="directory (default: %(default)s)"
    )
    parser.add_argument("--stem", help="file name stem (default: roofline-DEVICE[-quick])")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    machine = harness.machine_description(args.device)
    command = "python -m fastmeta.bench roofline " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    timing = {} if args.device == "cuda" else {"repeats": args.repeats}
    rows, ceilings = run(args.device, args.quick, **timing)
    stem = args.stem or f"roofline-{args.device}" + ("-quick" if args.quick else "")
    extra = {"machine": machine, "command": command, "ceilings": dataclasses.asdict(ceilings)}
    load = harness.load_average()
    if load is not None:  # the machine records it at the start
        extra["load_1_5_15_min_at_end"] = load
    paths = harness.write_results(rows, args.out, stem, extra, row_type=RooflineRow)
    where = machine.get("gpu", f"{machine['cpu']}, {machine['threads']} threads")
    title = f"fastmeta roofline, {args.device} ({where}), {machine['date'][:10]}"
    png = roofline_plot.plot_roofline(f"{args.out}/{stem}.png", rows, ceilings, title)
    print(f"machine: {machine}")
    print(describe_ceilings(ceilings))
    print("sizes: " + "; ".join(sorted({f"{r.op.split('[')[0]} {r.sizes}" for r in rows})))
    print(f"written: {', '.join(paths + ([png] if png else []))}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
