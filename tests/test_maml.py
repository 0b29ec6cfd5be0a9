"""fastmeta.MAML / MetaSGD: batched adaptation against the per-task loop, an
independent float64 unrolled MAML, the learn2learn-style API, bad input, learning."""

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPILED
from torch import nn

import fastmeta
from fastmeta.data import SinusoidTasks

STRATEGIES = ("loop", "vmap")


def conv_bn_net(ways=3, dtype=torch.float32):
    """A small conv4-style model: conv, batch norm, ReLU, max-pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(5, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, ways),
    ).to(dtype)


def episodes(T=3, ways=3, shots=2, queries=3, dtype=torch.float32, size=9):
    g = torch.Generator().manual_seed(T * 100 + shots)
    xs = torch.randn(T, ways * shots, 1, size, size, generator=g, dtype=dtype)
    xq = torch.randn(T, ways * queries, 1, size, size, generator=g, dtype=dtype)
    ys = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
    yq = torch.randint(0, ways, (T, ways * queries), generator=g)
    return xs, ys, xq, yq


def meta_grads(meta, step):
    """(loss, [grad of every parameter of meta: the model's, then MetaSGD's rates])."""
    meta.zero_grad(set_to_none=True)
    loss = step()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in meta.parameters()]


def rel(a, b):
    """||a - b|| / ||a|| over all tensors together (a conv bias before batch norm has a
    zero true gradient, so per-tensor relative errors would compare rounding noise)."""
    a = torch.cat([x.flatten() for x in a])
    b = torch.cat([x.flatten() for x in b])
    return float((a - b).norm() / a.norm())


def clone_loop(meta, xs, ys, xq, yq, steps):
    """The learn2learn pattern: clone, adapt, query loss, one task at a time."""
    total = 0
    for t in range(xs.shape[0]):
        learner = meta.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
        total = total + F.cross_entropy(learner(xq[t]), yq[t])
    return total / xs.shape[0]


def batched(meta, xs, ys, xq, yq, steps, strategy):
    learner = meta.adapt_batch(xs, ys, F.cross_entropy, steps=steps, strategy=strategy)
    return F.cross_entropy(learner(xq).flatten(0, 1), yq.flatten())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_batched_matches_per_task_loop(algorithm, first_order, steps, strategy):
    torch.manual_seed(steps)
    model = conv_bn_net()
    meta = (
        fastmeta.MAML(model, lr=0.3, first_order=first_order)
        if algorithm == "maml"
        else fastmeta.MetaSGD(model, lr=0.3, first_order=first_order)
    )
    data = episodes()
    loss_loop, grads_loop = meta_grads(meta, lambda: clone_loop(meta, *data, steps))
    loss_batched, grads_batched = meta_grads(meta, lambda: batched(meta, *data, steps, strategy))
    assert torch.allclose(loss_loop, loss_batched, rtol=1e-5, atol=1e-6)
    assert rel(grads_loop, grads_batched) < 1e-5
    if algorithm == "metasgd":
        assert all(lr.grad.abs().sum() > 0 for lr in meta.lrs)
    assert fastmeta.last_backend("inner_update") == ("cpu" if COMPILED else "reference")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapted_parameters_match_per_task_loop(strategy):
    model = conv_bn_net()
    meta = fastmeta.MAML(model, lr=0.2)
    xs, ys, xq, yq = episodes(T=4)
    learner = meta.adapt_batch(xs, ys, F.cross_entropy, steps=2, strategy=strategy)
    outputs = learner(xq)
    assert outputs.shape == (4, xq.shape[1], 3)
    for t in range(4):
        one = meta.clone()
        for _ in range(2):
            one.adapt(F.cross_entropy(one(xs[t]), ys[t]))
        for name, value in one.module.named_parameters():  # the model's names
            torch.testing.assert_close(learner.params(t)[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outputs[t], one(xq[t]), rtol=1e-5, atol=1e-5)


def unrolled_maml_float64(params, xs, ys, xq, yq, lrs):
    """Second-order MAML for a 2-layer tanh MLP written out by hand (no fastmeta, no
    modules): explicit weights, autograd.grad(create_graph=True), w - lr * g."""

    def mlp(p, x):
        return torch.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]

    total = 0
    for t in range(xs.shape[0]):
        fast = list(params)
        for lr in lrs:
            grads = torch.autograd.grad(
                F.cross_entropy(mlp(fast, xs[t]), ys[t]), fast, create_graph=True
            )
            fast = [w - lr * g for w, g in zip(fast, grads)]
        total = total + F.cross_entropy(mlp(fast, xq[t]), yq[t])
    return torch.autograd.grad(total / xs.shape[0], params)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_second_order_matches_independent_float64_unrolled_loop(strategy):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, 4)).double()
    T, lrs = 5, [0.5, 0.25]
    xs, xq = torch.randn(T, 9, 7, dtype=torch.double), torch.randn(T, 6, 7, dtype=torch.double)
    ys, yq = torch.randint(0, 4, (T, 9)), torch.randint(0, 4, (T, 6))
    meta = fastmeta.MAML(model, lr=lrs, steps=2)
    _, got = meta_grads(meta, lambda: batched(meta, xs, ys, xq, yq, 2, strategy))
    expected = unrolled_maml_float64(list(model.parameters()), xs, ys, xq, yq, lrs)
    assert rel(expected, got) < 1e-12
    first_order = fastmeta.MAML(model, lr=lrs, steps=2, first_order=True)
    _, fo = meta_grads(first_order, lambda: batched(first_order, xs, ys, xq, yq, 2, strategy))
    assert rel(expected, fo) > 1e-6  # the second-order terms are really there


def test_meta_sgd_per_step_rates():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    meta = fastmeta.MetaSGD(model, lr=0.1, steps=2, per_step=True)
    with torch.no_grad():
        for lr in meta.lrs:
            lr[1].mul_(3.0)
    xs, ys = torch.randn(2, 4, 3), torch.randint(0, 2, (2, 4))
    learner = meta.adapt_batch(xs, ys, F.cross_entropy)
    params = dict(model.named_parameters())
    for t in range(2):
        fast = dict(params)
        for k in range(2):
            out = torch.func.functional_call(model, fast, (xs[t],))
            grads = torch.autograd.grad(
                F.cross_entropy(out, ys[t]), list(fast.values()), create_graph=True
            )
            fast = {n: w - lr[k] * g for (n, w), lr, g in zip(fast.items(), meta.lrs, grads)}
        for name in fast:
            torch.testing.assert_close(learner.params(t)[name], fast[name])
    learner(torch.randn(2, 3, 3)).sum().backward()
    assert all(lr.grad[k].abs().sum() > 0 for lr in meta.lrs for k in range(2))


def test_frozen_and_head_only_parameters():
    model = conv_bn_net()
    model[0].weight.requires_grad_(False)
    xs, ys, xq, yq = episodes()
    meta = fastmeta.MAML(model, lr=0.5, adapt=lambda name, p: name.startswith("7."))  # ANIL
    assert meta.adapted == ["7.weight", "7.bias"]
    learner = meta.adapt_batch(xs, ys, F.cross_entropy)
    assert learner.fast_weights.shape == (3, 4 * 2 * 2 * 3 + 3)
    F.cross_entropy(learner(xq).flatten(0, 1), yq.flatten()).backward()
    assert model[0].weight.grad is None  # frozen stays frozen
    assert model[4].weight.grad.abs().sum() > 0  # shared body gets meta-gradients

    everything = fastmeta.MAML(model, lr=0.5)
    assert "0.weight" not in everything.adapted and "0.weight" in everything.frozen
    with pytest.raises(ValueError, match="allow_nograd"):
        everything.clone().adapt(F.cross_entropy(model(xs[0]), ys[0]))
    learner = everything.clone(allow_nograd=True)
    learner.adapt(F.cross_entropy(learner(xs[0]), ys[0]))
    with pytest.raises(ValueError, match="7.nope"):
        fastmeta.MAML(model, lr=0.5, adapt=["7.nope"])


def test_unused_parameters_follow_allow_unused():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    xs, ys = torch.randn(1, 4, 3), torch.randint(0, 2, (1, 4))
    unused = fastmeta.MAML(model, lr=0.1)
    learner = unused.clone()
    with pytest.raises(RuntimeError, match="not have been used"):
        learner.adapt(F.cross_entropy(model[0](xs[0]), ys[0]))
    learner = unused.clone(allow_unused=True)
    learner.adapt(F.cross_entropy(model[0](xs[0]), ys[0]))
    assert torch.equal(learner.module[1].weight, model[1].weight)


def test_batch_norm_running_statistics_untouched():
    model = conv_bn_net()
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    xs, ys, xq, yq = episodes()
    for strategy in STRATEGIES:
        learner = fastmeta.MAML(model, lr=0.1).adapt_batch(
            xs, ys, F.cross_entropy, strategy=strategy
        )
        learner(xq)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and bn.track_running_stats


def test_bad_input_names_the_argument():
    model = conv_bn_net()
    meta = fastmeta.MAML(model, lr=0.1)
    xs, ys, xq, _ = episodes(T=3)
    with pytest.raises(ValueError, match=r"support_x \[3, .*support_y \[2, 6\].*number of tasks"):
        meta.adapt_batch(xs, ys[:2], F.cross_entropy)
    with pytest.raises(ValueError, match="support_y must hold int64.*torch.int32"):
        meta.adapt_batch(xs, ys.int(), F.cross_entropy)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        meta.adapt_batch(xs, ys, F.cross_entropy, steps=0)
    with pytest.raises(ValueError, match="strategy"):
        meta.adapt_batch(xs, ys, F.cross_entropy, strategy="threads")
    learner = meta.adapt_batch(xs, ys, F.cross_entropy)
    with pytest.raises(ValueError, match=r"query_x must be \[T = 3, \.\.\.\].*\[2, "):
        learner(xq[:2])
    with pytest.raises(ValueError, match="2 per-step rates, step 3"):
        fastmeta.MAML(model, lr=[0.1, 0.1]).adapt_batch(xs, ys, F.cross_entropy, steps=3)


def test_maml_learns_sinusoid_regression():
    """Finn et al. 2017: after meta-training, one step on 10 support points cuts the
    query MSE well below the pre-adaptation MSE of the same meta-learned model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    meta = fastmeta.MAML(model, lr=0.01, steps=1, strategy="vmap")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tasks = SinusoidTasks(shots=10, queries=10, tasks=16, seed=0)
    for _, (xs, ys, xq, yq) in zip(range(1500), tasks):
        optimizer.zero_grad()
        F.mse_loss(meta.adapt_batch(xs, ys, F.mse_loss)(xq), yq).backward()
        optimizer.step()
    xs, ys, xq, yq = SinusoidTasks(shots=10, queries=10, tasks=200, seed=1).sample()
    before = F.mse_loss(torch.func.vmap(model)(xq), yq).item()
    after = F.mse_loss(meta.adapt_batch(xs, ys, F.mse_loss, steps=5)(xq), yq).item()
    assert after < 0.5 * before, (before, after)
