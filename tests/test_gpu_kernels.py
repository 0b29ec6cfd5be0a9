"""GPU checks of the cuda and triton backends that the op test files lack.

tests/test_protonet.py, test_inner_update.py and test_metanet_ops.py already run every
usable backend on CUDA through the `backend_device` fixture: float64 references forward
and backward on odd sizes (D = 1, 63 and 1600, up to C = 1001 classes; inner_update at
P = 1_000_003, which no block divides; gradient_mlp at 40022 coordinates), gradcheck,
opcheck, torch.compile, and inner_update's bitwise-repeatable backward (the determinism
README.md claims). This file adds only what they lack, for each cuda and triton backend:
- sizes: ProtoNet ops at C > 1024 classes, M = 64 / 65 / 129 queries, D = 1 and 1600;
  attention_read at M = 64 / 65 / 129 queries;
- determinism, two runs bitwise equal, where the kernels' documentation claims it:
  the ProtoNet ops on cuda (csrc/cuda/*.cu: no float atomics, fixed summation orders)
  and triton (fastmeta/kernels/protonet_triton.py: no atomics, fixed-order sums),
  gradient_mlp and attention_read on triton (fastmeta/kernels/metanet_triton.py),
  gradient_lstm on triton (fastmeta/kernels/gradient_lstm_triton.py).
  attention_read's cuda backend is cuBLAS calls and claims nothing;
- more than 2**31 elements, where an int32 index would wrap: attention_read's fast
  weights (W[b, i] starting past element 2**31) and inner_update's P itself past
  2**31, checked against float64 one slice at a time; tests/test_metanet_ops.py
  checks the fake (meta) path's shapes for the same read on CPU;
- the per-shape race on a real GPU (cuda against triton, CUDA-event timing): every
  raced op reports a winner and times, and the loss and gradients still match float64;
- wrappers launched on cuda:1 while device 0 is current (two-GPU machines only).
Every test is skipped without a CUDA GPU. The > 2**31 tests need about 20 GiB
(attention_read) and 45 GiB (inner_update) of GPU memory.
"""

import pytest
import torch
from conftest import rel_err
from test_metanet_lstm import lstm_parameters
from test_metanet_ops import LARGE_READ, attention_read_float64, mlp_parameters, random_gradients
from test_triton_launch import wrapper_calls
from torch.nn.functional import cross_entropy, one_hot

import fastmeta
from fastmeta import backend, race
from fastmeta import functional as F
from fastmeta.ops import attention_read, gradient_lstm, gradient_mlp

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU checks: no CUDA GPU is visible"
)

GPU_BACKENDS = ("cuda", "triton")
PROTONET_OPS = ("class_prototypes", "squared_distances", "prototypical_cross_entropy")
TOL = 1e-4  # float32 kernels (GEMMs over D up to 1600, softmax over 1031 classes)

# (B, C, M, D): C > 1024 classes, M = 64 / 65 / 129 queries, D = 1 and 1600
EPISODES = [(2, 1025, 64, 1), (1, 1031, 129, 1600), (3, 7, 65, 1600)]
# (B, M, N, O, K, L): M = 64 / 65 / 129 queries; odd O, K; L = 1 (a linear layer) and more
READS = [(2, 64, 5, 33, 129, 3), (1, 65, 7, 64, 1600, 1), (1, 129, 3, 17, 1, 20)]


def require(ops, name):
    """Skips unless backend `name` runs every op in `ops` on CUDA float32 here."""
    for op in ops:
        reason = backend.op_unavailable_reason(op, name, "cuda", torch.float32)
        if reason is not None:
            pytest.skip(f"{name} cannot run {op} here: {reason}")


def episode(B, C, M, D):
    """Support with one or two shots per class (labels shuffled), M labelled queries."""
    shots = torch.randint(1, 3, (C,))
    labels = torch.repeat_interleave(torch.arange(C), shots)
    support_labels = torch.stack([labels[torch.randperm(len(labels))] for _ in range(B)])
    return (
        torch.randn(B, len(labels), D, device="cuda"),
        support_labels.cuda(),
        torch.randn(B, M, D, device="cuda"),
        torch.randint(0, C, (B, M), device="cuda"),
    )


def prototypes_float64(support, labels, C):
    """Per-class means as a one-hot GEMM in float64: [B, S, D] -> [B, C, D]."""
    onehot = one_hot(labels, C).double()  # [B, S, C]
    return onehot.transpose(1, 2) @ support.double() / onehot.sum(1)[..., None]


def distances_float64(queries, prototypes):
    return ((queries.double()[:, :, None] - prototypes.double()[:, None]) ** 2).sum(-1)


