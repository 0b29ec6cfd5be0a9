"""Benchmark: one MAML meta-step (inner loop, query loss, backward) on conv4 Omniglot.

Model: conv4 as in MAML's Omniglot experiments: 4 x (conv3x3 64 filters, BatchNorm2d
with batch statistics, ReLU, maxpool2), Flatten, Linear(64, 5); inputs 1x28x28.
Every contender computes the mean query cross-entropy over the T tasks and calls
.backward(), so the model's parameters get the meta-gradient:
  fastmeta[auto=...]  fastmeta.MAML(model, lr, first_order).adapt_batch(...) with the
                      default strategy (named in the row; the ratios refer to this row)
  fastmeta[vmap]      the same with strategy='vmap'
  fastmeta[max_memory=M]  maml.meta_step(..., max_memory=M): the same meta-step a chunk
                      of tasks at a time, the chunks sized to keep the graphs within M
                      (M: a round figure below higher's peak at the config, so the row
                      says how fast fastmeta is in the memory higher needs, or at (b)
                      the least that meta_step's estimate of one task, ~384 MiB, lets
                      through; doubled for the float64 check)
  loop                the learn2learn pattern in plain PyTorch: per task functional_call
                      + autograd.grad(create_graph=not first_order), fast = p - lr * g;
                      the query losses summed, one backward (the gradient reference)
  higher              higher.innerloop_ctx(copy_initial_weights=False,
                      track_higher_grads=not first_order) per task, the query loss's
                      backward inside the context as in higher's MAML example (first
                      order: its gradient at the detached fast weights is added to the
                      model's)
  vmap[native BN]     torch.func as users write it: vmap over tasks of inner steps made
                      with torch.func.grad + functional_call. torch.func differentiates
                      the native batch_norm twice wrongly (fastmeta/maml/task_model.py,
                      CompositeBatchNorm), so its second-order meta-gradient is wrong:
                      the row is timed anyway and marked
  learn2learn         learn2learn.algorithms.MAML clone/adapt per task, if importable
Before timing, each contender's meta-gradient is compared with the loop's (relative
error of all parameter gradients concatenated) in float32 on all T tasks; a row that
differs by TOLERANCE or more is checked again in float64 on the first CHECK64_TASKS
tasks (see _Float64Check: at (b) float32 rounding alone moves the meta-gradient by up
to 1e-1). The result is appended to the row's name, so it reaches the table, CSV and
JSON: `ok` (float32), `ok (f64)`, or `err <float64 error> (f64)`; the exact errors are
printed. Where vmap[native BN] fails in float64, the same code is run once more with
batch norm written from mean/var ops, to show that batch norm is the cause. The
checked call is each row's first warm-up and, on a GPU, gives its peak memory (the
allocator's count). On the CPU each row's peak is its first call's high-water mark in a
process of its own (fastmeta/bench/maml_row_peak.py: in one process the rows before
move the next row's resident-set number by ~10%). Optional contenders that cannot run
are skipped, reason printed.
Configs: (a) 5-way 1-shot 15 queries/class, T=32, 1 inner step, lr 0.4, second order;
(b) 5-shot, 5 steps; (c) (a) first order. (b) times at most HEAVY_REPEATS rounds.
"""

import contextlib
import copy
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta.bench.harness import Candidate, Sweepable, peak_memory_mib, run_config
from fastmeta.maml.task_model import CompositeBatchNorm
from fastmeta.models import conv4 as conv4_network

CASE = "maml"
WAYS, LR, TOLERANCE = 5, 0.4, 1e-4
CONFIGS = {  # name: (tasks T, shots K, queries per class, inner steps, first_order,
    #                 the memory-bounded row's max_memory in MiB)
    "(a) 5w1s T=32 1 step 2nd order": (32, 1, 15, 1, False, 144),
    "(b) 5w5s T=32 5 steps 2nd order": (32, 5, 15, 5, False, 448),
    "(c) 5w1s T=32 1 step 1st order": (32, 1, 15, 1, True, 128),
}
QUICK = {
    "(a) 5w1s T=4 1 step 2nd order": (4, 1, 5, 1, False, 64),
    "(c) 5w1s T=4 1 step 1st order": (4, 1, 5, 1, True, 64),
}
HEAVY_REPEATS = 3  # (b): a second-order 5-step meta-step takes up to a minute per contender
CHECK64_TASKS = 4  # tasks in the float64 gradient check


