"""Benchmark: a second-order MAML meta-step too large for memory at once, run in a
memory budget (maml.meta_step(max_memory=...), fastmeta/maml/meta_step.py).

conv4 (fastmeta/bench/maml.py) on 20-way 5-shot episodes with 15 queries per class,
T = 32 tasks, 5 inner steps of lr 0.4, second order, float32: 400 images per task. The
single backward would hold all 32 tasks' graphs at once: the log prints that estimate
(32 x the measured bytes of one task's graph). Rows: the meta-step in a MAX_MEMORY
budget, and the same with the inner loop checkpointed (checkpoint=True). Each row's
first call (which measures one task and sizes the chunks) gives its peak memory (CPU:
the harness's high-water mark); the timed calls after it reuse the estimate.
"""

import torch
import torch.nn.functional as F

import fastmeta
from fastmeta.bench.harness import Candidate, peak_memory_mib, run_config
from fastmeta.bench.maml import LR, conv4, episodes

CASE = "maml_bounded"
MAX_MEMORY = 4 * 2**30
CONFIGS = {"20w5s T=32 5 steps 2nd order, 4 GiB": (20, 32, 5, 15, 5, MAX_MEMORY)}
QUICK = {"5w1s T=4 2 steps 2nd order, 64 MiB": (5, 4, 1, 5, 2, 64 * 2**20)}
REPEATS = 2  # about half a minute a call on a 2-core CPU


def _step(maml, data, steps, max_memory, checkpoint, log):
    def run():
        maml.module.zero_grad(set_to_none=True)
        result = maml.meta_step(
            *data, F.cross_entropy, steps=steps, max_memory=max_memory, checkpoint=checkpoint
        )
        if not run.logged:
            T = data[0].shape[0]
            log(
                f"  checkpoint={checkpoint}: chunks {list(result.chunks)}, one task's graph "
                f"~{result.task_bytes / 2**20:.0f} MiB (all {T} at once: "
                f"~{T * result.task_bytes / 2**30:.1f} GiB)"
            )
            run.logged = True

    run.logged = False
    return run


def run(device: str, quick: bool = False, log=print, **timing):
    results = []
    for config, (ways, T, K, Q, steps, max_memory) in (QUICK if quick else CONFIGS).items():
        log(f"{CASE} {config}:")
        torch.manual_seed(0)
        maml = fastmeta.MAML(conv4(ways).to(device), LR)
        data = episodes(T, K, Q, device, ways=ways)
        rows = []
        for checkpoint in (False, True):
            name = f"fastmeta[max_memory={max_memory / 2**20:.0f}MiB" + (
                ", checkpoint]" if checkpoint else "]"
            )
            fn = _step(maml, data, steps, max_memory, checkpoint, log)
            peak = peak_memory_mib(fn, device)  # the first call: also the warm-up
            rows.append(
                Candidate(name, fn, is_fastmeta=not checkpoint, comparable=False, peak_mib=peak)
            )
        if device != "cuda":
            timing = {**timing, "warmup": 0, "repeats": min(timing.get("repeats", 9), REPEATS)}
        results += run_config(CASE, config, device, rows, **timing)
    return results
