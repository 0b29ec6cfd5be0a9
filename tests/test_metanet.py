"""fastmeta.MetaNetwork: the fused model against the same model in plain PyTorch
(per-example weight copies, generator activations and mixed weights built), input
checks, and learning on synthetic tasks."""

import math
import re

import pytest
import torch
from conftest import CPU_KERNEL, rel_err
from torch import nn

import fastmeta
from fastmeta.data import EpisodeSampler, gaussian_clusters
from fastmeta.metanet import AugmentedLinear, MetaNetwork, mlp_network


def episodes(B, ways, shots, M, example_shape, dtype=torch.float64, seed=0):
    """Support labels uneven and shuffled per episode (every class present)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, shots + 1, (ways,), generator=g)
    base = torch.repeat_interleave(torch.arange(ways), counts)
    support_y = torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(B)])
    support_x = torch.randn(B, len(base), *example_shape, generator=g, dtype=dtype)
    query_x = torch.randn(B, M, *example_shape, generator=g, dtype=dtype)
    query_y = torch.randint(0, ways, (B, M), generator=g)
    return support_x, support_y, query_x, query_y


def live(model: MetaNetwork) -> MetaNetwork:
    """model with m's output layer random: m starts at zero (every W*_i = 0), which
    would leave the fast branches out of a comparison (relu(W* x) has no gradient at
    0). Returns model."""
    with torch.no_grad():
        model.m.w2.copy_(torch.linspace(-0.3, 0.4, model.m.w2.numel()))
        model.m.b2.fill_(0.02)
    return model


def loss_and_gradients(model, batch, fused):
    model.fused = fused
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss(*batch)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_fused_equals_plain(model, batch, tolerance, backend=None):
    with fastmeta.use_backend(backend) if backend else torch.enable_grad():
        fused_loss, fused = loss_and_gradients(model, batch, fused=True)
    plain_loss, plain = loss_and_gradients(model, batch, fused=False)
    assert rel_err(fused_loss, plain_loss) < tolerance
    for name, expected in plain.items():
        if expected is None or float(expected.norm()) < 1e-10:
            # conv biases before batch norm: zero gradient in exact arithmetic
            assert fused[name] is None or float(fused[name].norm()) < 1e-9, name
            continue
        assert rel_err(fused[name], expected) < tolerance, name


@pytest.mark.parametrize("second_order", [False, True])
def test_conv4_model_equals_plain_pytorch_float64(second_order):
    torch.manual_seed(0)
    model = live(MetaNetwork(ways=5, second_order=second_order, attention_scale=3.0)).double()
    batch = episodes(2, 5, 2, 7, (1, 28, 28))
    fused_blocks = ("conv_block", "bn_relu_pool")  # the prefixes' conv blocks
    fastmeta.backend.forget_last_backends(fused_blocks)
    assert_fused_equals_plain(model, batch, 1e-9)
    for op in fused_blocks:
        assert fastmeta.last_backend(op) == CPU_KERNEL


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_model_equals_plain_pytorch_on_every_backend_float32(backend):
    if fastmeta.backend.unavailable_reason(backend, "cpu", torch.float32):
        pytest.skip(fastmeta.backend.unavailable_reason(backend, "cpu", torch.float32))
    torch.manual_seed(1)
    model = live(MetaNetwork(mlp_network(13, 24, ways=4), mlp_network(13, 24)))
    batch = episodes(3, 4, 3, 5, (13,), dtype=torch.float32)
    assert_fused_equals_plain(model, batch, 1e-4, backend)
    for op in ("gradient_mlp", "attention_read"):
        assert fastmeta.last_backend(op) in (backend, None) or backend == "reference"


def test_unbatched_episode_equals_a_batch_of_one():
    torch.manual_seed(2)
    model = live(MetaNetwork(mlp_network(6, 16, ways=3), mlp_network(6, 16))).double()
    sx, sy, qx, _ = episodes(1, 3, 2, 4, (6,))
    batched = model(sx, sy, qx)
    single = model(sx[0], sy[0], qx[0])
    assert batched.shape == (1, 4, 3) and single.shape == (4, 3)
    assert torch.allclose(batched[0], single, atol=1e-12)


def test_per_example_gradients_are_each_examples_own():
    """Permuting the support set permutes nothing in the output: the fast weights are
    stored per example and read by attention, so each example keeps its own."""
    torch.manual_seed(3)
    model = live(MetaNetwork(mlp_network(5, 16, ways=3), mlp_network(5, 16))).double()
    sx, sy, qx, _ = episodes(2, 3, 2, 4, (5,))
    order = torch.randperm(sx.shape[1])
    assert torch.allclose(model(sx, sy, qx), model(sx[:, order], sy[:, order], qx), atol=1e-10)


@pytest.mark.parametrize("ways", [5, 20])
def test_fresh_model_is_its_slow_base_learner_for_every_seed(ways):
    """m starts at zero, so every W*_i is zero and the queries' logits are the base
    learner's alone: the query loss starts at about ln(ways), whatever the seed (a
    random m's common part used to start some seeds at 10 ln(ways))."""
    g = torch.Generator().manual_seed(ways)
    support_x = torch.rand(1, ways, 1, 28, 28, generator=g)
    query_x = torch.rand(1, 7, 1, 28, 28, generator=g)
    support_y, query_y = torch.randperm(ways, generator=g)[None], torch.arange(7)[None] % ways
    for seed in range(4):
        torch.manual_seed(seed)
        model = MetaNetwork(ways=ways)
        loss = model.loss(support_x, support_y, query_x, query_y)[0].detach()
        slow = model.base(query_x[0])
        torch.testing.assert_close(model(support_x, support_y, query_x)[0], slow)
        assert abs(loss.item() - math.log(ways)) < 0.3, (seed, loss.item())