def conv4(ways: int = WAYS, channels: int = 64) -> nn.Module:
    """MAML's Omniglot conv4 for 28x28: batch norm on batch statistics, a linear head."""
    return conv4_network(channels=channels, ways=ways, track_running_stats=False)


def episodes(T: int, K: int, Q: int, device, seed: int = 0, ways: int = WAYS):
    """Random 28x28 tasks: support [T, ways*K, 1, 28, 28], query [T, ways*Q, 1, 28, 28]."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, ways * K, 1, 28, 28, generator=g).to(device)
    xq = torch.randn(T, ways * Q, 1, 28, 28, generator=g).to(device)
    ys = torch.arange(ways, device=device).repeat_interleave(K).expand(T, -1).contiguous()
    yq = torch.arange(ways, device=device).repeat_interleave(Q).expand(T, -1).contiguous()
    return xs, ys, xq, yq


def _fastmeta_step(model, strategy, steps, first_order, data):
    xs, ys, xq, yq = data
    maml = fastmeta.MAML(model, LR, first_order=first_order, strategy=strategy)

    def run():
        model.zero_grad(set_to_none=True)
        learner = maml.adapt_batch(xs, ys, F.cross_entropy, steps=steps)
        run.strategy_used[:] = [learner.strategy]
        F.cross_entropy(learner(xq).flatten(0, 1), yq.flatten()).backward()

    run.strategy_used = []
    return run


def _bounded_step(model, steps, first_order, data, max_memory_mib):
    xs, ys, xq, yq = data
    maml = fastmeta.MAML(model, LR, first_order=first_order)
    budget = max_memory_mib * 2**20 * xs.element_size() // 4  # float64: twice the bytes

    def run():
        model.zero_grad(set_to_none=True)
        maml.meta_step(xs, ys, xq, yq, F.cross_entropy, steps=steps, max_memory=budget)

    return run


def _loop_step(model, steps, first_order, data):
    """learn2learn's pattern without learn2learn: one task at a time."""
    xs, ys, xq, yq = data

    def run():
        model.zero_grad(set_to_none=True)
        params = dict(model.named_parameters())
        total = 0
        for t in range(xs.shape[0]):
            fast = params
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(model, fast, (xs[t],)), ys[t])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
                fast = {n: p - LR * g for (n, p), g in zip(fast.items(), grads)}
            total = total + F.cross_entropy(functional_call(model, fast, (xq[t],)), yq[t])
        (total / xs.shape[0]).backward()

    return run


def _higher_step(model, steps, first_order, data):
    import higher

    xs, ys, xq, yq = data
    T = xs.shape[0]
    inner_opt = torch.optim.SGD(model.parameters(), lr=LR)
    params = list(model.parameters())

    def run():
        model.zero_grad(set_to_none=True)
        for t in range(T):
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
            ) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
                loss = F.cross_entropy(fmodel(xq[t]), yq[t]) / T
                if not first_order:
                    loss.backward()
                    continue
                # track_higher_grads=False detaches the fast weights: the first-order
                # meta-gradient is the query gradient at them, added to the model's.
                for p, g in zip(params, torch.autograd.grad(loss, list(fmodel.parameters()))):
                    p.grad = g if p.grad is None else p.grad + g

    return run


def _vmap_step(model, steps, first_order, data):
    """torch.func as users write it (native batch norm inside vmap(grad(...)))."""
    xs, ys, xq, yq = data

    def task_loss(fast, x, y):
        return F.cross_entropy(functional_call(model, fast, (x,)), y)

    def query_loss(params, x_s, y_s, x_q, y_q):
        fast = params
        for _ in range(steps):
            grads = torch.func.grad(task_loss)(fast, x_s, y_s)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            fast = {n: fast[n] - LR * grads[n] for n in fast}
        return task_loss(fast, x_q, y_q)

    batched = torch.func.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))

    def run():
        model.zero_grad(set_to_none=True)
        batched(dict(model.named_parameters()), xs, ys, xq, yq).mean().backward()

    return run


def _learn2learn_step(model, steps, first_order, data):
    import learn2learn

    xs, ys, xq, yq = data
    maml = learn2learn.algorithms.MAML(model, lr=LR, first_order=first_order)

    def run():
        model.zero_grad(set_to_none=True)
        total = 0
        for t in range(xs.shape[0]):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
            total = total + F.cross_entropy(learner(xq[t]), yq[t])
        (total / xs.shape[0]).backward()

    return run


