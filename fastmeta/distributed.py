"""Data-parallel meta-training across processes and machines with torch.distributed.

W processes (ranks) share each meta-batch of T tasks. Every rank draws the same global
batch from an identically seeded sampler and adapts its own contiguous share of the
tasks, `ranks.share(T)`: rank r gets tasks [r*T//W, (r+1)*T//W), so no two ranks see
the same task and together they see exactly the one-process batch. Each rank
back-propagates its mean loss weighted by `ranks.weight(T)` = T_r / T, and
`GradientReducer` sums the gradients across ranks while the backward runs. For any loss
that is a mean over the batch's tasks (ProtoNet, MAML, Meta-SGD, Meta Networks) the
summed gradient is the one-process gradient on all T tasks, up to float rounding, even
when W does not divide T.

    with distributed.launch("cpu", timeout=300) as ranks:     # torchrun's env; W = 1 without
        model = build()                                        # identical on every rank (seed)
        reducer = distributed.GradientReducer(model.parameters(), ranks)
        for step in range(steps):
            episodes = sampler.sample(ranks.share(T))          # EpisodeSampler: T_r tasks
            loss, accuracy = model.loss(*episodes)
            (loss * ranks.weight(T)).backward()                # buckets all-reduce meanwhile
            reducer.wait()                                     # .grad: the T-task gradient
            optimizer.step()

A peer that exits makes the next collective fail at once (gloo: the connection closes);
one that hangs makes it fail after `timeout` seconds. Either way the surviving ranks get
a PeerLostError that says which rank lost contact during what.
"""

import contextlib
import datetime
import importlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

BUCKET_MB = 25.0  # gradient bytes per all-reduce, as DistributedDataParallel's default


class PeerLostError(RuntimeError):
    """A collective failed: a peer exited or crashed, hung past the timeout, or the
    network between the ranks broke."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among `world_size` ranks, and the device it computes on.
    With world_size 1 the collectives return their input and share() is every task."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def share(self, tasks: int) -> slice:
        """This rank's contiguous slice of a batch of `tasks` tasks; empty on some ranks
        when tasks < world_size."""
        return slice(
            self.rank * tasks // self.world_size, (self.rank + 1) * tasks // self.world_size
        )

    def weight(self, tasks: int) -> float:
        """T_r / T: the factor of this rank's mean loss in the batch's mean loss."""
        part = self.share(tasks)
        return (part.stop - part.start) / tasks

    def all_reduce_(self, tensor: Tensor, what: str) -> Tensor:
        """Sums `tensor` (on self.device) over the ranks, in place; returns it. `what`
        names the collective in a PeerLostError."""
        if self.world_size > 1:
            with self.collective(what):
                dist.all_reduce(tensor)
        return tensor

    def broadcast_object(self, value: Any, what: str) -> Any:
        """Rank 0's `value` (any picklable object, tensors on the CPU), on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def average_buffers_(self, module: nn.Module, what: str) -> None:
        """Replaces the floating-point buffers of `module` (batch-norm running statistics)
        by their mean over the ranks, so every rank evaluates and saves the same model."""
        if self.world_size == 1:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                self.all_reduce_(buffer, what).div_(self.world_size)

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turns a failed collective (gloo and NCCL raise RuntimeError) into a
        PeerLostError: "rank 1 of 2 lost contact with its peers during `what` (...)"."""
        try:
            yield
        except PeerLostError:
            raise
        except RuntimeError as error:
            raise PeerLostError(
                f"rank {self.rank} of {self.world_size} lost contact with its "
                f"peers during {what} ({_first_sentence(error)})"
            ) from None


def _first_sentence(error: Exception) -> str:
    """ "Connection closed by peer [127.0.0.1]:4242" from gloo's "[.../pair.cc:561]
    Connection closed by peer [127.0.0.1]:4242. This is typically caused by ..."."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())
    return text.split("\n")[0].split(". ")[0].rstrip(".") or type(error).__name__


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(
                f"${name} is not set: launch the ranks with torchrun, or set "
                f"RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {text!r}") from None


