"""The training CLI, `fastmeta train ALGORITHM ...` / `fastmeta eval ...` /
`fastmeta profile train ALGORITHM ...` (also `python -m fastmeta`), and
`python -m fastmeta.cli.demo` behind `make demo`.

main.py parses arguments and turns bad input into one-line errors; data.py builds
the class-split data; algorithms.py is the registry of trainable algorithms;
train.py the step and the loop; evaluate.py accuracy with 95% intervals; checkpoint.py
saving and resuming; progress.py the progress line; report.py summary.json and
curve.png; profile.py runs steps under torch.profiler and breakdown.py reports where
their time goes.
"""

from fastmeta.cli.main import main

__all__ = ["main"]
