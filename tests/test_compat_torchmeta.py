"""fastmeta.compat.torchmeta against a plain-torch twin of torchmeta's get_prototypes
and prototypical_loss, written here from their documented math (torchmeta is not
installed): a prototype is its class's sum of support embeddings divided by the count
clamped to >= 1 (zero for an absent class); the loss is F.cross_entropy of the negated
squared distances [B, C, M] with the caller's keywords. Also fastmeta's own
empty_classes option (functional.class_prototypes, prototypical_loss, ProtoNet)."""

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from conftest import rel_err
from torch import nn

import fastmeta
import fastmeta.compat.torchmeta
from fastmeta import backend
from fastmeta import functional as F
from fastmeta.compat.torchmeta.utils import prototype
from fastmeta.compat.torchmeta.utils.prototype import (
    get_num_samples,
    get_prototypes,
    prototypical_loss,
)

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


def test_torchmeta_module_layout():
    from fastmeta.compat.torchmeta import utils
    from fastmeta.compat.torchmeta.utils import get_prototypes as from_utils

    assert fastmeta.compat.torchmeta.utils.prototype is prototype
    assert from_utils is get_prototypes is utils.prototype.get_prototypes
    assert utils.prototypical_loss is prototypical_loss
    assert utils.get_num_samples is get_num_samples
    assert prototype.__all__ == ["get_num_samples", "get_prototypes", "prototypical_loss"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_get_prototypes_equals_twin_bitwise(dtype):
    """The same sums in the same order and the same division: equal bit for bit, absent
    classes included (S=9 labels over C=6 classes, three tasks)."""
    support, targets, _, _ = random_episodes(3, 9, 1, 6, 33, dtype)
    got = get_prototypes(support, targets, 6)
    want = twin_get_prototypes(support, targets, 6)
    assert got.shape == (3, 6, 33) and got.dtype == dtype
    assert torch.equal(got, want)


def test_absent_class_gives_zero_prototype():
    support = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    targets = torch.tensor([[0, 3, 0, 3]])  # classes 1, 2 and 4 absent
    got = get_prototypes(support, targets, 5)
    assert torch.equal(got[0, [1, 2, 4]], torch.zeros(3, 3))
    assert torch.equal(got[0, 0], (support[0, 0] + support[0, 2]) / 2)
    assert torch.equal(got[0, 3], (support[0, 1] + support[0, 3]) / 2)
    # more classes than support examples (torchmeta allows it; fastmeta's own op raises)
    assert get_prototypes(support, targets, 40).shape == (1, 40, 3)


def test_get_num_samples():
    targets = torch.tensor([[0, 2, 2, 0, 2], [1, 1, 1, 1, 1]])
    counts = get_num_samples(targets, 4)
    assert counts.dtype == torch.int64 and counts.tolist() == [[2, 0, 3, 0], [0, 5, 0, 0]]
    as_float = get_num_samples(targets, 4, dtype=torch.float32)
    assert as_float.dtype == torch.float32 and not as_float.requires_grad
    assert torch.equal(as_float, counts.float())
    assert torch.equal(get_num_samples(targets, np.int64(4)), counts)  # as torchmeta takes it


LOSS_KWARGS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"ignore_index": 2},
    {"weight": "random"},
    {"weight": "random", "label_smoothing": 0.2, "ignore_index": 0, "reduction": "sum"},
]