def leaves(*tensors):
    """Detached float64 copies that require grad."""
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("B,C,M,D", EPISODES)
def test_class_prototypes_many_classes(name, B, C, M, D):
    require(["class_prototypes"], name)
    support, labels, _, _ = episode(B, C, M, D)
    support.requires_grad_()
    grad = torch.randn(B, C, D, device="cuda")
    with fastmeta.use_backend(name):
        prototypes = F.class_prototypes(support, labels, C)
        (d_support,) = torch.autograd.grad(prototypes, support, grad)
    assert fastmeta.last_backend("class_prototypes") == name
    (s64,) = leaves(support)
    want = prototypes_float64(s64, labels, C)
    (want_d_support,) = torch.autograd.grad(want, s64, grad.double())
    assert rel_err(prototypes, want) < TOL
    assert rel_err(d_support, want_d_support) < TOL


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("B,C,M,D", EPISODES)
def test_squared_distances_many_classes(name, B, C, M, D):
    require(["squared_distances"], name)
    queries = torch.randn(B, M, D, device="cuda", requires_grad=True)
    prototypes = torch.randn(B, C, D, device="cuda", requires_grad=True)
    grad = torch.randn(B, M, C, device="cuda")
    with fastmeta.use_backend(name):
        dist = F.squared_distances(queries, prototypes)
        got = torch.autograd.grad(dist, (queries, prototypes), grad)
    assert fastmeta.last_backend("squared_distances") == name
    q64, c64 = leaves(queries, prototypes)
    want = distances_float64(q64, c64)
    want_grads = torch.autograd.grad(want, (q64, c64), grad.double())
    assert rel_err(dist, want) < TOL
    for g, w in zip(got, want_grads):
        assert rel_err(g, w) < TOL


@pytest.mark.parametrize("distance", ("squared_euclidean", "euclidean", "cosine"))
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("B,C,M,D", EPISODES)
def test_prototypical_loss_many_classes(name, B, C, M, D, distance):
    """The fused loss (class_prototypes and prototypical_cross_entropy ops) of each
    distance: losses and the gradients of their mean for support, queries and tau."""
    require(["class_prototypes", "prototypical_cross_entropy"], name)
    support, support_labels, queries, query_labels = episode(B, C, M, D)
    support.requires_grad_(), queries.requires_grad_()
    tau = torch.tensor(0.37, device="cuda", requires_grad=True)
    with fastmeta.use_backend(name):
        losses, _ = F.prototypical_loss(
            support,
            support_labels,
            queries,
            query_labels,
            C,
            tau=tau,
            reduction="none",
            distance=distance,
        )
        grads = torch.autograd.grad(losses.mean(), (support, queries, tau))
    assert fastmeta.last_backend("class_prototypes") == name
    assert fastmeta.last_backend("prototypical_cross_entropy") == name
    s64, q64, t64 = leaves(support, queries, tau)
    c64 = prototypes_float64(s64, support_labels, C)
    if distance == "cosine":
        logits = t64 * torch.nn.functional.cosine_similarity(
            q64[:, :, None], c64[:, None], dim=-1, eps=1e-8
        )
    elif distance == "euclidean":  # random points: no zero distance
        logits = -t64 * distances_float64(q64, c64).sqrt()
    else:
        logits = -t64 * distances_float64(q64, c64)
    want = cross_entropy(logits.flatten(0, 1), query_labels.flatten(), reduction="none")
    want_grads = torch.autograd.grad(want.mean(), (s64, q64, t64))
    assert rel_err(losses, want.view(B, M)) < TOL
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) < TOL


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("B,M,N,O,K,L", READS)
def test_attention_read_many_queries(name, B, M, N, O, K, L):
    require(["attention_read"], name)
    inputs = [
        torch.softmax(torch.randn(B, M, N, device="cuda"), -1),
        torch.randn(B, N, O, K, device="cuda"),
        torch.randn(B, M, L, K, device="cuda"),
    ]
    inputs = [t.requires_grad_() for t in inputs]
    d_out = torch.randn(B, M, L, O, device="cuda")
    with fastmeta.use_backend(name):
        out = attention_read(*inputs)
        got = torch.autograd.grad(out, inputs, d_out)
    assert fastmeta.last_backend("attention_read") == name
    inputs64 = leaves(*inputs)
    want = attention_read_float64(*inputs64)
    want_grads = torch.autograd.grad(want, inputs64, d_out.double())
    assert rel_err(out, want) < 1e-5
    for arg, g, w in zip(("attention", "fast_weights", "x"), got, want_grads):
        assert rel_err(g, w) < TOL, arg  # d_attention: float32 sums over O*K terms


# ---------------------------------------------------------------- determinism


