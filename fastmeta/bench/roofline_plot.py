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


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_labels(axes, points: list[tuple[float, float, str]]) -> None:
    """Labels (x, y, text) right of their markers, from the top down; one that would
    overlap a label placed before it moves down or up (with a leader line) until it
    does not. Boxes are estimated in pixels (the axes' limits and position are final)."""
    to_pixels = axes.transData.transform
    scale = axes.figure.dpi / 72  # pixels per point
    placed: list[tuple] = []
    shifts = [0] + [s for k in range(1, 15) for s in (-k, k)]
    for x, y, text in sorted(points, key=lambda p: -p[1]):
        px, py = to_pixels((x, y))
        width, height = len(text) * 3.6 * scale, 8 * scale  # 6.5 pt text
        for shift in shifts:
            dy = 3 + 9 * shift  # points
            box = (
                px + 4 * scale,
                py + dy * scale,
                px + 4 * scale + width,
                py + dy * scale + height,
            )
            if not any(_overlaps(box, other) for other in placed):
                break
        placed.append(box)
        axes.annotate(
            text,
            (x, y),
            xytext=(4, dy),
            textcoords="offset points",
            fontsize=6.5,
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if shift else None,
        )


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
    gflops = [r.gflops for r in rows] + [ceilings.gemm_gflops]
    figure, axes = plt.subplots(figsize=(13, 7.5))
    figure.subplots_adjust(left=0.07, right=0.74, top=0.9, bottom=0.08)
    axes.set(
        xscale="log",
        yscale="log",
        xlim=(low, high),
        ylim=(min(gflops) / 2, max(gflops) * 2),
        xlabel="arithmetic intensity (FLOP/byte, from the bytes and FLOPs each op must do)",
        ylabel="achieved GFLOP/s",
        title=f"{title}\nfilled: fastmeta's kernels (circle forward, triangle backward); "
        f"hollow: plain-PyTorch reference",
    )
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
    _place_labels(
        axes, [(r.intensity, r.gflops, _short(r)) for r in rows if r.backend != "reference"]
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
