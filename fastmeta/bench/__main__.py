"""python -m fastmeta.bench [--case NAME] [--device cpu|cuda] [--quick] [--out DIR]

Prints one table (median ms, ratio to fastmeta, GB/s, peak MiB, noise between repeats)
and writes CSV and JSON with the machine, date and command to --out.

Subcommands (each with its own -h):
  python -m fastmeta.bench sweep --case CASE --vary AXIS=V1,V2,...   times over sizes
  python -m fastmeta.bench plot STEM.json                            redraws its plots
  python -m fastmeta.bench compare OLD.json NEW.json                 ratios per row
  python -m fastmeta.bench roofline [--device D] [--quick]          every op against the
                                                                    machine's ceilings
"""

import argparse
import sys

import torch

import fastmeta
from fastmeta.bench import (
    compare,
    conv_block,
    harness,
    inner_update,
    maml,
    maml_bounded,
    metanet,
    metanet_lstm,
    overhead,
    plots,
    protonet,
    roofline,
    sweep,
)

CASES = {
    conv_block.CASE: conv_block.run,
    inner_update.CASE: inner_update.run,
    maml.CASE: maml.run,
    maml_bounded.CASE: maml_bounded.run,
    metanet.CASE: metanet.run,
    metanet_lstm.CASE: metanet_lstm.run,
    overhead.CASE: overhead.run,
    protonet.CASE: protonet.run,
}

SUBCOMMANDS = {
    "sweep": sweep.main,
    "plot": plots.main,
    "compare": compare.main,
    "roofline": roofline.main,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m fastmeta.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--case",
        choices=sorted(CASES),
        action="append",
        help="benchmark case (repeatable; default: all)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke runs)")
    parser.add_argument("--repeats", type=int, default=9, help="CPU timing rounds")
    parser.add_argument(
        "--out",
        default="benchmarks/results/local",
        help="directory for CSV/JSON (default: %(default)s)",
    )
    parser.add_argument("--stem", help="file name stem (default: bench-DEVICE[-quick])")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")

    print(fastmeta.backends(), end="\n\n")
    machine = harness.machine_description(args.device)
    command = "python -m fastmeta.bench " + " ".join(argv)
    results = []
    for case in args.case or sorted(CASES):
        timing = (
            {} if args.device == "cuda" and case != overhead.CASE else {"repeats": args.repeats}
        )
        results += CASES[case](args.device, quick=args.quick, **timing)
    stem = args.stem or f"bench-{args.device}" + ("-quick" if args.quick else "")
    paths = harness.write_results(results, args.out, stem, {"machine": machine, "command": command})
    print("\n".join(fastmeta.backends().race_lines()))
    print(f"machine: {machine}")
    print(f"written: {', '.join(paths)}")
    print(harness.format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