def _meta_gradient(model, fn, device=None) -> tuple[torch.Tensor, float, float | None]:
    """All parameter gradients concatenated after one call of fn, its seconds and, with
    a device, its peak memory in MiB (measured as the harness does)."""
    start = time.perf_counter()
    peak = None
    if device is None:
        fn()
    else:
        peak = peak_memory_mib(fn, device)
    seconds = time.perf_counter() - start
    return torch.cat([p.grad.flatten() for p in model.parameters()]), seconds, peak


def _relative_error(reference: torch.Tensor, grad: torch.Tensor) -> float:
    return float((grad - reference).norm() / reference.norm())


def _skip_reason(name: str, e: Exception) -> str:
    reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
    if isinstance(e, ModuleNotFoundError):
        reason += f" (optional: pip install {name})"
        if name == "learn2learn" and sys.version_info >= (3, 11):
            reason += (
                "; learn2learn 0.2.0 has no wheel for Python >= 3.11 and its sdist "
                "does not build there: its Cython-generated C includes longintrepr.h"
            )
    return reason


def _builders(steps: int, first_order: bool, max_memory_mib: int):
    """name -> build(model, data) -> the contender's meta-step (a callable)."""
    opts = (steps, first_order)
    return {
        "fastmeta": lambda m, d: _fastmeta_step(m, "auto", *opts, d),
        f"fastmeta[max_memory={max_memory_mib}MiB]": lambda m, d: _bounded_step(
            m, *opts, d, max_memory_mib
        ),
        "fastmeta[vmap]": lambda m, d: _fastmeta_step(m, "vmap", *opts, d),
        "loop (reference)": lambda m, d: _loop_step(m, *opts, d),
        "higher": lambda m, d: _higher_step(m, *opts, d),
        "vmap[native BN]": lambda m, d: _vmap_step(m, *opts, d),
        "learn2learn": lambda m, d: _learn2learn_step(m, *opts, d),
    }


class _Float64Check:
    """The same meta-step in float64 on the first CHECK64_TASKS tasks, against the loop
    in float64: a gradient check that float32 rounding cannot upset. (At (b), 5 steps of
    lr 0.4 overshoot, and max-pool/ReLU choices flip under rounding: the float32 loop
    itself is up to 1e-1 off its float64 result on some tasks, so float32 rows of
    different kernels disagree by as much without either being wrong.)"""

    def __init__(self, model, data, builders, log):
        self.model = copy.deepcopy(model).double()
        self.data = tuple(
            x[:CHECK64_TASKS].double() if x.is_floating_point() else x[:CHECK64_TASKS] for x in data
        )
        self.builders = builders
        self.reference = _meta_gradient(
            self.model, builders["loop (reference)"](self.model, self.data)
        )[0]
        data32 = tuple(x[:CHECK64_TASKS] for x in data)
        loop32 = _meta_gradient(model, builders["loop (reference)"](model, data32))[0]
        log(
            f"    float64 check on {len(self.data[0])} tasks: the float32 loop itself is "
            f"{_relative_error(self.reference, loop32.double()):.1e} off the float64 loop"
        )

    def error(self, name: str, mode=contextlib.nullcontext) -> float:
        with mode():
            grad = _meta_gradient(self.model, self.builders[name](self.model, self.data))[0]
        return _relative_error(self.reference, grad)


def warmed_up(device, T, K, Q, builders) -> tuple[nn.Module, tuple]:
    """The config's model and tasks (seed 0), after the process warm-up every row has:
    one call of the loop on one task."""
    torch.manual_seed(0)
    model = conv4().to(device)
    data = episodes(T, K, Q, device)
    builders["loop (reference)"](model, tuple(x[:1] for x in data))()
    return model, data


def _row_peak_mib(name, T, K, Q, steps, first_order, max_memory_mib, log) -> float | None:
    """The row's first-call peak in MiB measured in a child process (maml_row_peak.py);
    None, with the child's last line of stderr logged, where that fails."""
    args = [name, T, K, Q, steps, int(first_order), max_memory_mib]
    child = subprocess.run(
        [sys.executable, "-m", "fastmeta.bench.maml_row_peak", *map(str, args)],
        capture_output=True,
        text=True,
    )
    if child.returncode == 0:
        return float(child.stdout.split()[-1])
    log(f"    {name}: no peak, its child process failed: {child.stderr.strip()[-300:]}")
    return None