def _kwargs(kwargs, C, dtype):
    out = dict(kwargs)
    if out.get("weight") == "random":
        out["weight"] = torch.rand(C, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", LOSS_KWARGS, ids=lambda k: "-".join(k) or "default")
def test_prototypical_loss_and_gradients_equal_twin(dtype, kwargs):
    """The loss and its gradients (w.r.t. the support and query embeddings, through
    get_prototypes) equal the twin's, every F.cross_entropy keyword reaching the loss."""
    C = 7
    support, targets, queries, query_targets = random_episodes(4, 12, 10, C, 40, dtype)
    query_targets[0, :3] = -100  # F.cross_entropy's default ignore_index
    kwargs = _kwargs(kwargs, C, dtype)
    results = []
    for get, loss_fn in (
        (get_prototypes, prototypical_loss),
        (twin_get_prototypes, twin_prototypical_loss),
    ):
        s, q = support.clone().requires_grad_(), queries.clone().requires_grad_()
        y = query_targets
        if kwargs.get("ignore_index", -100) != -100:
            y = y.clamp_min(0)  # a -100 would be out of range there
        loss = loss_fn(get(s, targets, C), q, y, **kwargs)
        grads = torch.autograd.grad(loss.sum(), (s, q))
        results.append((loss, *grads))
    for got, want in zip(*results):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_err(got, want) < TOL[dtype]
    if kwargs.get("reduction") == "none":
        assert results[0][0].shape == (4, 10)


@pytest.mark.parametrize(
    "kwargs,op",
    [
        ({}, "prototypical_cross_entropy"),
        ({"reduction": "none", "ignore_index": 1}, "prototypical_cross_entropy"),
        ({"label_smoothing": 0.1}, "squared_distances"),
        ({"weight": torch.ones(3)}, "squared_distances"),
    ],
)
def test_fused_ops_underneath(kwargs, op):
    """Integer targets with no keyword but reduction and ignore_index: the fused
    cross-entropy; any other keyword: the fused distances, then F.cross_entropy."""
    ops = ("prototypical_cross_entropy", "squared_distances")
    backend.forget_last_backends(ops)
    prototypical_loss(**_loss_args(), **kwargs)
    assert [backend.last_backend(name) is not None for name in ops] == [name == op for name in ops]


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_probability_targets(dtype):
    """Soft targets [B, C, M], as F.cross_entropy takes them (the general path)."""
    support, targets, queries, _ = random_episodes(2, 6, 5, 4, 9, dtype)
    soft = torch.softmax(torch.randn(2, 4, 5, dtype=dtype), dim=1)
    protos = get_prototypes(support, targets, 4)
    got = prototypical_loss(protos, queries, soft, label_smoothing=0.05)
    want = twin_prototypical_loss(protos, queries, soft, label_smoothing=0.05)
    assert rel_err(got, want) < TOL[dtype]


def test_second_order_gradients_equal_twin():
    """Grad of grad (MAML over a ProtoNet head) through both paths, float64."""
    support, targets, queries, query_targets = random_episodes(2, 8, 6, 4, 5, torch.float64)
    for kwargs in ({}, {"label_smoothing": 0.1}):
        results = []
        for get, loss_fn in (
            (get_prototypes, prototypical_loss),
            (twin_get_prototypes, twin_prototypical_loss),
        ):
            s, q = support.clone().requires_grad_(), queries.clone().requires_grad_()
            loss = loss_fn(get(s, targets, 4), q, query_targets, **kwargs)
            (g_s,) = torch.autograd.grad(loss, s, create_graph=True)
            results.append(torch.autograd.grad(g_s.pow(2).sum(), (s, q)))
        for got, want in zip(*results):
            assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("B,S,M,C", [(1, 1, 1, 1), (1, 25, 75, 5), (5, 4, 3, 9), (2, 60, 7, 20)])
def test_batched_shapes(B, S, M, C):
    support, targets, queries, query_targets = random_episodes(B, S, M, C, 16, torch.float64)
    protos = get_prototypes(support, targets, C)
    assert protos.shape == (B, C, 16)
    assert torch.equal(protos, twin_get_prototypes(support, targets, C))
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (B, M))):
        got = prototypical_loss(protos, queries, query_targets, reduction=reduction)
        want = twin_prototypical_loss(protos, queries, query_targets, reduction=reduction)
        assert got.shape == shape and rel_err(got, want) < 1e-12


def test_every_target_ignored_gives_nan_as_torch():
    support, targets, queries, _ = random_episodes(1, 4, 3, 2, 5, torch.float64)
    protos = get_prototypes(support, targets, 2)
    ignored = torch.full((1, 3), -100)
    assert torch.isnan(prototypical_loss(protos, queries, ignored))
    assert torch.isnan(twin_prototypical_loss(protos, queries, ignored))
    assert prototypical_loss(protos, queries, ignored, reduction="sum") == 0


def test_int32_targets_and_mixed_float_dtypes():
    """More permissive than torchmeta (which needs int64 targets and, for the
    distances, promotes mixed float dtypes): same numbers as the twin on int64 input."""
    support, targets, queries, query_targets = random_episodes(2, 6, 5, 3, 4, torch.float64)
    protos = get_prototypes(support, targets.int(), 3)
    assert torch.equal(protos, twin_get_prototypes(support, targets, 3))
    got = prototypical_loss(protos.float(), queries, query_targets.int())
    want = twin_prototypical_loss(protos.float().double(), queries, query_targets)
    assert got.dtype == torch.float64 and rel_err(got, want) < 1e-12


