"""The training CLI, `fastmeta train ALGORITHM ...` / `fastmeta eval ...` (also
`python -m fastmeta`), and `python -m fastmeta.cli.demo` behind `make demo`.

main.py parses arguments and turns bad input into one-line errors; data.py builds
the class-split data; algorithms.py is the registry of trainable algorithms;
train.py the loop; evaluate.py accuracy with 95% intervals; checkpoint.py saving and
resuming; progress.py the progress line; report.py summary.json and curve.png.
"""

from fastmeta.cli.main import main

__all__ = ["main"]
