"""The per-step hot path: no syncing calls, value checks without a stall, the eager
fast path equal to the custom op path (fastmeta/validation.py, fastmeta/ops/eager.py).

The profiler sees every ATen call, including those made inside C++ kernels, so a
syncing call (`aten::_local_scalar_dense` under item()/int()/bool(), nonzero, ...)
shows here on CPU exactly where it would stall a GPU stream. The training steps use
SGD: Adam reads its step counters with item(), host tensors that stall nothing on a
GPU (capturable=False) but would count here.
"""

import pytest
import torch
import torch.nn.functional as TF
from conftest import usable_backend_devices
from op_samples import SAMPLES
from torch.profiler import ProfilerActivity, profile

import fastmeta
from fastmeta import functional as F
from fastmeta import validation
from fastmeta.models import conv4
from fastmeta.ops.class_prototypes import class_prototypes
from fastmeta.ops.cosine_similarities import cosine_similarities
from fastmeta.ops.eager import eager_path
from fastmeta.ops.prototypical_cross_entropy import prototypical_cross_entropy
from fastmeta.ops.prototypical_loss import prototypical_loss, prototypical_loss_op
from fastmeta.ops.squared_distances import squared_distances

SYNCING = {
    "aten::_local_scalar_dense",  # under item(), int(t), float(t), bool(t)
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::equal",
}


