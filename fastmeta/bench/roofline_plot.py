"""The roofline plot of `python -m fastmeta.bench roofline`, as a PNG (matplotlib,
imported when called: optional).

Log-log: x = arithmetic intensity (FLOP/byte), y = achieved GFLOP/s. The roofline is
min(GEMM GFLOP/s, intensity x copy GB/s), both measured in the run. One marker per
op, direction and backend: the colour is the op, a circle the forward, a triangle the
backward; fastmeta's kernels filled and labelled, the plain-PyTorch reference hollow.
"""

import sys


def _short(row) -> str:
    """e.g. "squared_distances bwd" for the label next to a marker."""
    direction = "fwd" if row.direction == "forward" else "bwd"
    name = row.op.replace("prototypical_cross_entropy", "proto_ce").replace("squared_", "sq")
    return f"{name} {direction}" + (f" ({row.backend})" if row.device == "cuda" else "")


def plot_roofline(path: str, rows: list, ceilings, title: str) -> str | None:
    """Writes the plot of `rows` (RooflineRow) under `ceilings` to path; None, with a
    one-line note on stderr, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print(
            f"{path} skipped: matplotlib is not installed (pip install matplotlib)",
            file=sys.stderr,
        )
        return None
    intensities = [r.intensity for r in rows] + [ceilings.ridge]
    low, high = min(intensities) / 3, max(intensities) * 3
    xs = [low * (high / low) ** (i / 200) for i in range(201)]
    figure, axes = plt.subplots(figsize=(11, 7.5))
    axes.plot(
        xs,
        [min(ceilings.gemm_gflops, x * ceilings.copy_gbps) for x in xs],
        color="black",
        linewidth=2,
        label=f"roofline: copy {ceilings.copy_gbps:.1f} GB/s, "
        f"GEMM {ceilings.gemm_gflops:.0f} GFLOP/s",
    )
    ops = sorted({r.op for r in rows})
    colors = plt.get_cmap("tab20")
    for r in rows:
        i = ops.index(r.op)  # tab20's dark shades first, then its light ones
        color = colors((2 * i + i // 10) % 20)
        kernel = r.backend != "reference"
        axes.scatter(
            r.intensity,
            r.gflops,
            marker="o" if r.direction == "forward" else "^",
            s=45,
            facecolors=color if kernel else "none",
            edgecolors=color,
            label=r.op if kernel and r.direction == "forward" else None,
        )
        if kernel:
            axes.annotate(
                _short(r),
                (r.intensity, r.gflops),
                fontsize=6.5,
                xytext=(4, 3),
                textcoords="offset points",
            )
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="arithmetic intensity (FLOP/byte, from the bytes and FLOPs each op must do)",
        ylabel="achieved GFLOP/s",
        title=f"{title}\nfilled: fastmeta's kernels (circle forward, triangle backward); "
        f"hollow: plain-PyTorch reference",
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
