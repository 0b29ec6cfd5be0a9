"""Benchmarks: fastmeta's backends against the alternatives users write today,
timed side by side in one process. Run `python -m fastmeta.bench --help`."""