def syncing_calls(fn) -> list[str]:
    """The syncing ATen calls one run of fn makes (after a warm-up run)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in SYNCING]


# the backends that run the ProtoNet ops on CPU tensors here (the profiler counts CPU calls)
CPU_BACKENDS = [b for b, d in usable_backend_devices("prototypical_cross_entropy") if d == "cpu"]


def _episode(B=2, C=3, K=2, Q=4, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(B, C * K, D, generator=g, requires_grad=True)
    queries = torch.randn(B, C * Q, D, generator=g, requires_grad=True)
    ys = torch.stack([torch.randperm(C * K, generator=g) % C for _ in range(B)])
    yq = torch.randint(0, C, (B, C * Q), generator=g)
    return support, ys, queries, yq, C


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize(
    "name,distance",
    [
        (name, distance)
        for name in CPU_BACKENDS
        for distance in ("squared_euclidean", "euclidean", "cosine")
        # the reference's euclidean distance finds the entries to refine by nonzero (as
        # squared_distances' reference does); the fused kernels never sync
        if not (name == "reference" and distance == "euclidean")
    ],
)
def test_prototypical_loss_forward_backward_makes_no_syncing_call(name, distance, validate):
    support, ys, queries, yq, C = _episode()

    def step():
        with fastmeta.use_backend(name), fastmeta.validate_args(validate):
            loss, accuracy = F.prototypical_loss(support, ys, queries, yq, C, distance=distance)
            loss.backward()

    assert syncing_calls(step) == []


@pytest.mark.parametrize("validate", [True, False])
def test_protonet_training_step_makes_no_syncing_call(validate):
    model = fastmeta.ProtoNet(conv4(), learn_tau=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    support_x, query_x = torch.randn(2, 6, 1, 28, 28, generator=g), torch.randn(2, 9, 1, 28, 28)
    support_y = torch.arange(3).repeat(2).expand(2, -1)
    query_y = torch.arange(3).repeat(3).expand(2, -1)

    def step():
        with fastmeta.validate_args(validate):
            optimizer.zero_grad()
            loss, _ = model.loss(support_x, support_y, query_x, query_y, num_classes=3)
            loss.backward()
            optimizer.step()

    assert syncing_calls(step) == []


@pytest.mark.parametrize("meta", ["MAML", "MetaSGD"])
def test_maml_meta_step_makes_no_syncing_call(meta):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    maml = getattr(fastmeta, meta)(model, lr=0.3)
    optimizer = torch.optim.SGD(maml.parameters(), lr=0.01)
    xs, ys = torch.randn(5, 6, 4), torch.randint(0, 3, (5, 6))
    xq, yq = torch.randn(5, 9, 4), torch.randint(0, 3, (5, 9))

    def step():
        optimizer.zero_grad()
        learner = maml.adapt_batch(xs, ys, TF.cross_entropy, steps=2)
        TF.cross_entropy(learner(xq).flatten(0, 1), yq.flatten()).backward()
        optimizer.step()

    assert syncing_calls(step) == []


@pytest.mark.parametrize("validate", [True, False])
def test_metanetwork_step_makes_no_syncing_call(validate):
    torch.manual_seed(0)
    model = fastmeta.MetaNetwork(ways=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    xs, ys = torch.randn(2, 3, 1, 28, 28), torch.arange(3).expand(2, -1)
    xq, yq = torch.randn(2, 4, 1, 28, 28), torch.randint(0, 3, (2, 4))

    def step():
        with fastmeta.validate_args(validate):
            optimizer.zero_grad()
            loss, _ = model.loss(xs, ys, xq, yq)
            loss.backward()
            optimizer.step()

    assert syncing_calls(step) == []


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "query label too large",
            "query_labels holds 3 at index [1, 2], outside [0, num_classes=3)",
        ),
        ("negative support label", "support_labels holds -1 at index [0, 4]"),
        ("empty class", "class 2 of episode 1 has no support example in support_labels"),
    ],
)
def test_a_bad_label_raises_at_the_call_naming_the_argument(case, message):
    support, ys, queries, yq, C = _episode()
    ys, yq = ys.clone(), yq.clone()
    if case == "query label too large":
        yq[1, 2] = 3
    elif case == "negative support label":
        ys[0, 4] = -1
    else:
        ys[1][ys[1] == 2] = 0
    with pytest.raises(ValueError) as raised:
        F.prototypical_loss(support, ys, queries, yq, C)
    assert message in str(raised.value)


def test_validation_off_skips_value_checks_and_the_switches_nest():
    support, ys, queries, yq, C = _episode()
    ys = ys.clone()
    ys[1][ys[1] == 2] = 0  # class 2 of episode 1 empty: NaN prototypes, no error
    assert fastmeta.validation.is_validating()
    with fastmeta.validate_args(False):
        assert not fastmeta.validation.is_validating()
        with fastmeta.use_backend("reference"):
            loss, _ = F.prototypical_loss(support, ys, queries, yq, C, reduction="none")
        with fastmeta.validate_args(True):
            with pytest.raises(ValueError, match="no support example"):
                F.prototypical_loss(support, ys, queries, yq, C)
        assert not fastmeta.validation.is_validating()
    assert fastmeta.validation.is_validating()
    assert torch.isnan(loss[1]).all() and torch.isfinite(loss[0]).all()
    fastmeta.set_validate_args(False)
    try:
        assert not fastmeta.validation.is_validating()
    finally:
        fastmeta.set_validate_args(True)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's 0 / 0
@pytest.mark.parametrize("case", ["label too large", "negative label", "empty class"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_an_unchecked_bad_label_gives_an_error_or_nan_never_a_crash(name, case):
    support, ys, queries, yq, C = _episode()
    ys, yq = ys.clone(), yq.clone()
    if case == "label too large":
        ys[0, 1], yq[1, 0] = C + 5, C
    elif case == "negative label":
        ys[1, 0], yq[0, 2] = -3, -1
    else:
        ys[1][ys[1] == 2] = 0
    with fastmeta.use_backend(name), fastmeta.validate_args(False):
        try:
            losses, _ = F.prototypical_loss(support, ys, queries, yq, C, reduction="none")
            grads = torch.autograd.grad(losses.sum(), (support, queries))
        except (RuntimeError, IndexError) as error:  # kernels that check while reading
            assert any(w in str(error) for w in ("outside", "index", "no support example"))
            return
    assert not all(torch.isfinite(t).all() for t in (losses, *grads))


def test_value_checks_are_skipped_for_meta_tensors():
    support, ys, queries, yq, C = (t.to("meta") if torch.is_tensor(t) else t for t in _episode())
    losses, predictions, prototypes, softmax = prototypical_loss_op(
        support, ys, queries, yq, C, torch.ones((), device="meta")
    )
    assert losses.shape == (2, 12) and prototypes.shape == (2, 3, 5)


EAGER_ENTRIES = {  # op name -> its public entry (eager fast path or the custom op)
    "class_prototypes": class_prototypes,
    "squared_distances": squared_distances,
    "cosine_similarities": cosine_similarities,
    "prototypical_cross_entropy": prototypical_cross_entropy,
    "prototypical_loss": prototypical_loss,
}


def _outputs_and_grads(sample, run, args, create_graph):
    result = run(*args)
    outputs = [result] if not sample.outputs else [result[i] for i in sample.outputs]
    inputs = [args[i] for i in sample.grad_args]
    cotangents = [torch.ones_like(o) for o in outputs]
    grads = torch.autograd.grad(outputs, inputs, cotangents, create_graph=create_graph)
    live = [g for g in grads if g.requires_grad]  # a linear op's gradients are constants
    if create_graph and live:
        grads = torch.autograd.grad(
            sum((g * g).sum() for g in live), inputs, allow_unused=True, materialize_grads=True
        )
    return (*(result if isinstance(result, tuple) else (result,)), *grads)


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize(
    "sample", [s for s in SAMPLES if s.name in EAGER_ENTRIES], ids=lambda s: s.id
)
def test_the_eager_path_gives_the_custom_op_s_numbers(sample, create_graph):
    """Bitwise: outputs, first and second derivatives on the default backend, through
    the entry (the eager path) and through torch.ops.fastmeta.<name> (each sample of
    the op: the ProtoNet ops' distances)."""
    name = sample.name
    torch.manual_seed(1)
    args = sample.make("cpu", torch.float64, False)
    args = [a.requires_grad_() if i in sample.grad_args else a for i, a in enumerate(args)]
    op = getattr(torch.ops.fastmeta, name).default
    eager = _outputs_and_grads(sample, EAGER_ENTRIES[name], args, create_graph)
    through_op = _outputs_and_grads(sample, op, args, create_graph)
    for a, b in zip(eager, through_op, strict=True):
        assert torch.equal(a, b)


def test_the_eager_path_is_taken_only_where_nothing_must_see_the_op():
    x = torch.randn(2, 3)
    assert eager_path(x, torch.nn.Parameter(x))
    assert not eager_path(x.to("meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not eager_path(torch.empty(2))
    seen = []
    torch.func.vmap(lambda t: seen.append(eager_path(t)) or t)(x)
    assert seen == [False]


def test_the_profiler_names_the_op_on_the_eager_path():
    support, ys, queries, yq, C = _episode()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.prototypical_loss(support, ys, queries, yq, C)
    assert "fastmeta::prototypical_loss" in {e.name for e in prof.events()}


def test_scalar_arguments_are_made_once_without_a_copy():
    support, ys, queries, yq, C = _episode()
    F.prototypical_loss(support, ys, queries, yq, C, tau=0.5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.prototypical_loss(support, ys, queries, yq, C, tau=0.5)
    names = [e.name for e in prof.events()]
    assert "aten::lift_fresh" not in names and "aten::full" not in names


def test_deferred_checks_raise_at_a_later_call_or_when_asked(monkeypatch):
    """The CUDA path's bookkeeping, on CPU tensors with a stand-in event: a pending bad
    flag raises once its copy has finished (at the next validated call) or when
    raise_deferred_errors waits for it; a good one is dropped silently.
    tests/test_gpu_hot_path.py runs the real thing."""

    class Event:
        finished = False

        def record(self):
            pass

        def query(self):
            return Event.finished

        def synchronize(self):
            Event.finished = True

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(validation, "_pending", type(validation._pending)())
    bad = validation.Labels("query_labels", torch.tensor([[0, 5], [1, 2]]), 3)
    good = validation.Labels("support_labels", torch.tensor([[0, 1, 2]]), 3, every_class=True)
    validation._defer("fastmeta.op", (good,))
    validation._defer("fastmeta.op", (bad,))
    validation._read_finished()  # the copies have not finished: nothing is read yet
    assert len(validation._pending) == 2
    Event.finished = True
    with pytest.raises(ValueError) as raised:
        validation._read_finished()
    assert "fastmeta.op: query_labels holds 5 at index [0, 1]" in str(raised.value)
    assert "found on the device after the call returned" in str(raised.value)
    assert not validation._pending
    Event.finished = False
    validation._defer("fastmeta.op", (bad,))
    with pytest.raises(ValueError, match="query_labels holds 5"):
        validation.raise_deferred_errors()  # waits (synchronize), then reads
    validation._defer("fastmeta.op", (good,))
    validation.raise_deferred_errors()
    assert not validation._pending
