"""The hot path on a GPU: no host-device syncs (torch.cuda.set_sync_debug_mode
("error") raises at any syncing call), deferred value checks (fastmeta/validation.py),
CUDA graph capture and torch.compile(mode="reduce-overhead") of a ProtoNet step.
tests/test_hot_path.py checks the same paths on CPU by counting syncing ATen calls.
Every test is skipped without a CUDA GPU.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as TF
from test_compiled_steps import ProtoNetStep, compiled_equals_eager
from test_gpu_kernels import GPU_BACKENDS, PROTONET_OPS, require

import fastmeta
from fastmeta import functional as F
from fastmeta.models import conv4

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU checks: no CUDA GPU is visible"
)


@contextlib.contextmanager
def no_sync_allowed():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _episode(B=2, C=5, K=2, Q=3, D=64):
    support = torch.randn(B, C * K, D, device="cuda", requires_grad=True)
    queries = torch.randn(B, C * Q, D, device="cuda", requires_grad=True)
    ys = torch.arange(C, device="cuda").repeat(K).expand(B, -1).contiguous()
    yq = torch.arange(C, device="cuda").repeat(Q).expand(B, -1).contiguous()
    return support, ys, queries, yq, C


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_prototypical_loss_makes_no_sync(name, validate):
    require(PROTONET_OPS, name)
    support, ys, queries, yq, C = _episode()

    def step():
        with fastmeta.use_backend(name), fastmeta.validate_args(validate):
            loss, accuracy = F.prototypical_loss(support, ys, queries, yq, C)
            loss.backward()

    step()  # warm-up: Triton compiles, caches fill
    with no_sync_allowed():
        step()
    fastmeta.raise_deferred_errors()


def test_gpu_training_steps_make_no_sync():
    torch.manual_seed(0)
    protonet = fastmeta.ProtoNet(conv4(), learn_tau=True).cuda()
    metanet = fastmeta.MetaNetwork(ways=3).cuda()
    linear = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    maml = fastmeta.MAML(linear.cuda(), lr=0.3)
    optimizer = torch.optim.SGD(
        [*protonet.parameters(), *metanet.parameters(), *maml.parameters()], lr=1e-3
    )
    x = torch.randn(2, 6, 1, 28, 28, device="cuda")
    y = torch.arange(3, device="cuda").repeat(2).expand(2, -1).contiguous()
    xs, ys = torch.randn(5, 6, 4, device="cuda"), torch.randint(0, 3, (5, 6), device="cuda")

    def step():
        optimizer.zero_grad()
        protonet.loss(x, y, x, y, num_classes=3)[0].backward()
        metanet.loss(x, y, x, y)[0].backward()
        learner = maml.adapt_batch(xs, ys, TF.cross_entropy, steps=2)
        TF.cross_entropy(learner(xs).flatten(0, 1), ys.flatten()).backward()
        optimizer.step()

    step()  # warm-up: races, Triton compiles
    with no_sync_allowed():
        step()
    fastmeta.raise_deferred_errors()


def test_gpu_a_bad_label_raises_after_the_call_without_a_sync():
    support, ys, queries, yq, C = _episode()
    yq = yq.clone()
    yq[1, 4] = C
    F.prototypical_loss(support, ys, queries, yq, C)  # warm-up of the good path
    fastmeta.raise_deferred_errors()
    yq_bad = yq.clone()
    with no_sync_allowed():
        F.prototypical_loss(support, ys, queries, yq_bad, C)  # no error yet, no wait
    with pytest.raises(ValueError) as raised:
        fastmeta.raise_deferred_errors()
    message = str(raised.value)
    assert f"query_labels holds {C} at index [1, 4]" in message
    assert "found on the device after the call returned" in message
    fastmeta.raise_deferred_errors()  # nothing left pending


def test_gpu_a_later_call_reports_a_finished_bad_check():
    support, ys, queries, yq, C = _episode()
    ys_bad = ys.clone()
    ys_bad[0][ys_bad[0] == 1] = 0  # class 1 of episode 0 has no support example
    F.prototypical_loss(support, ys_bad, queries, yq, C)
    torch.cuda.synchronize()  # the flag's copy has landed
    with pytest.raises(ValueError, match="class 1 of episode 0 has no support example"):
        F.prototypical_loss(support, ys, queries, yq, C)  # a good call reads it
    fastmeta.raise_deferred_errors()


def test_gpu_cuda_graph_captures_the_loss_forward_backward():
    support, ys, queries, yq, C = _episode()
    static = [t.detach().clone().requires_grad_(t.requires_grad) for t in (support, queries)]

    def step():
        loss, _ = F.prototypical_loss(static[0], ys, static[1], yq, C)
        return (loss, *torch.autograd.grad(loss, static))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside capture (races, compiles)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        static[0].copy_(support)
        static[1].copy_(queries)
    graph.replay()
    torch.cuda.synchronize()
    loss, _ = F.prototypical_loss(support, ys, queries, yq, C)
    expected = (loss, *torch.autograd.grad(loss, (support, queries)))
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gpu_protonet_step_compiles_with_reduce_overhead():
    torch.manual_seed(0)
    model = fastmeta.ProtoNet(conv4(), learn_tau=True).cuda()
    batch = (
        torch.randn(2, 6, 1, 28, 28, device="cuda"),
        torch.arange(3, device="cuda").repeat(2).expand(2, -1).contiguous(),
        torch.randn(2, 9, 1, 28, 28, device="cuda"),
        torch.arange(3, device="cuda").repeat(3).expand(2, -1).contiguous(),
    )
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled_equals_eager(
            lambda: ProtoNetStep(model), batch, tol=1e-4, backend="inductor", mode="reduce-overhead"
        )


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_tf32_exactly_when_the_matmul_precision_allows_it(name):
    """ "highest": IEEE float32 products (tight against float64); "high": TF32 tensor-core
    products (looser, and measurably different) in the cuda GEMMs and the Triton dots."""
    require(PROTONET_OPS, name)
    support, ys, queries, yq, C = _episode(B=2, C=7, K=3, Q=9, D=1600)
    s64, q64 = (t.detach().double().requires_grad_() for t in (support, queries))
    with fastmeta.use_backend("reference"):
        want, _ = F.prototypical_loss(s64, ys, q64, yq, C, reduction="none")
    results = {}
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            with fastmeta.use_backend(name):
                results[precision], _ = F.prototypical_loss(
                    support, ys, queries, yq, C, reduction="none"
                )
    finally:
        torch.set_float32_matmul_precision(before)
    ieee, tf32 = results["highest"].double(), results["high"].double()
    assert ((ieee - want).norm() / want.norm()) < 1e-5
    assert ((tf32 - want).norm() / want.norm()) < 1e-2
    assert ((tf32 - ieee).norm() / ieee.norm()) > 1e-6  # TF32 did run