def protonet_step(name):
    """ProtoNet loss and distances forward and backward on `name`: every output."""
    torch.manual_seed(0)
    support, support_labels, queries, query_labels = episode(*EPISODES[1])
    support.requires_grad_(), queries.requires_grad_()
    tau = torch.tensor(0.37, device="cuda", requires_grad=True)
    C = EPISODES[1][1]
    with fastmeta.use_backend(name):
        losses, _ = F.prototypical_loss(
            support, support_labels, queries, query_labels, C, tau=tau, reduction="none"
        )
        prototypes = F.class_prototypes(support, support_labels, C)
        dist = F.squared_distances(queries, prototypes)
        total = losses.sum() + dist.mean()
        return (losses, dist, *torch.autograd.grad(total, (support, queries, tau)))


def gradient_mlp_step(name):
    torch.manual_seed(0)
    inputs = [t.cuda().requires_grad_() for t in (random_gradients(7, 100003), *mlp_parameters(20))]
    with fastmeta.use_backend(name):
        out = gradient_mlp(*inputs)
        return (out, *torch.autograd.grad(out, inputs, torch.randn_like(out)))


def gradient_lstm_step(name):
    torch.manual_seed(0)
    inputs = [
        t.cuda().requires_grad_() for t in (random_gradients(3, 5, 20011), *lstm_parameters(20))
    ]
    with fastmeta.use_backend(name):
        out = gradient_lstm(*inputs)
        return (out, *torch.autograd.grad(out, inputs, torch.randn_like(out)))


def attention_read_step(name):
    torch.manual_seed(0)
    B, M, N, O, K, L = READS[1]
    inputs = [
        torch.randn(B, M, N, device="cuda").softmax(-1).requires_grad_(),
        torch.randn(B, N, O, K, device="cuda", requires_grad=True),
        torch.randn(B, M, L, K, device="cuda", requires_grad=True),
    ]
    with fastmeta.use_backend(name):
        out = attention_read(*inputs)
        return (out, *torch.autograd.grad(out, inputs, torch.randn_like(out)))


@pytest.mark.parametrize(
    "step,ops,name",
    [
        (protonet_step, PROTONET_OPS, "cuda"),
        (protonet_step, PROTONET_OPS, "triton"),
        (gradient_mlp_step, ["gradient_mlp"], "triton"),
        (gradient_lstm_step, ["gradient_lstm"], "triton"),
        (attention_read_step, ["attention_read"], "triton"),
    ],
    ids=[
        "protonet-cuda",
        "protonet-triton",
        "gradient_mlp-triton",
        "gradient_lstm-triton",
        "attention_read-triton",
    ],
)
def test_two_runs_are_bitwise_equal(step, ops, name):
    require(ops, name)
    first, second = step(name), step(name)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i}"


# ---------------------------------------------------------------- > 2**31 elements


