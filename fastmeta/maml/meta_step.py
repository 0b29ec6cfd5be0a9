"""One MAML / Meta-SGD meta-step (inner loop, query loss, backward) in bounded memory.

    result = maml.meta_step(support_x, support_y, query_x, query_y, F.cross_entropy,
                            max_memory=2 * 2**30)          # or chunk_size=8, checkpoint=True
    optimizer.step()                                        # .grad holds the meta-gradient

The query loss is a mean over the T tasks, so its gradient is the sum over chunks of
tasks of each chunk's mean loss times (chunk size / T): the meta-step adapts, runs and
differentiates a chunk of tasks at a time, and only one chunk's autograd graph is alive
at once. The accumulated gradient is the single backward's, up to float rounding.

Chunk size: `chunk_size=` tasks, or from `max_memory=` (bytes, or a fraction in (0, 1]
of the memory free on the device: CUDA's free plus PyTorch's cached memory, the CPU's
MemAvailable): the first call runs one task alone and measures the bytes its graph
holds for the backward (the tensors its autograd nodes saved, each storage once, not
counting the parameters and the data), then sizes the other chunks so that a chunk's
graphs plus the backward's working memory stay within the budget (SIZING: calibrated
on conv4 on the CPU, where glibc's heap adds its slack). The estimate is kept per
model, shapes and options, so later calls size every chunk from the start. Neither:
one chunk of all T tasks, the batched path's speed and memory.

checkpoint=True (second order) also bounds memory in the number of inner steps: the
inner loop first runs without a graph (first-order gradients only) and keeps each
step's fast weights [chunk, P]; the backward then goes through the steps in reverse,
rebuilding one step's second-order graph at a time from its saved fast weights and
back-propagating through it. A chunk then holds (steps + 1) fast-weight rows per task
plus the larger of one step's graph and the query pass's, instead of every step's
graph; the time cost is one more first-order support pass per inner step. First-order
MAML holds no graph through the steps: there checkpoint changes nothing.

Gradient hooks: every chunk but the last is differentiated with torch.autograd.grad
and summed aside; the sums are put into .grad just before the last chunk's backward,
so each parameter's .grad is accumulated once per meta-step (post-accumulate-grad
hooks such as fastmeta.distributed.GradientReducer's fire once, with the total).
"""

import math
import numbers
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from fastmeta.maml.batched import adapt_batch, check_support
from fastmeta.maml.task_model import TaskModel, batch_statistics_only, check_strategy
from fastmeta.ops.inner_update import inner_update
from fastmeta.profiling import phase

if TYPE_CHECKING:
    from fastmeta.maml.wrappers import _MetaLearner

# Sizing: a chunk of c tasks is taken to peak at (c + reserve) * factor * S, S the bytes
# one task's graph saves: the c graphs, plus `reserve` tasks' worth of working memory for
# the backward (gradients of activations, the allocator's slack). Measured on conv4 at
# 5-way, T = 32, on the CPU (peak RSS above the start, warm process, glibc malloc):
#   1 inner step, S = 21 MiB:              45 + 23.9 c MiB
#   5 inner steps, S = 167 MiB:           147 +  152 c MiB
#   5 inner steps checkpointed, S = 33 MiB: 120 +   54 c MiB (one step's graph is small
#   next to the backward's working memory; the same S and peak at 10 and 20 steps)
SIZING = {False: (1.15, 1), True: (1.75, 2)}  # checkpoint: (factor, reserve)


class MetaStepResult(NamedTuple):
    loss: Tensor  # mean query loss over the T tasks, detached []
    accuracy: Tensor | None  # mean query accuracy [] (integer labels), else None
    chunks: tuple[int, ...]  # the tasks of each chunk, in order
    task_bytes: int | None  # with max_memory: the estimated bytes one task's graph needs