def test_attention_scale_is_a_learned_factor_of_the_cosines():
    """attention_scale=S: softmax(s cos) with s a parameter from S; S = 1 reads as the
    paper's model (None, no parameter); its gradient is checked against plain PyTorch
    with the other parameters' in test_conv4_model_equals_plain_pytorch_float64."""
    batch = episodes(2, 3, 2, 4, (5,))
    models = {}
    for scale in (None, 1.0, 4.0):
        torch.manual_seed(4)
        models[scale] = live(
            MetaNetwork(mlp_network(5, 16, ways=3), mlp_network(5, 16), attention_scale=scale)
        ).double()
    assert "attention_scale" not in models[None].state_dict()
    assert float(models[4.0].state_dict()["attention_scale"]) == 4.0
    logits = {scale: model(*batch[:3]) for scale, model in models.items()}
    torch.testing.assert_close(logits[1.0], logits[None], rtol=1e-12, atol=1e-12)
    assert rel_err(logits[4.0], logits[None]) > 1e-3
    models[4.0].loss(*batch)[0].backward()
    assert float(models[4.0].attention_scale.grad.abs()) > 0


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_attention_scale_is_refused(scale):
    with pytest.raises(
        ValueError,
        match=f"attention_scale must be a finite number > 0 or None, got {re.escape(repr(scale))}",
    ):
        MetaNetwork(mlp_network(3, ways=2), mlp_network(3), attention_scale=scale)


@pytest.mark.parametrize(
    "case,error,message",
    [
        ("query_shape", ValueError, "query_x [B, M, ...] with the same example shape"),
        (
            "label_range",
            ValueError,
            "support_y holds 3 at index [1, 2], outside [0, num_classes=3)",
        ),
        ("label_dtype", TypeError, "support_y must be an integer tensor of class indices"),
        ("query_labels", ValueError, "query_y holds 7 at index [0, 0], outside [0, num_classes=3)"),
        ("episodes", ValueError, "query_x [3, 4, 5]"),
    ],
)
def test_bad_input_names_the_argument(case, error, message):
    model = MetaNetwork(mlp_network(5, 8, ways=3), mlp_network(5, 8))
    sx, sy, qx, qy = episodes(2, 3, 2, 4, (5,), dtype=torch.float32)
    sx, sy = sx[:, :6], sy[:, :6]
    if case == "query_shape":
        qx = torch.randn(2, 4, 6)
    elif case == "label_range":
        sy = sy.clone()
        sy[1, 2] = 3
    elif case == "label_dtype":
        sy = sy.float()
    elif case == "query_labels":
        qy = qy.clone()
        qy[0, 0] = 7
    elif case == "episodes":
        qx = torch.randn(3, 4, 5)
    with pytest.raises(error) as raised:
        model.loss(sx, sy, qx, qy)
    assert message in str(raised.value)


def test_bad_networks_are_refused():
    with pytest.raises(ValueError, match="no AugmentedLinear or AugmentedConv2d"):
        MetaNetwork(nn.Sequential(nn.Linear(3, 2)), mlp_network(3))
    with pytest.raises(TypeError, match="must be nn.Sequential"):
        MetaNetwork(AugmentedLinear(3, 2), mlp_network(3))
    with pytest.raises(ValueError, match="give both base and representation"):
        MetaNetwork(mlp_network(3, ways=2))
    with pytest.raises(ValueError, match="need ways"):
        MetaNetwork()


@pytest.mark.parametrize("task_generator", ["mlp", "lstm"])
def test_learns_few_shot_gaussian_clusters(task_generator):
    """A short CPU run: 5-way 1-shot accuracy on unseen clusters far above chance, with
    either generator d of the task-level fast weights."""
    torch.manual_seed(0)
    x, y = gaussian_clusters(num_classes=60, per_class=20, dim=16, noise=0.5, seed=0)
    train = EpisodeSampler(x, y, ways=5, shots=1, queries=5, tasks=8, seed=0, classes=range(40))
    test = EpisodeSampler(
        x, y, ways=5, shots=1, queries=5, tasks=100, seed=1, classes=range(40, 60)
    )
    model = MetaNetwork(
        mlp_network(16, 32, ways=5), mlp_network(16, 32), task_generator=task_generator
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        loss, _ = model.loss(*train.sample())
        loss.backward()
        optimizer.step()
    _, accuracy = model.loss(*test.sample())
    assert accuracy > 0.5  # chance: 0.2