def cuda_rel_err(got, want) -> float:
    """rel_err on the GPU (no multi-GB copies to the host)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_attention_read_past_2_31_weight_elements(name):
    """fast_weights [1, 65, 4099, 8191] (8.7 GB): W[0, 64] starts past element 2**31.
    Every output checked against float64 computed one W[0, i] at a time."""
    require(["attention_read"], name)
    B, M, N, O, K, L = LARGE_READ
    torch.manual_seed(0)
    attention = torch.softmax(torch.randn(B, M, N, device="cuda"), -1)
    weights = torch.randn(B, N, O, K, device="cuda")
    x, d_out = torch.randn(B, M, L, K, device="cuda"), torch.randn(B, M, L, O, device="cuda")
    with fastmeta.use_backend(name):
        out = torch.ops.fastmeta.attention_read(attention, weights, x)
        d_attention, d_weights, d_x = torch.ops.fastmeta.attention_read_backward(
            d_out, attention, weights, x, True, True, True
        )
    a, x64, dout64 = attention[0].double(), x[0].double(), d_out[0].double()
    g = [dout64[j].T @ x64[j] for j in range(M)]  # G_j = dout_j^T x_j [O, K]
    want_out, want_d_x = torch.zeros_like(out[0], dtype=torch.float64), torch.zeros_like(x64)
    want_d_attention = torch.zeros_like(a)
    worst_d_weights = 0.0
    for i in range(N):
        w = weights[0, i].double()
        for j in range(M):
            want_out[j] += a[j, i] * x64[j] @ w.T
            want_d_x[j] += a[j, i] * dout64[j] @ w
            want_d_attention[j, i] = (w * g[j]).sum()
        want_d_weights = sum(a[j, i] * g[j] for j in range(M))
        worst_d_weights = max(worst_d_weights, cuda_rel_err(d_weights[0, i], want_d_weights))
    assert cuda_rel_err(out[0], want_out) < 1e-5
    assert cuda_rel_err(d_x[0], want_d_x) < TOL
    # each d_attention entry sums O K = 3.4e7 float32 products; a GEMM accumulating long
    # runs of them in order errs by up to about sqrt(O K) eps = 3e-4
    assert cuda_rel_err(d_attention[0], want_d_attention) < 1e-3
    assert worst_d_weights < 1e-5


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_inner_update_past_2_31_parameters(name):
    """P = 2**31 + 17 parameters (8.6 GB per [P] tensor), one task: no element left
    unwritten (outputs start as NaN), the last ones right, d_alpha summed over all."""
    require(["inner_update"], name)
    P = 2**31 + 17
    tail = slice(P - 5000, P)
    torch.manual_seed(0)
    theta, g = torch.randn(P, device="cuda"), torch.randn(1, P, device="cuda")
    alpha = torch.tensor(0.3, device="cuda")
    with fastmeta.use_backend(name):
        out = torch.ops.fastmeta.inner_update(theta, alpha, g)
        assert not out.isnan().any()
        want = theta[tail].double() - 0.3 * g[0, tail].double()
        assert cuda_rel_err(out[0, tail], want) < 1e-6
        del out
        go = g.roll(1, 1)  # an upstream gradient unlike g, in the output's freed memory
        d_theta, d_g, d_alpha = torch.ops.fastmeta.inner_update_backward(go, alpha, g, True, True)
    assert not d_theta.isnan().any() and not d_g.isnan().any()
    assert torch.equal(d_theta, go[0])  # one task: the sum over tasks is go itself
    assert cuda_rel_err(d_g[0, tail], -0.3 * go[0, tail].double()) < 1e-6
    chunks = zip(g[0].split(1 << 28), go[0].split(1 << 28))
    want_d_alpha = -sum((a.double() * b.double()).sum() for a, b in chunks)
    assert cuda_rel_err(d_alpha, want_d_alpha) < 1e-6


# ---------------------------------------------------------------- the race


def test_the_race_on_a_gpu_times_both_backends_and_keeps_the_numbers(racing, monkeypatch):
    """A default ProtoNet loss and attention_read step on CUDA race cuda against triton
    for each op and direction; each race reports both times (or a dropped backend and
    its error), and the results match float64 whichever backend won."""
    require(PROTONET_OPS + ("attention_read",), "cuda")
    require(PROTONET_OPS + ("attention_read",), "triton")
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    B, C, M, D = EPISODES[2]
    support, support_labels, queries, query_labels = episode(B, C, M, D)
    support.requires_grad_(), queries.requires_grad_()
    losses, _ = F.prototypical_loss(
        support, support_labels, queries, query_labels, C, reduction="none"
    )
    grads = torch.autograd.grad(losses.mean(), (support, queries))
    read_inputs = [
        torch.softmax(torch.randn(1, 9, 5, device="cuda"), -1).requires_grad_(),
        torch.randn(1, 5, 33, 40, device="cuda", requires_grad=True),
        torch.randn(1, 9, 1, 40, device="cuda", requires_grad=True),
    ]
    read = attention_read(*read_inputs)
    read_grads = torch.autograd.grad(read.sum(), read_inputs)
    outcomes = race.results()
    raced = {key[0] for key in outcomes}
    assert {"class_prototypes", "prototypical_cross_entropy", "attention_read"} <= raced
    for key, outcome in outcomes.items():
        assert outcome.winner in GPU_BACKENDS, key
        assert set(outcome.times) | set(outcome.dropped) == set(GPU_BACKENDS), key
        assert all(ms > 0 for ms in outcome.times.values()), key
    report = str(fastmeta.backends())
    assert "prototypical_cross_entropy cuda float32" in report, report
    s64, q64 = leaves(support, queries)
    logits = -distances_float64(q64, prototypes_float64(s64, support_labels, C))
    want = cross_entropy(logits.flatten(0, 1), query_labels.flatten(), reduction="none")
    assert rel_err(losses, want.view(B, M)) < TOL
    for g, w in zip(grads, torch.autograd.grad(want.mean(), (s64, q64))):
        assert rel_err(g, w) < TOL
    read64 = leaves(*read_inputs)
    want_read = attention_read_float64(*read64)
    assert rel_err(read, want_read) < 1e-5
    for g, w in zip(read_grads, torch.autograd.grad(want_read.sum(), read64)):
        assert rel_err(g, w) < TOL


# ---------------------------------------------------------------- device guard


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_wrappers_launch_on_the_inputs_gpu():
    """Every public Triton wrapper on cuda:1 while cuda:0 is current gives what it gives
    on cuda:0 (a launch on the current device would read another GPU's pointers)."""

    def outputs(name, calls):
        fn, args = calls[name]
        out = fn(*args)
        return out if isinstance(out, tuple) else (out,)

    torch.manual_seed(0)
    on_first = wrapper_calls("cuda:0")
    torch.manual_seed(0)
    on_second = wrapper_calls("cuda:1")
    with torch.cuda.device(0):
        for name in on_second:
            for got, want in zip(outputs(name, on_second), outputs(name, on_first)):
                assert got.device == torch.device("cuda:1"), name
                assert rel_err(got, want) < 1e-6, name