def meta_step(
    meta: "_MetaLearner",
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    steps: int | None = None,
    first_order: bool | None = None,
    strategy: str | None = None,
    chunk_size: int | None = None,
    max_memory: int | float | None = None,
    checkpoint: bool = False,
    scale: float = 1.0,
) -> MetaStepResult:
    """Adapts the T tasks, computes the mean query loss loss_fn(outputs.flatten(0, 1),
    query_y.flatten(0, 1)) and accumulates scale times its gradient into .grad of meta's
    parameters (the model's, Meta-SGD's rates), a chunk of tasks at a time. loss_fn
    must be a mean over the examples (the default reduction). support_x [T, ...],
    support_y [T, ...], query_x [T, ...], query_y [T, ...]."""
    steps = meta.steps if steps is None else steps
    first_order = meta.first_order if first_order is None else first_order
    check_support(support_x, support_y, steps)
    T = support_x.shape[0]
    _check_query(query_x, query_y, T)
    scale = _check_scale(scale)
    _check_options(chunk_size, max_memory)
    strategy = check_strategy(strategy or meta.strategy, support_x.device)
    run = _Run(meta, loss_fn, steps, first_order, strategy, checkpoint and not first_order, T)
    data = (support_x, support_y, query_x, query_y)

    task_bytes, start = None, 0
    if chunk_size is not None:
        sizes = _split(T, chunk_size)
    elif max_memory is None:
        sizes = [T]
    else:
        budget = _budget(max_memory, support_x.device)
        check = partial(_check_budget, budget=budget, max_memory=max_memory, run=run)
        known = _TASK_BYTES.setdefault(meta, {})
        key = _cache_key(run, data)
        task_bytes = known.get(key)
        if task_bytes is None:  # one task alone, measured; its gradient is kept aside
            task_bytes = known[key] = run.chunk(_tasks(data, 0, 1), scale, check=check)
            start = 1
        check(task_bytes)
        sizes = _split(T - start, _fitting(task_bytes, budget, run.checkpoint))
    for i, size in enumerate(sizes):
        run.chunk(_tasks(data, start, size), scale, final=i == len(sizes) - 1)
        start += size
    run.grads.flush()
    return MetaStepResult(run.loss, run.accuracy, tuple(run.done), task_bytes)


def _tasks(data: tuple[Tensor, ...], start: int, size: int) -> tuple[Tensor, ...]:
    return tuple(x[start : start + size] for x in data)


# meta-learner -> {shapes and options: estimated bytes of one task's graph}
_TASK_BYTES: "weakref.WeakKeyDictionary[_MetaLearner, dict]" = weakref.WeakKeyDictionary()


class _Gradients:
    """Sums the gradients of `params` over several backward passes: all but the final
    one through torch.autograd.grad into sums kept aside; before the final one
    (.backward()) the sums go into .grad, so .grad is accumulated once."""

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.sums: list[Tensor | None] = [None] * len(params)

    def grad(
        self, output: Tensor, grad_output: Tensor | None = None, extra: tuple[Tensor, ...] = ()
    ) -> tuple[Tensor, ...]:
        """Adds d output / d params (times grad_output) to the sums; returns the
        gradients with respect to `extra`."""
        grads = torch.autograd.grad(output, [*extra, *self.params], grad_output, allow_unused=True)
        for i, g in enumerate(grads[len(extra) :]):
            if g is not None:  # out of place: g may be a view or an expanded tensor
                self.sums[i] = g if self.sums[i] is None else self.sums[i] + g
        return grads[: len(extra)]

    def backward(self, output: Tensor, grad_output: Tensor | None = None) -> None:
        """The final pass: the sums go into .grad, then output.backward(grad_output)."""
        self.flush()
        torch.autograd.backward(output, grad_output)

    def flush(self) -> None:
        for p, s in zip(self.params, self.sums):
            if s is not None:  # contiguous: the backward may add to it in place
                p.grad = s.contiguous() if p.grad is None else p.grad + s
        self.sums = [None] * len(self.params)


