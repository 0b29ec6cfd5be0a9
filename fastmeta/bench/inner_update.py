"""Benchmark: the batched inner-loop update, forward + backward.

fastmeta.inner_update on [T, P] against what users write today:
  per-task loop   [theta - alpha * g_t for each task]   (learn2learn / higher style)
  _foreach        torch._foreach_* over the per-task lists
  broadcast       theta - alpha * g on the stacked [T, P] gradients
and a plain copy of as many bytes as the update must read and write (its floor).
Configs: MAML (one fixed float learning rate; gradients flow to theta and g, as in
second-order MAML) and Meta-SGD (learnable [P] learning rates, gradients to alpha too).
Sweeps (SWEEP): the MAML config over T and P.
"""

import torch

import fastmeta
from fastmeta import backend
from fastmeta.bench.harness import Candidate, Sweepable, run_config

CASE = "inner_update"


def _sizes(device: str, quick: bool) -> tuple[int, int]:
    if quick:
        return 4, 10_001
    return (32, 12_000_000) if device == "cuda" else (32, 1_000_003)


def _grad(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def _fastmeta_backends(device: str) -> list[str]:
    usable = [
        b
        for b in backend.DEFAULT_PREFERENCE[device]
        if backend.unavailable_reason(b, device, torch.float32) is None
    ]
    if device == "cuda" and backend.unavailable_reason("triton", "cuda") is None:
        usable += [] if "triton" in usable else ["triton"]
    return usable  # default (the fastmeta row ratios refer to) first


def candidates(device: str, T: int, P: int, meta_sgd: bool) -> list[Candidate]:
    """One config's candidates; every one computes the same forward and gradients."""
    theta = torch.randn(P, device=device, requires_grad=True)
    g = torch.randn(T, P, device=device, requires_grad=True)
    g_list = [row.detach().clone().requires_grad_() for row in g]
    go = torch.randn(T, P, device=device)
    go_list = list(go.unbind(0))
    alpha = torch.rand(P, device=device, requires_grad=True) if meta_sgd else 0.4
    extra = [alpha] if meta_sgd else []
    element = theta.element_size()
    bytes_moved = element * ((5 * T * P + 5 * P) if meta_sgd else (4 * T * P + 2 * P))

    def fastmeta_fn(name):
        def run():
            with fastmeta.use_backend(name):
                return _grad(fastmeta.inner_update(theta, alpha, g), [theta, *extra, g], go)

        return run

    def loop():
        outs = [theta - alpha * g_t for g_t in g_list]
        return _grad(outs, [theta, *extra, *g_list], go_list)

    def foreach():
        if meta_sgd:
            outs = torch._foreach_sub([theta] * T, torch._foreach_mul(g_list, [alpha] * T))
        else:
            outs = torch._foreach_add([theta] * T, g_list, alpha=-alpha)
        return _grad(outs, [theta, *extra, *g_list], go_list)

    def broadcast():
        return _grad(theta - alpha * g, [theta, *extra, g], go)

    names = _fastmeta_backends(device)
    rows = [
        Candidate(f"fastmeta[{b}]", fastmeta_fn(b), is_fastmeta=(i == 0), bytes_moved=bytes_moved)
        for i, b in enumerate(names)
    ]
    rows += [
        Candidate("per-task loop", loop, bytes_moved=bytes_moved),
        Candidate("torch._foreach", foreach, bytes_moved=bytes_moved),
        Candidate("broadcast (stacked)", broadcast, bytes_moved=bytes_moved),
    ]
    # The floor: one memory copy that reads and writes as many bytes as the update must.
    src = torch.empty(bytes_moved // 2 // element, device=device).normal_()
    dst = torch.empty_like(src)
    rows.append(
        Candidate(
            "copy, same bytes (floor)",
            lambda: dst.copy_(src),
            bytes_moved=bytes_moved,
            comparable=False,
        )
    )
    return rows


SWEEP = Sweepable(
    axes={"T": 32, "P": 1_000_003},
    about="tasks T, parameters P (one float learning rate, as the MAML config)",
    candidates=lambda device, point, memory: candidates(device, point["T"], point["P"], False),
    # float32 [T, P]: g, its per-task copies, go, the outputs and gradients of a row
    footprint=lambda point: 4 * 10 * point["T"] * point["P"],
)


def run(device: str, quick: bool = False, **timing):
    T, P = _sizes(device, quick)
    results = []
    for meta_sgd in (False, True):
        config = f"{'Meta-SGD [P] lr' if meta_sgd else 'MAML float lr'} T={T} P={P}"
        results += run_config(CASE, config, device, candidates(device, T, P, meta_sgd), **timing)
    return results
