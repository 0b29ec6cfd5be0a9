"""fastmeta's empty_classes option (functional.class_prototypes, prototypical_loss,
ProtoNet) against a plain-torch twin of torchmeta's get_prototypes and
prototypical_loss, written here from their documented math: a prototype is its
class's sum of support embeddings divided by the count clamped to >= 1 (zero for an
absent class); the loss is F.cross_entropy of the negated squared distances [B, C, M]."""

import pytest
import torch
import torch.nn.functional as TF
from conftest import rel_err
from torch import nn

import fastmeta
from fastmeta import functional as F

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def twin_get_prototypes(embeddings, targets, num_classes):
    """Each class's embeddings summed in support order (one example per step, as a
    scatter_add accumulates), divided by max(count, 1)."""
    B, S, D = embeddings.shape
    rows = torch.arange(B)
    sums = embeddings.new_zeros(B, num_classes, D)
    counts = embeddings.new_zeros(B, num_classes)
    for i in range(S):
        sums = sums.index_put((rows, targets[:, i]), embeddings[:, i], accumulate=True)
        counts = counts.index_put((rows, targets[:, i]), counts.new_ones(B), accumulate=True)
    return sums / torch.maximum(counts, torch.ones_like(counts))[..., None]


def twin_prototypical_loss(prototypes, embeddings, targets, **kwargs):
    """F.cross_entropy(-d, targets, **kwargs), d [B, C, M] by expand-subtract."""
    distances = ((prototypes[:, :, None, :] - embeddings[:, None, :, :]) ** 2).sum(-1)
    return TF.cross_entropy(-distances, targets, **kwargs)


def random_episodes(B, S, M, C, D, dtype, generator=None):
    """Random support labels (unbalanced, some classes absent), random query labels."""
    g = generator or torch.Generator().manual_seed(0)
    support = torch.randn(B, S, D, dtype=dtype, generator=g)
    targets = torch.randint(0, C, (B, S), generator=g)
    queries = torch.randn(B, M, D, dtype=dtype, generator=g)
    query_targets = torch.randint(0, C, (B, M), generator=g)
    return support, targets, queries, query_targets


# fastmeta's own API: an empty class raises by default, empty_classes="zero" gives
# torchmeta's zero prototype.


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_prototypes_empty_classes_zero(dtype):
    support, targets, _, _ = random_episodes(3, 9, 1, 6, 10, dtype)
    with pytest.raises(ValueError, match="has no support example in labels"):
        F.class_prototypes(support, targets, 6)
    got = F.class_prototypes(support, targets, 6, empty_classes="zero")
    assert torch.equal(got, twin_get_prototypes(support, targets, 6))
    unbatched = F.class_prototypes(support[1], targets[1], 6, empty_classes="zero")
    assert torch.equal(unbatched, got[1])
    assert torch.equal(F.get_prototypes(support, targets, 6, "zero"), got)


def test_class_prototypes_empty_classes_zero_half_and_gradients():
    support, targets, _, _ = random_episodes(2, 5, 1, 4, 6, torch.float64)
    half = F.class_prototypes(support.half(), targets, 4, empty_classes="zero")
    want = twin_get_prototypes(support.half().float(), targets, 4).half()
    assert half.dtype == torch.float16 and torch.equal(half, want)
    s = support.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: F.class_prototypes(x, targets, 4, empty_classes="zero"), (s,)
    )


def test_prototypical_loss_and_protonet_empty_classes_zero():
    support, targets, queries, query_targets = random_episodes(2, 6, 5, 4, 3, torch.float64)
    tau = 0.5
    protos = twin_get_prototypes(support, targets, 4)
    want = twin_prototypical_loss(protos * tau**0.5, queries * tau**0.5, query_targets)
    loss, accuracy = F.prototypical_loss(
        support, targets, queries, query_targets, 4, tau=tau, empty_classes="zero"
    )
    assert rel_err(loss, want) < 1e-12
    predictions = torch.cdist(queries, protos).argmin(-1)
    assert accuracy == predictions.eq(query_targets).double().mean()
    with pytest.raises(ValueError, match="no support example"):
        F.prototypical_loss(support, targets, queries, query_targets, 4)

    model = fastmeta.ProtoNet(nn.Identity(), tau=tau, empty_classes="zero").double()
    logits = model(support, targets, queries, num_classes=4)
    assert rel_err(logits, -tau * torch.cdist(queries, protos) ** 2) < 1e-12
    model_loss, _ = model.loss(support, targets, queries, query_targets, num_classes=4)
    assert rel_err(model_loss, want) < 1e-12
    with pytest.raises(ValueError, match="no support example"):
        fastmeta.ProtoNet(nn.Identity()).double()(support, targets, queries, num_classes=4)


def test_empty_classes_bad_value():
    support, targets, queries, query_targets = random_episodes(1, 4, 2, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="empty_classes must be one of"):
        F.class_prototypes(support, targets, 2, empty_classes="ignore")
    with pytest.raises(ValueError, match="empty_classes must be one of"):
        F.prototypical_loss(support, targets, queries, query_targets, 2, empty_classes=None)
    with pytest.raises(ValueError, match="fastmeta.ProtoNet: empty_classes"):
        fastmeta.ProtoNet(nn.Identity(), empty_classes="zeros")
