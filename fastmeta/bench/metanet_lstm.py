"""Benchmark: Meta Networks' LSTM task generator d (MetaNetwork(task_generator="lstm"))
against the rest of a training step, on conv4 28x28 episodes.

Per configuration, side by side (ratios to the first row):
  step, d = mlp          one training step (loss, .backward()) of
                         fastmeta.MetaNetwork(ways=ways), the default d
  step, d = lstm         the same model with task_generator="lstm" (fused gradient_lstm)
  d = lstm alone         gradient_lstm forward + backward on gradients shaped as the
                         representation learner's per-example ones, [B, N, O, K] for its
                         augmented conv (64 x 576 coordinates per example)
  d = lstm alone, plain  the same LSTM in plain PyTorch (every step's [B, O, K, 4H]
                         gates built): what d would cost without the fused op
  d = mlp alone          the default d on the same gradients: gradient_mlp, mean over N
The gradients are random (magnitude 1e-3); d has 20 hidden units, as the model's. Peak
memory: one extra call each (CPU: the process's high-water mark).

On the CPU the rows run on one thread and are timed by that thread's CPU time
(time.thread_time): the shares of a step are what this case is for, and on a shared
machine wall times of steps of many seconds swing with the other jobs.
"""

import time

import torch

import fastmeta
from fastmeta.bench.harness import Candidate, run_config
from fastmeta.bench.metanet import random_episodes, training_step
from fastmeta.metanet import GradientLSTM, GradientMLP
from fastmeta.metanet.layers import augmented_layers

CASE = "metanet_lstm"
CONFIGS = {  # episodes, ways, shots, queries
    "(a) 5w1s 15q B=16 conv4 28x28": (16, 5, 1, 15),
    "(b) 20w1s 5q B=16 conv4 28x28": (16, 20, 1, 5),
}
QUICK = {"(a) 5w1s 5q B=2 conv4 28x28": (2, 5, 1, 5)}


def _generator_step(generator, grads: torch.Tensor, plain: bool = False, mean: bool = False):
    def step():
        generator.zero_grad(set_to_none=True)
        out = generator.plain(grads) if plain else generator(grads)
        (out.mean(1) if mean else out).sum().backward()

    return step


def candidates(device: str, B: int, ways: int, shots: int, queries: int) -> list[Candidate]:
    batch = random_episodes(device, B, ways, shots, queries)
    models = {}
    for kind in ("mlp", "lstm"):
        torch.manual_seed(0)
        models[kind] = fastmeta.MetaNetwork(ways=ways, task_generator=kind).to(device)
    weight = augmented_layers(models["lstm"].representation)[0].weight  # [O, C, 3, 3]
    grads = 1e-3 * torch.randn(B, ways * shots, weight.shape[0], weight[0].numel(), device=device)
    lstm, mlp = GradientLSTM().to(device), GradientMLP().to(device)
    return [
        Candidate("step, d = mlp", training_step(models["mlp"], batch), is_fastmeta=True),
        Candidate("step, d = lstm", training_step(models["lstm"], batch)),
        Candidate("d = lstm alone", _generator_step(lstm, grads)),
        Candidate("d = lstm alone, plain", _generator_step(lstm, grads, plain=True)),
        Candidate("d = mlp alone", _generator_step(mlp, grads, mean=True)),
    ]


def run(device: str, quick: bool = False, **timing):
    results = []
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
        timing["clock"] = time.thread_time
    try:
        for config, sizes in (QUICK if quick else CONFIGS).items():
            if device == "cpu":
                config += ", 1 thread, CPU time"
            print(f"{CASE} {config}:")
            results += run_config(
                CASE, config, device, candidates(device, *sizes), memory=True, **timing
            )
    finally:
        torch.set_num_threads(threads)
    return results