def test_validation_off_and_no_host_reads(monkeypatch):
    """With fastmeta's value checks off nothing reads a tensor on the host (no sync on
    a GPU), on the fused path and the general one: Tensor.item, tolist, __bool__,
    __int__ and __float__ raise here."""
    support, targets, queries, query_targets = random_episodes(2, 6, 5, 3, 4, torch.float32)
    losses = {}

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    with fastmeta.validate_args(False):
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, host_read)
        for smoothing in (None, 0.1):
            kwargs = {} if smoothing is None else {"label_smoothing": smoothing}
            s = support.clone().requires_grad_()
            protos = get_prototypes(s, targets, 3)
            losses[smoothing] = prototypical_loss(protos, queries, query_targets, **kwargs)
            losses[smoothing].backward()
            get_num_samples(targets, 3)
        monkeypatch.undo()
    for smoothing, loss in losses.items():
        kwargs = {} if smoothing is None else {"label_smoothing": smoothing}
        protos = twin_get_prototypes(support, targets, 3)
        assert (
            rel_err(loss, twin_prototypical_loss(protos, queries, query_targets, **kwargs)) < 1e-6
        )


def test_compiles_fullgraph():
    support, targets, queries, query_targets = random_episodes(2, 6, 5, 3, 4, torch.float64)

    def step(support, targets, queries, query_targets):
        protos = get_prototypes(support, targets, 3)
        fused = prototypical_loss(protos, queries, query_targets)
        smoothed = prototypical_loss(protos, queries, query_targets, label_smoothing=0.1)
        return fused + smoothed

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s = support.clone().requires_grad_()
    (got,) = torch.autograd.grad(compiled(s, targets, queries, query_targets), s)
    s = support.clone().requires_grad_()
    (want,) = torch.autograd.grad(step(s, targets, queries, query_targets), s)
    assert rel_err(got, want) < 1e-12


def _loss_args(**changes):
    support, targets, queries, query_targets = random_episodes(2, 6, 5, 3, 4, torch.float32)
    args = {
        "prototypes": get_prototypes(support, targets, 3),
        "embeddings": queries,
        "targets": query_targets,
    }
    args.update(changes)
    return args


BAD_GET_PROTOTYPES = [
    ((torch.randn(6, 4), torch.zeros(6, dtype=torch.long), 3), ValueError, "embeddings must be"),
    ((torch.randn(2, 6, 4), torch.zeros(2, 5, dtype=torch.long), 3), ValueError, "[2, 6]"),
    ((torch.randn(2, 6, 4), torch.zeros(2, 6), 3), TypeError, "integer"),
    ((torch.randn(2, 6, 4).long(), torch.zeros(2, 6, dtype=torch.long), 3), TypeError, "float"),
    ((torch.randn(2, 6, 4), torch.zeros(2, 6, dtype=torch.long), 0), ValueError, "num_classes"),
    ((torch.randn(2, 6, 4), torch.full((2, 6), 3), 3), ValueError, "targets holds 3 at"),
    ((torch.randn(2, 6, 4), torch.full((2, 6), -1), 3), ValueError, "targets holds -1 at"),
    (
        (torch.randn(2, 6, 4), torch.zeros(2, 6, dtype=torch.long, device="meta"), 3),
        ValueError,
        "meta",
    ),
]


@pytest.mark.parametrize("args,error,match", BAD_GET_PROTOTYPES)
def test_get_prototypes_bad_input(args, error, match):
    with pytest.raises(error, match="fastmeta.compat.torchmeta.get_prototypes") as info:
        get_prototypes(*args)
    assert match in str(info.value)


BAD_LOSS = [
    ({"embeddings": torch.randn(5, 4)}, {}, ValueError, "embeddings must be [B, N, D]"),
    ({"embeddings": torch.randn(2, 5, 3)}, {}, ValueError, "different embedding sizes"),
    ({"embeddings": torch.randn(1, 5, 4)}, {}, ValueError, "different numbers of episodes"),
    ({"prototypes": torch.randn(2, 0, 4)}, {}, ValueError, "no class"),
    ({"targets": torch.zeros(2, 4, dtype=torch.long)}, {}, ValueError, "shape [2, 5]"),
    ({"targets": torch.full((2, 5), 3)}, {}, ValueError, "targets holds 3 at index [0, 0]"),
    ({"targets": torch.full((2, 5), -100)}, {"ignore_index": 1}, ValueError, "holds -100"),
    ({"targets": torch.rand(2, 5, 3)}, {}, ValueError, "must be [B, C, M] = [2, 3, 5]"),
]


