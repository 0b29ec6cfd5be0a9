"""python -m fastmeta.bench plot STEM.json: the plots of a sweep (fastmeta/bench/sweep.py,
which draws them when it ends) from its JSON, beside it:

  STEM-time.png     median ms of every row (log y)
  STEM-memory.png   peak MiB of every row (log y; a row without a positive peak is left
                    out: on the CPU a small call may add no resident memory)
  STEM-speedup.png  each row's time over the fastmeta row's at the same point (> 1:
                    fastmeta is faster), with a dashed line at 1x

x is the first varied axis (log scale when its values span a factor of WIDE or more),
one line per contender; one panel per value of the second varied axis (more axes: per
combination of the others). matplotlib is optional: draw() raises ImportError, saying
what to install, without it.
"""

import argparse
import itertools
import json
import math
import sys

PANEL_INCHES = (5.0, 3.6)  # width, height of one panel
LEGEND_INCHES = 1.4  # below the panels
PANELS_PER_ROW = 3
DPI = 100
WIDE = 20  # max / min of the values from which an axis is drawn on a log scale

METRICS = {  # file suffix: (y label, value of a result row or None)
    "time": ("median ms", lambda r: r["median_ms"]),
    "memory": ("peak MiB", lambda r: r["peak_mib"] if (r["peak_mib"] or 0) > 0 else None),
    "speedup": (
        "time / fastmeta's (> 1: fastmeta faster)",
        lambda r: None if r["is_fastmeta"] else r["ratio_to_fastmeta"],
    ),
}


def panel_filters(varied: dict[str, list[int]]) -> list[dict[str, int]]:
    """One {axis: value} per panel: each combination of the varied axes after the first."""
    rest = list(varied)[1:]
    return [dict(zip(rest, values)) for values in itertools.product(*(varied[a] for a in rest))]


def figure_inches(panels: int) -> tuple[float, float]:
    columns = min(panels, PANELS_PER_ROW)
    rows = math.ceil(panels / PANELS_PER_ROW)
    return columns * PANEL_INCHES[0], rows * PANEL_INCHES[1] + LEGEND_INCHES


def _wide(values) -> bool:
    values = [v for v in values if v > 0]
    return bool(values) and max(values) / min(values) >= WIDE


def _log_y(ax, FuncFormatter) -> None:
    """A log y axis labelled in plain numbers (0.5, 2, 300); within less than WIDE,
    where a decade may hold no power of ten, the minor ticks are labelled too."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if high / low < WIDE else FuncFormatter(lambda v, _: ""))


def _draw_metric(Figure, FuncFormatter, sweep: dict, metric: str, path: str) -> None:
    label, value = METRICS[metric]
    varied, results = sweep["varied"], sweep["results"]
    x_axis = next(iter(varied))
    filters = panel_filters(varied)
    names = list(dict.fromkeys(r["name"] for r in results))  # first-seen order
    figure = Figure(figsize=figure_inches(len(filters)), dpi=DPI, layout="constrained")
    columns = min(len(filters), PANELS_PER_ROW)
    grid = figure.subplots(math.ceil(len(filters) / columns), columns, squeeze=False)
    plotted = []
    for ax, where in zip(grid.flat, filters):
        rows = [r for r in results if all(r["point"][a] == v for a, v in where.items())]
        for i, name in enumerate(names):
            pairs = sorted(
                (r["point"][x_axis], value(r))
                for r in rows
                if r["name"] == name and value(r) is not None
            )
            if pairs:
                xs, ys = zip(*pairs)
                ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=name)
                plotted += ys
        if metric == "speedup":
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="1x (fastmeta)")
        ax.set_xscale("log" if _wide(varied[x_axis]) else "linear")
        ax.set_xticks(varied[x_axis], [str(v) for v in varied[x_axis]])
        ax.minorticks_off()
        ax.set(xlabel=x_axis, ylabel=label, title=" ".join(f"{a}={v}" for a, v in where.items()))
        ax.grid(True, alpha=0.3)
        if not rows:
            ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center")
    log_y = metric != "speedup" or _wide(plotted + [1.0])
    for ax in grid.flat[: len(filters)]:
        if log_y and plotted:
            _log_y(ax, FuncFormatter)
    for ax in grid.flat[len(filters) :]:
        ax.set_visible(False)
    fixed = " ".join(f"{a}={v}" for a, v in sweep["fixed"].items())
    done = "" if sweep["points_done"] == sweep["points"] else ", cut off"
    figure.suptitle(
        f"{sweep['case']} on {sweep['device']} ({fixed}; "
        f"{sweep['points_done']} of {sweep['points']} points{done}): {label}"
    )
    handles, labels = grid.flat[0].get_legend_handles_labels()
    for ax in grid.flat[1 : len(filters)]:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            if text not in labels:
                handles.append(handle)
                labels.append(text)
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")
    figure.savefig(path)


def draw(sweep: dict, stem: str) -> list[str]:
    """Writes STEM-time.png, STEM-memory.png and STEM-speedup.png; returns their paths."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or state
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise ImportError("the plots need matplotlib (pip install matplotlib)") from None
    paths = []
    for metric in METRICS:
        path = f"{stem}-{metric}.png"
        _draw_metric(Figure, FuncFormatter, sweep, metric, path)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastmeta.bench plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", metavar="STEM.json", help="a sweep's JSON")
    args = parser.parse_args(argv)
    try:
        with open(args.sweep) as f:
            sweep = json.load(f)
        if not {"varied", "results"} <= sweep.keys():
            raise ValueError("not a sweep's JSON (no 'varied' or 'results')")
    except (OSError, ValueError) as error:
        parser.error(f"{args.sweep}: {error}")
    try:
        paths = draw(sweep, args.sweep.removesuffix(".json"))
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"written: {', '.join(paths)}")
    return 0
