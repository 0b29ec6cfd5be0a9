"""Mixed precision: the ProtoNet ops under torch.autocast, and the loss's float32
intermediates for half embeddings. (float16/bfloat16 forward and gradients of every
ProtoNet op on every backend against the float64 oracle: tests/test_conformance.py.)"""

from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICES
from torch.profiler import ProfilerActivity, profile

from fastmeta import functional as F

AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _episode(device, B=2, C=3, K=2, Q=4, D=6):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, D).to(device)
    xs, xq = torch.randn(B, C * K, 5, device=device), torch.randn(B, C * Q, 5, device=device)
    ys = torch.arange(C, device=device).repeat(K).expand(B, -1).contiguous()
    yq = torch.randint(0, C, (B, C * Q), device=device)
    return encoder, xs, ys, xq, yq, C


@pytest.mark.parametrize("device", DEVICES)
def test_under_autocast_the_protonet_ops_run_in_float32(device):
    """As torch does for cdist, log_softmax, cross_entropy and cosine_similarity: the
    encoder runs in the autocast dtype, the ProtoNet ops cast it to float32, and the
    parameters' gradients come back in float32, close to a run without autocast."""
    encoder, xs, ys, xq, yq, C = _episode(device)
    params = list(encoder.parameters())
    loss32, _ = F.prototypical_loss(encoder(xs), ys, encoder(xq), yq, C)
    want = torch.autograd.grad(loss32, params)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE[device]):
        support, queries = encoder(xs), encoder(xq)
        assert support.dtype == AUTOCAST_DTYPE[device]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss, accuracy = F.prototypical_loss(support, ys, queries, yq, C)
        prototypes = F.class_prototypes(support, ys, C)
        outputs = (
            loss,
            prototypes,
            F.squared_distances(queries, prototypes),
            F.cosine_similarities(queries, prototypes),
            F.prototypical_cross_entropy(prototypes, queries, yq),
        )
    assert all(o.dtype == torch.float32 for o in outputs)
    assert "fastmeta::prototypical_loss" in {e.name for e in prof.events()}
    got = torch.autograd.grad(loss, params)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_the_loss_keeps_its_intermediates_in_float32_for_half_embeddings(device):
    support = torch.randn(2, 6, 8, device=device, dtype=torch.bfloat16)
    queries = torch.randn(2, 5, 8, device=device, dtype=torch.bfloat16)
    ys = torch.arange(3, device=device).repeat(2).expand(2, -1).contiguous()
    yq = torch.randint(0, 3, (2, 5), device=device)
    tau = torch.ones((), device=device, dtype=torch.bfloat16)
    losses, predictions, prototypes, softmax = torch.ops.fastmeta.prototypical_loss(
        support, ys, queries, yq, 3, tau
    )
    assert losses.dtype == torch.bfloat16 and predictions.dtype == torch.int64
    assert prototypes.dtype == softmax.dtype == torch.float32
    torch.testing.assert_close(prototypes, F.class_prototypes(support.float(), ys, 3))


@pytest.mark.parametrize(
    "precision, on_gpu", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")]
)
def test_triton_dots_use_tf32_exactly_where_the_matmul_precision_allows_it(precision, on_gpu):
    """dot_precision: "tf32" for GPU tensors when torch lets float32 matmuls use TF32,
    else "ieee" (always on CPU, where the interpreter runs). tests/test_gpu_hot_path.py
    checks the numbers on a GPU."""
    tiles = pytest.importorskip("fastmeta.kernels.tiles")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert tiles.dot_precision(SimpleNamespace(is_cuda=True)) == on_gpu
        assert tiles.dot_precision(torch.empty(1)) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)