@pytest.mark.parametrize("changes,kwargs,error,match", BAD_LOSS)
def test_prototypical_loss_bad_input(changes, kwargs, error, match):
    with pytest.raises(error, match="fastmeta.compat.torchmeta.prototypical_loss") as info:
        prototypical_loss(**_loss_args(**changes), **kwargs)
    assert match in str(info.value)


def test_prototypical_loss_bad_keywords_raise_as_torch():
    with pytest.raises(TypeError):  # F.cross_entropy's own error, as in torchmeta
        prototypical_loss(**_loss_args(), temperature=2.0)
    with pytest.raises(ValueError, match="reduction"):
        prototypical_loss(**_loss_args(), reduction="average")


# A torchmeta ProtoNet training script (the shape of torchmeta's examples/protonet/train.py),
# run once against the twin installed as `torchmeta` and once with the import changed.
TRAIN_SCRIPT = """
import torch
from torchmeta.utils.prototype import get_prototypes, prototypical_loss


def train(model, episodes, num_ways):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for (train_inputs, train_targets), (test_inputs, test_targets) in episodes:
        model.zero_grad()
        train_embeddings = model(train_inputs)
        test_embeddings = model(test_inputs)
        prototypes = get_prototypes(train_embeddings, train_targets, num_ways)
        loss = prototypical_loss(prototypes, test_embeddings, test_targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
"""


class PrototypicalNetwork(nn.Module):
    """A small conv embedding of [B, N, 1, 8, 8] inputs -> [B, N, 32]."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.encoder = nn.Sequential(*block(1, 8), nn.MaxPool2d(2), *block(8, 8), nn.MaxPool2d(2))

    def forward(self, inputs):
        embeddings = self.encoder(inputs.view(-1, *inputs.shape[2:]))
        return embeddings.view(*inputs.shape[:2], -1)


def synthetic_episodes(steps, tasks=4, ways=5, shots=3, queries=4):
    """Each class a fixed random 8x8 pattern plus noise; labels shuffled per task."""
    g = torch.Generator().manual_seed(3)
    patterns = torch.randn(50, 1, 8, 8, generator=g)
    episodes = []
    for _ in range(steps):
        classes = torch.stack([torch.randperm(50, generator=g)[:ways] for _ in range(tasks)])
        split = []
        for n in (shots, queries):
            labels = torch.arange(ways).repeat(n)
            labels = torch.stack(
                [labels[torch.randperm(len(labels), generator=g)] for _ in classes]
            )
            x = patterns[classes.gather(1, labels)]
            split.append((x + 2.0 * torch.randn(x.shape, generator=g), labels))
        episodes.append(tuple(split))
    return episodes


def _run_script(source, name):
    namespace = {}
    exec(compile(source, name, "exec"), namespace)
    torch.manual_seed(0)
    model = PrototypicalNetwork()
    return namespace["train"](model, synthetic_episodes(16), num_ways=5)


def test_torchmeta_training_loop_with_only_the_import_changed(monkeypatch):
    twin = types.ModuleType("torchmeta.utils.prototype")
    twin.get_prototypes, twin.prototypical_loss = twin_get_prototypes, twin_prototypical_loss
    package = types.ModuleType("torchmeta")
    package.utils = types.ModuleType("torchmeta.utils")
    package.utils.prototype = twin
    for name, module in (
        ("torchmeta", package),
        ("torchmeta.utils", package.utils),
        ("torchmeta.utils.prototype", twin),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    migrated = TRAIN_SCRIPT.replace("from torchmeta.", "from fastmeta.compat.torchmeta.")
    changed = set(migrated.splitlines()) - set(TRAIN_SCRIPT.splitlines())
    assert changed == {
        "from fastmeta.compat.torchmeta.utils.prototype import get_prototypes, prototypical_loss"
    }
    want = _run_script(TRAIN_SCRIPT, "torchmeta_train.py")
    got = _run_script(migrated, "fastmeta_train.py")
    assert sum(got[-3:]) < 0.8 * sum(got[:3])  # it learns
    assert got == pytest.approx(want, rel=1e-4)


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