def candidates(device, T, K, Q, steps, first_order, max_memory_mib, log=print) -> list[Candidate]:
    """Builds the contenders for one config and checks every meta-gradient against the
    loop's: float32 on all T tasks (on a GPU this first call also gives the row's peak
    memory; on the CPU a child process measures it, _row_peak_mib),
    then, for a row that differs by TOLERANCE or more, float64 on a few tasks. Row names
    end with the check: `ok`, `ok (f64)` or `err <float64 relative error> (f64)`; the
    rows return nothing (the meta-gradient is in the model's .grad), so the harness's
    check_outputs marks them exempt."""
    builders = _builders(steps, first_order, max_memory_mib)
    model, data = warmed_up(device, T, K, Q, builders)
    in_process = device if device == "cuda" else None  # the device whose peak is read here

    def peak_of(name: str, peak: float | None) -> float | None:
        args = (T, K, Q, steps, first_order, max_memory_mib)
        return peak if in_process else _row_peak_mib(name, *args, log)

    loop_fn = builders["loop (reference)"](model, data)
    reference, seconds, peak = _meta_gradient(model, loop_fn, in_process)
    peak = peak_of("loop (reference)", peak)
    log(f"  loop (reference): {seconds:.2f} s (first call)")
    rows = [Candidate("loop (reference)", loop_fn, comparable=False, peak_mib=peak)]
    check64 = None
    for name, build in builders.items():
        if name == "loop (reference)":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # higher uses deprecated torch APIs
                fn = build(model, data)
                grad, seconds, peak = _meta_gradient(model, fn, in_process)
        except Exception as e:  # an optional contender that is missing or broken
            log(f"  {name}: skipped ({_skip_reason(name, e)})")
            continue
        label = f"fastmeta[auto={fn.strategy_used[0]}]" if name == "fastmeta" else name
        err = _relative_error(reference, grad)
        log(f"  {label}: {seconds:.2f} s (first call), meta-gradient {err:.1e} off the loop's")
        check = "ok"
        if err >= TOLERANCE:
            check64 = check64 or _Float64Check(model, data, builders, log)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                err64 = check64.error(name)
            check = "ok (f64)" if err64 < TOLERANCE else f"err {err64:.0e} (f64)"
            note = ""
            if name == "vmap[native BN]" and err64 >= TOLERANCE:
                # the same code with batch norm written from mean/var ops (fastmeta's fix)
                composite = check64.error(name, CompositeBatchNorm)
                note = (
                    f"; with batch norm from mean/var ops the same code is {composite:.1e} "
                    f"off"
                    + (
                        ": torch.func's double backward of the native batch_norm is what is wrong"
                        if composite < TOLERANCE
                        else ""
                    )
                )
            log(f"    {label} in float64: {err64:.1e} off the loop's{note}")
        rows.append(
            Candidate(
                f"{label} {check}",
                fn,
                is_fastmeta=(name == "fastmeta"),
                comparable=False,
                peak_mib=peak_of(name, peak),
            )
        )
    rows.sort(key=lambda row: not row.is_fastmeta)  # fastmeta's default first
    return rows


SWEEP = Sweepable(
    axes={"T": 32, "shots": 1, "queries": 15, "steps": 1, "max_memory_mib": 144},
    about=(
        f"tasks T, shots and queries per class ({WAYS}-way), inner steps (second order), "
        "the memory-bounded row's max_memory in MiB"
    ),
    candidates=lambda device, p, memory: candidates(
        device, p["T"], p["shots"], p["queries"], p["steps"], False, p["max_memory_mib"]
    ),
    # about 2.5 MiB per image and inner step: the graphs second-order MAML keeps
    footprint=lambda p: int(2.5 * 2**20 * p["T"] * WAYS * (p["shots"] * p["steps"] + p["queries"])),
    warmup=0,  # candidates() has called each row once (the check)
)


def run(device: str, quick: bool = False, **timing):
    results = []
    for config, (T, K, Q, steps, first_order, mib) in (QUICK if quick else CONFIGS).items():
        print(f"{CASE} {config}:")
        rows = candidates(device, T, K, Q, steps, first_order, mib)
        config_timing = dict(timing)
        if device != "cuda":
            # the checked call above was each row's first warm-up; the heavy config
            # (several second-order steps: tens of seconds a call) gets no other
            heavy = steps > 1 and not quick
            config_timing["warmup"] = 0 if heavy else 1
            if heavy:
                config_timing["repeats"] = min(config_timing.get("repeats", 9), HEAVY_REPEATS)
            print(
                f"  timing: {config_timing.get('repeats', 9)} interleaved rounds after "
                f"{config_timing['warmup'] + 1} warm-up call(s) each"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results += run_config(CASE, config, device, rows, **config_timing)
    return results