class _Run:
    """One meta-step's state: the task model, the gradient sums, the loss and accuracy."""

    def __init__(self, meta, loss_fn, steps, first_order, strategy, checkpoint, tasks):
        self.meta, self.loss_fn, self.steps = meta, loss_fn, steps
        self.first_order, self.strategy, self.checkpoint = first_order, strategy, checkpoint
        self.tasks = tasks
        self.task_model = TaskModel(meta.module, meta.layout, meta._fixed(), fuse=meta.fuse)
        self.grads = _Gradients([p for p in meta.parameters() if p.requires_grad])
        self.loss: Tensor = torch.zeros(())
        self.accuracy: Tensor | None = None
        self.done: list[int] = []

    def chunk(self, data, scale: float, final: bool = False, check=None) -> int:
        """Adapts, runs and differentiates one chunk of tasks (the final one through
        .backward()). With check: measures the bytes its graph holds, calls check(bytes)
        before the backward (it raises if they exceed the budget) and returns them."""
        xs, ys, xq, yq = data
        self.done.append(xs.shape[0])
        weight = scale * xs.shape[0] / self.tasks
        with batch_statistics_only(self.meta.module):
            if self.checkpoint:
                return self._checkpointed(xs, ys, xq, yq, weight, final, check)
            with phase("inner_loop"):
                learner = adapt_batch(
                    self.task_model,
                    self.meta._theta(),
                    self.meta.step_lr,
                    xs,
                    ys,
                    self.loss_fn,
                    self.steps,
                    self.first_order,
                    self.strategy,
                    self.meta.allow_unused,
                )
            loss = self._query_loss(learner.fast_weights, xq, yq)
        held = 0
        if check is not None:
            held = graph_bytes([loss], self._excluded(data))
            check(held)
        with phase("outer_backward"):
            if final:
                self.grads.backward(loss * weight)
            else:
                self.grads.grad(loss * weight)
        return held

    def _checkpointed(self, xs, ys, xq, yq, weight, final, check) -> int:
        meta, task_model = self.meta, self.task_model
        theta = meta._theta()
        fast = [theta.detach()]  # the fast weights before each step, without a graph
        with phase("inner_loop"):
            for k in range(self.steps):
                w = fast[-1].detach().requires_grad_()
                g = task_model.task_gradients(
                    w, xs, ys, self.loss_fn, self.strategy, False, meta.allow_unused
                )
                with torch.no_grad():
                    alpha = meta.step_lr(k)
                    fast.append(inner_update(w, alpha, g) if k == 0 else w - alpha * g)
        fast_bytes = sum(w.numel() * w.element_size() for w in fast)
        excluded = self._excluded((xs, ys, xq, yq, *fast)) if check is not None else set()

        def measured(output: Tensor, held: int) -> int:
            if check is None:
                return 0
            held = max(held, fast_bytes + graph_bytes([output], excluded))
            check(held)
            return held

        w = fast.pop().requires_grad_()
        loss = self._query_loss(w, xq, yq)
        held = measured(loss, 0)
        with phase("outer_backward"):  # with the inner steps' recomputation
            (v,) = self.grads.grad(loss * weight, extra=(w,))
            for k in reversed(range(self.steps)):  # one step's graph at a time
                w = theta if k == 0 else fast.pop().requires_grad_()
                g = task_model.task_gradients(
                    w, xs, ys, self.loss_fn, self.strategy, True, meta.allow_unused
                )
                alpha = meta.step_lr(k)
                out = inner_update(w, alpha, g) if k == 0 else w - alpha * g
                held = measured(out, held)
                if k:
                    (v,) = self.grads.grad(out, v, extra=(w,))
                elif final:
                    self.grads.backward(out, v)
                else:
                    self.grads.grad(out, v)
        return held

    def _query_loss(self, fast_weights: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        """The chunk's mean query loss; adds its share to the meta-step's loss and
        accuracy."""
        with phase("query_pass"):
            outputs = self.task_model.forward(fast_weights, xq, self.strategy)
        with phase("loss"):
            loss = self.loss_fn(outputs.flatten(0, 1), yq.flatten(0, 1))
            share = xq.shape[0] / self.tasks
            self.loss = self.loss.to(loss.device, loss.dtype) + loss.detach() * share
            if not yq.is_floating_point() and outputs.dim() == yq.dim() + 1:
                correct = (outputs.detach().argmax(-1) == yq).to(loss.dtype).mean() * share
                self.accuracy = correct if self.accuracy is None else self.accuracy + correct
        return loss

    def _excluded(self, data) -> set[int]:
        """Storages that exist without the graph: parameters, buffers, the data."""
        tensors = [*self.meta.parameters(), *self.meta.buffers(), *data]
        return {t.untyped_storage().data_ptr() for t in tensors}


_SAVED_ATTRIBUTES: dict[type, list[str]] = {}


def graph_bytes(roots: list[Tensor], excluded: set[int] = frozenset()) -> int:
    """Bytes of the tensors that the autograd graph behind `roots` saved for its
    backward, each storage counted once, leaving out storages in `excluded` (data
    pointers). Reads the nodes' saved tensors (`_saved_*`, and `saved_tensors` of
    autograd.Function nodes): this works under torch.func transforms too, where
    saved-tensor hooks are refused."""
    storages: dict[int, int] = {}
    seen = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in _saved_attributes(node):
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed already
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, Tensor) and t.layout == torch.strided:
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr and ptr not in excluded:
                        storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def _saved_attributes(node) -> list[str]:
    kind = type(node)
    if kind not in _SAVED_ATTRIBUTES:
        names = [n for n in dir(node) if n.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):
            names.append("saved_tensors")
        _SAVED_ATTRIBUTES[kind] = names
    return _SAVED_ATTRIBUTES[kind]


