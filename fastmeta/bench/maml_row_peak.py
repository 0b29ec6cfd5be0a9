"""One row of the MAML benchmark, its first call's peak memory measured in a process of
its own (CPU).

On the CPU the harness's peak is the resident set's high-water mark, and a process that
has run other rows first carries their heap (glibc's arenas and mmap threshold, moved by
the GiB-sized rows) into the next row's number: ~10% at a ~200 MiB row. So
fastmeta/bench/maml.py measures each row here instead, every row under the same
conditions: a fresh process, the model and tasks of the config, one call of the loop on
one task (the process warm-up every row had), torch._dynamo imported, then the row's
first call. (torch imports torch._dynamo on the first call of any torch.library custom
op, ~150 MiB of code and tables that every later call shares: that is the process's
cost of custom ops, not the row's, and left in it would be charged to whichever row
calls one first.)

    python -m fastmeta.bench.maml_row_peak ROW T K Q STEPS FIRST_ORDER MAX_MEMORY_MIB

prints the peak in MiB (one number) on its last line.
"""

import importlib
import sys
import warnings

from fastmeta.bench.harness import peak_memory_mib


def main(argv: list[str]) -> None:
    from fastmeta.bench.maml import _builders, warmed_up

    name, T, K, Q, steps, first_order, mib = argv
    T, K, Q, steps, mib = int(T), int(K), int(Q), int(steps), int(mib)
    builders = _builders(steps, first_order == "1", mib)
    model, data = warmed_up("cpu", T, K, Q, builders)
    importlib.import_module("torch._dynamo")  # see the docstring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # higher uses deprecated torch APIs
        print(peak_memory_mib(builders[name](model, data), "cpu"))


if __name__ == "__main__":
    main(sys.argv[1:])