@contextlib.contextmanager
def launch(device: str | torch.device, timeout: float) -> Iterator[Ranks]:
    """The ranks this process belongs to, from torchrun's environment.

    WORLD_SIZE unset or 1: one process alone on `device`, no process group. Otherwise it
    joins the group of RANK among WORLD_SIZE at MASTER_ADDR:MASTER_PORT (env://): NCCL
    when `device` is CUDA (the rank then runs on cuda:LOCAL_RANK, whatever index
    `device` names), gloo on the CPU. A collective that waits more than `timeout`
    seconds fails with a PeerLostError. Without OMP_NUM_THREADS set (torchrun sets it
    to 1 for several processes per machine) the rank takes its LOCAL_WORLD_SIZE-th of
    the cores. The group is destroyed on leaving."""
    device = torch.device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size == 1:
        yield Ranks(device=device)
        return
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"$RANK must be in [0, {world_size}), got {rank}")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // _env_int("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # wait() then raises on a timeout instead of the watchdog aborting the process
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    ranks = Ranks(rank, world_size, device)
    # Imported after the group exists, torch._dynamo keeps it alive past
    # destroy_process_group (torch 2.14); its gloo threads then outlive the interpreter
    # and abort the exiting process ("terminate called without an active exception").
    # fastmeta's ops import it on first use anyway.
    importlib.import_module("torch._dynamo")
    where = (
        f"start-up (rendezvous at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})"
    )
    with ranks.collective(where):
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
    try:
        yield ranks
    except PeerLostError:
        raise  # the group is broken: tearing it down could wait on the lost peer
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    pending: set[int] = field(default_factory=set)  # ids of params without their gradient yet
    buffer: Tensor | None = None  # [sum of numels + one presence flag per param]
    work: Any = None  # the async all-reduce of buffer

    @property
    def numels(self) -> list[int]:
        return [p.numel() for p in self.params]


class GradientReducer:
    """Sums the gradients of `parameters` over the ranks, overlapped with the backward.

    The parameters (those with requires_grad) go into buckets of about `bucket_mb` MiB
    in reverse order, the order in which the backward usually finishes their
    gradients. A post-accumulate-grad hook counts each parameter's gradient in; when
    all of a bucket's gradients are in, and all earlier buckets have started, the
    bucket starts an asynchronous all-reduce (SUM) of its gradients flattened into one
    buffer. Buckets start in the same order on every rank, so the collectives match
    even when the backward finishes gradients in another order, or not at all, on
    some rank. wait() starts the buckets still waiting (a parameter without a gradient
    on this rank counts as zeros), waits for them all and sets each .grad to its sum:
    the gradient of sum over ranks of (weighted) losses. A parameter with a gradient
    on no rank keeps .grad None, as in one process.

    Only .grad accumulation triggers the hooks: torch.autograd.grad (MAML's inner loop,
    Meta Networks' support gradients) does not. One backward per wait(). With one rank
    it does nothing. All ranks must build the same parameters in the same order.
    """

    def __init__(
        self, parameters: Iterable[nn.Parameter], ranks: Ranks, bucket_mb: float = BUCKET_MB
    ):
        self.ranks = ranks
        self._buckets: list[_Bucket] = []
        self._started = 0  # buckets started in this backward, a prefix of _buckets
        if ranks.world_size == 1:
            return
        limit, size = bucket_mb * 2**20, 0.0
        for param in reversed([p for p in parameters if p.requires_grad]):
            last = self._buckets[-1] if self._buckets else None
            if last is None or size >= limit or param.dtype != last.params[0].dtype:
                last, size = _Bucket([]), 0.0
                self._buckets.append(last)
            last.params.append(param)
            size += param.numel() * param.element_size()
            param.register_post_accumulate_grad_hook(partial(self._arrived, len(self._buckets) - 1))
        for bucket in self._buckets:
            bucket.pending = {id(p) for p in bucket.params}

    def _arrived(self, index: int, param: nn.Parameter) -> None:
        bucket = self._buckets[index]
        if id(param) not in bucket.pending:
            raise RuntimeError(
                "GradientReducer: a second backward before wait(); call wait() after each backward"
            )
        bucket.pending.remove(id(param))
        while self._started < len(self._buckets) and not self._buckets[self._started].pending:
            self._start(self._buckets[self._started])

    def _start(self, bucket: _Bucket) -> None:
        """Flattens the bucket's gradients (zeros where none) and their presence flags
        into one buffer and starts its all-reduce."""
        first, numels = bucket.params[0], bucket.numels
        bucket.buffer = torch.zeros(
            sum(numels) + len(numels), dtype=first.dtype, device=first.device
        )
        grads, present = bucket.buffer.split((sum(numels), len(numels)))
        for param, flat, flag in zip(bucket.params, grads.split(numels), present):
            if param.grad is not None:
                flat.view_as(param).copy_(param.grad)
                flag.fill_(1)
        with self.ranks.collective("the gradient all-reduce"):
            bucket.work = dist.all_reduce(bucket.buffer, async_op=True)
        self._started += 1

    def wait(self) -> None:
        """Finishes the all-reduces of this backward; .grad then holds the sums."""
        while self._started < len(self._buckets):
            self._start(self._buckets[self._started])
        for bucket in self._buckets:
            with self.ranks.collective("the gradient all-reduce"):
                bucket.work.wait()
            numels = bucket.numels
            grads, present = bucket.buffer.split((sum(numels), len(numels)))
            for param, flat, flag in zip(bucket.params, grads.split(numels), present.tolist()):
                param.grad = flat.view_as(param) if flag else None
            bucket.pending = {id(p) for p in bucket.params}
            bucket.buffer = bucket.work = None
        self._started = 0