def _split(tasks: int, size: int) -> list[int]:
    """`tasks` in chunks of `size` (the last one smaller)."""
    size = max(1, min(size, tasks))
    return [min(size, tasks - start) for start in range(0, tasks, size)]


def _cache_key(run: _Run, data) -> tuple:
    shapes = tuple((tuple(x.shape[1:]), x.dtype, x.device) for x in data)
    return shapes, run.steps, run.first_order, run.strategy, run.checkpoint


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: CUDA's free memory plus what
    PyTorch's allocator caches unused; on the CPU, the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration):
        raise ValueError(
            "meta_step: max_memory as a fraction needs the free memory, which this system "
            "does not report (/proc/meminfo); pass max_memory in bytes"
        ) from None


def _budget(max_memory: int | float, device: torch.device) -> int:
    if isinstance(max_memory, float):
        return int(max_memory * free_memory(device))
    return int(max_memory)


def _fitting(task_bytes: int, budget: int, checkpoint: bool) -> int:
    """How many tasks a chunk can hold in `budget` bytes (SIZING); < 1: not even one."""
    factor, reserve = SIZING[checkpoint]
    return budget // math.ceil(task_bytes * factor) - reserve


def _check_budget(task_bytes: int, budget: int, max_memory, run: _Run) -> None:
    """Raises unless one task (its graph and the backward's working memory) fits."""
    if _fitting(task_bytes, budget, run.checkpoint) < 1:
        factor, reserve = SIZING[run.checkpoint]
        need = (1 + reserve) * math.ceil(task_bytes * factor)
        hint = "" if run.checkpoint or run.first_order else ", or checkpoint=True"
        given = f"{max_memory} of the free memory" if isinstance(max_memory, float) else ""
        raise ValueError(
            f"meta_step: max_memory={max_memory!r} ({budget / 2**20:.1f} MiB{given and ', '}"
            f"{given}) is too small for one task: its graph and backward need about "
            f"{need / 2**20:.1f} MiB ({run.steps} inner "
            f"step(s){', checkpointed' if run.checkpoint else ''}); raise max_memory"
            f"{hint}"
        )


def _check_options(chunk_size, max_memory) -> None:
    if chunk_size is not None and max_memory is not None:
        raise ValueError("meta_step: pass chunk_size or max_memory, not both")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"meta_step: chunk_size must be an integer >= 1, got {chunk_size!r}")
    if max_memory is None:
        return
    if isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real):
        raise ValueError(
            f"meta_step: max_memory must be bytes (an integer) or a fraction of the free "
            f"memory in (0, 1], got {max_memory!r}"
        )
    if isinstance(max_memory, numbers.Integral):
        if max_memory < 1:
            raise ValueError(f"meta_step: max_memory must be >= 1 byte, got {max_memory}")
    elif not 0 < max_memory <= 1:
        raise ValueError(
            f"meta_step: max_memory as a float is a fraction of the free memory in (0, 1], "
            f"got {max_memory}"
        )


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"meta_step: scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_query(query_x, query_y, tasks: int) -> None:
    for name, value in (("query_x", query_x), ("query_y", query_y)):
        if not isinstance(value, Tensor) or value.dim() < 1 or value.shape[0] != tasks:
            shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"meta_step: {name} must be a tensor [T = {tasks}, ...] (one batch per "
                f"task, like support_x), got {shape}"
            )
