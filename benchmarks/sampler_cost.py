"""What EpisodeSampler.sample() costs: one batch of 32 tasks, 5-way 1-shot 15 queries
per class, from Omniglot-sized data (4840 random images [1, 28, 28], 242 classes of
20), against the floor of gathering the same rows with one index_select.

    python benchmarks/sampler_cost.py [--device cpu|cuda] [--threads N] [--repeats 500]
"""

import argparse
import statistics
import time

import torch

from fastmeta.data import EpisodeSampler


def median_us(fn, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    x = torch.rand(4840, 1, 28, 28, device=device)
    y = torch.arange(242, device=device).repeat_interleave(20)
    sampler = EpisodeSampler(x, y, ways=5, shots=1, queries=15, tasks=32, seed=0)
    rows = torch.randint(0, len(x), (32 * 5 * 16,), device=device)
    sample = median_us(sampler.sample, args.repeats, device)
    gather = median_us(lambda: x.index_select(0, rows), args.repeats, device)
    print(
        f"{device}, {args.threads} threads, median of {args.repeats}: sample() {sample:.0f} us, "
        f"index_select of the same {len(rows)} rows alone {gather:.0f} us"
    )


if __name__ == "__main__":
    main()
