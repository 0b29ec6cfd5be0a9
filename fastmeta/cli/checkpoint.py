"""Checkpoints of a training run: everything needed to continue it exactly (model,
optimizer, step, the episode sampler's and torch's RNG states, history) and the
arguments it was started with."""

import os
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmeta.data import EpisodeSampler
from fastmeta.distributed import Ranks

FILE = "checkpoint.pt"
KEYS = {"args", "model", "optimizer", "sampler_rng", "torch_rng", "run"}  # what save writes
# Arguments that define the training trajectory: a resumed run must keep them.
SAME_ON_RESUME = (
    "algorithm",
    "data",
    "ways",
    "shots",
    "queries",
    "tasks",
    "lr",
    "lr_halve_every",
    "clip_grad",
    "seed",
    "held_out",
    "val_fraction",
    "augment",
    "inner_lr",
    "inner_steps",
    "first_order",
    "task_generator",
    "attention_scale",
)
# The value of a SAME_ON_RESUME argument added later in a checkpoint saved before it.
BEFORE_IT_EXISTED = {"task_generator": "mlp", "clip_grad": None, "attention_scale": None}


def changed(
    saved: dict, args: Namespace, keys: tuple[str, ...] = SAME_ON_RESUME
) -> list[tuple[str, Any, Any]]:
    """(option, saved value, value in args) for each of `keys` whose value in args is not
    the one saved (a run's arguments; BEFORE_IT_EXISTED fills those added since)."""
    saved = BEFORE_IT_EXISTED | saved
    return [
        (f"--{k.replace('_', '-')}", saved.get(k), getattr(args, k))
        for k in keys
        if saved.get(k) != getattr(args, k)
    ]


def save(
    out: Path,
    args: Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: EpisodeSampler,
    run: dict,
) -> Path:
    """Writes out/checkpoint.pt atomically; run: step, train_seconds, history."""
    path = out / FILE
    state = {
        "args": vars(args),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler_rng": sampler.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "run": run,
    }
    partial = path.with_name(f"{FILE}.{os.getpid()}.tmp")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def load(out: Path, device: torch.device) -> dict:
    path = out / FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint to resume from: {path} does not exist (train without --resume first)"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, not a traceback
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    missing = KEYS - set(state) if isinstance(state, dict) else KEYS
    if missing or not isinstance(state["run"], dict) or "step" not in state["run"]:
        raise ValueError(
            f"cannot read checkpoint {path}: not a fastmeta checkpoint "
            f"(missing {', '.join(sorted(missing)) or 'run.step'})"
        )
    return state


def load_on_all_ranks(out: Path, ranks: Ranks) -> dict:
    """load(out) on the CPU by rank 0, sent to the other ranks (no shared file system
    needed). If rank 0 cannot read it, rank 0 says why and the others lose contact."""
    return ranks.broadcast_object(
        load(out, torch.device("cpu")) if ranks.is_main else None, f"loading {out / FILE}"
    )


def restore(
    state: dict,
    args: Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: EpisodeSampler,
) -> dict:
    """Puts a loaded checkpoint back into model, optimizer and RNGs; returns its run
    dict. A ValueError if args changed what the checkpoint was trained with."""
    if differences := changed(state["args"], args):
        trained = ", ".join(f"{option} {was!r} (now {now!r})" for option, was, now in differences)
        raise ValueError(f"cannot resume: the checkpoint was trained with {trained}")
    if state["run"]["step"] > args.steps:
        raise ValueError(
            f"cannot resume: the checkpoint is at step {state['run']['step']}, "
            f"beyond --steps {args.steps}"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.generator.set_state(state["sampler_rng"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    return state["run"]
