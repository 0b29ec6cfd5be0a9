"""What a run leaves in its out directory: summary.json and curve.png."""

import itertools
import json
import sys
from pathlib import Path


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def plot_curve(path: Path, history: dict) -> Path | None:
    """Training loss (a moving average) and validation accuracy against the step, as
    a PNG; None, with a one-line note on stderr, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print(
            f"{path.name} skipped: matplotlib is not installed (pip install matplotlib)",
            file=sys.stderr,
        )
        return None
    steps, loss = history["step"], history["loss"]
    window = max(1, len(loss) // 50)
    sums = [0.0, *itertools.accumulate(loss)]
    smooth = [
        (sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(loss))
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, smooth)
    left.set(
        xlabel="step",
        ylabel="training loss",
        yscale="log",
        title=f"training loss, moving average of {window} steps",
    )
    val = history["val"]
    right.errorbar(
        [v["step"] for v in val],
        [100 * v["mean"] for v in val],
        yerr=[100 * v["ci95"] for v in val],
        marker="o",
        capsize=3,
    )
    right.set(xlabel="step", ylabel="accuracy (%)", title="validation accuracy, 95% CI")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
