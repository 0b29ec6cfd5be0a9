"""fastmeta.compat.learn2learn against learn2learn's documented behaviour (learn2learn
is not installed): signatures, clones that are nn.Modules lined up with the model,
and adapted parameters and meta-gradients equal to a plain-torch float64 reference
written here (torch.autograd.grad, create_graph=True for second order, w - lr * g);
learn2learn's MAML training loop with only the import changed; the module utilities."""

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPILED
from torch import nn
from torch.func import functional_call

import fastmeta
import fastmeta.compat.learn2learn as l2l
from fastmeta.compat.learn2learn.algorithms.maml import maml_update
from fastmeta.compat.learn2learn.algorithms.meta_sgd import meta_sgd_update
from fastmeta.maml import module_tree

TOL = dict(rtol=1e-12, atol=1e-13)  # float64


def mlp(frozen: str | None = None) -> nn.Module:
    """A float64 tanh MLP with odd sizes; `frozen` names a parameter to freeze."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    if frozen:
        model.get_parameter(frozen).requires_grad_(False)
    return model


def task(seed: int, n: int = 9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def leaves(model: nn.Module) -> dict:
    """Independent float64 copies of the model's parameters (requires_grad kept)."""
    return {
        n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()
    }


def reference_adapt(model, params, rates, batches, first_order, adapt=None):
    """Plain torch: for each support batch, grads of the loss w.r.t. the adapted
    parameters (create_graph unless first_order) and w <- w - rate * g; rates: a float
    or {name: tensor}. Returns the adapted {name: tensor}."""
    fast = dict(params)
    names = [n for n in fast if fast[n].requires_grad and (adapt is None or n in adapt)]
    for x, y in batches:
        loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order)
        for n, g in zip(names, grads):
            rate = rates if isinstance(rates, float) else rates[n]
            fast[n] = fast[n] - rate * (g.detach() if first_order else g)
    return fast


# ---------------------------------------------------------------- API shape


def test_signatures_and_positional_order_are_learn2learn_s():
    def parameters(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]

    empty = inspect.Parameter.empty
    assert parameters(l2l.algorithms.MAML.__init__) == [
        ("self", empty),
        ("model", empty),
        ("lr", empty),
        ("first_order", False),
        ("allow_unused", None),
        ("allow_nograd", False),
    ]
    assert parameters(l2l.algorithms.MetaSGD.__init__) == [
        ("self", empty),
        ("model", empty),
        ("lr", 1.0),
        ("first_order", False),
        ("lrs", None),
    ]
    learner = l2l.algorithms.MAML(mlp(), 0.1).clone()
    assert parameters(learner.adapt) == [
        ("loss", empty),
        ("first_order", None),
        ("allow_unused", None),
        ("allow_nograd", None),
    ]
    for clone in (l2l.algorithms.MAML.clone, type(learner).clone):
        assert parameters(clone)[1:] == [
            ("first_order", None),
            ("allow_unused", None),
            ("allow_nograd", None),
        ]
    maml = l2l.algorithms.MAML(mlp(), 0.25, True, False, True)  # positionally, as learn2learn
    assert (maml.lr, maml.first_order, maml.allow_unused, maml.allow_nograd) == (
        0.25,
        True,
        False,
        True,
    )
    assert l2l.algorithms.MAML(mlp(), 0.1, allow_nograd=True).allow_unused is True  # defaults to it
    model = mlp()
    rates = [torch.full_like(p, 0.5) for p in model.parameters()]
    meta = l2l.algorithms.MetaSGD(model, 0.1, True, rates)  # the TypeError
    assert meta.first_order and meta.lrs is rates
    with pytest.raises(TypeError, match="steps"):
        l2l.algorithms.MAML(mlp(), 0.1, steps=2)  # learn2learn's signature exactly
    assert isinstance(maml, fastmeta.MAML) and isinstance(meta, fastmeta.MetaSGD)


def test_import_layout_is_learn2learn_s():
    import fastmeta.compat.learn2learn.algorithms.maml as maml_module
    import fastmeta.compat.learn2learn.algorithms.meta_sgd as meta_sgd_module

    assert l2l.algorithms.MAML is maml_module.MAML and l2l.algorithms.maml_update is maml_update
    assert l2l.algorithms.MetaSGD is meta_sgd_module.MetaSGD
    assert l2l.algorithms.meta_sgd_update is meta_sgd_update
    for name in ("clone_module", "update_module", "detach_module", "clone_parameters"):
        assert getattr(l2l, name) is getattr(l2l.utils, name)
    with pytest.raises(AttributeError, match="does not cover learn2learn.vision: import it"):
        l2l.vision  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        l2l.nope  # noqa: B018


def test_clone_is_a_module_lined_up_with_the_model():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].bias.requires_grad_(False)
    maml = l2l.algorithms.MAML(model, lr=0.1, allow_nograd=True)
    learner = maml.clone()
    assert isinstance(learner, nn.Module) and isinstance(learner.module, nn.Sequential)
    assert learner.module is not model and learner.module[0] is not model[0]
    assert [type(m) for m in learner.module] == [type(m) for m in model]
    assert learner.lr == 0.1 and learner.owner is maml
    x, y = task(1)
    learner.adapt(F.cross_entropy(learner(x), y))
    names = [n for n, _ in maml.named_parameters()]
    assert names[0] == "module.0.weight" and len(names) == 6
    own = fastmeta.MAML(model, lr=0.1, allow_nograd=True)  # the same Learner underneath
    for clone in (learner, learner.clone(), maml.clone(), own.clone()):
        assert [n for n, _ in clone.named_parameters()] == names  # frozen bias included
        pairs = list(zip(model.parameters(), clone.parameters()))
        assert len(pairs) == 6
        assert all(p.shape == q.shape and p.requires_grad == q.requires_grad for p, q in pairs)
        assert all(p is not q for p, q in pairs)
    assert torch.equal(learner.module[0].bias, model[0].bias)  # frozen: not adapted
    assert not torch.equal(learner.module[0].weight, model[0].weight)  # adapted

    learner.eval()
    assert not learner.training and not any(m.training for m in learner.module.modules())
    assert model.training and all(m.training for m in model.modules())
    learner.train()
    assert all(m.training for m in learner.modules())
    before = model[1].running_mean.clone()
    learner(x)  # training mode: the running statistics are the model's (shared buffers)
    assert not torch.equal(model[1].running_mean, before)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch reads .grad of non-leaves
        assert learner.to(torch.float32) is learner
    assert all(p.dtype == torch.float32 for p in learner.parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    learner(x.float()).sum().backward()
    assert model[0].weight.grad.dtype == torch.float64 and model[0].weight.grad.abs().sum() > 0


def test_wrappers_pass_unknown_attributes_to_the_module():
    linear = nn.Linear(4, 3).double()
    maml = l2l.algorithms.MAML(linear, lr=0.1)
    assert maml.weight is linear.weight and maml.in_features == 4
    learner = maml.clone()
    assert learner.weight is learner.module.weight and learner.out_features == 3
    with pytest.raises(AttributeError, match="nope"):
        learner.nope  # noqa: B018


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("algorithm", ["MAML", "MetaSGD"])
def test_adapt_and_meta_gradients_equal_the_plain_torch_reference(algorithm, first_order, steps):
    model = mlp()
    if algorithm == "MAML":
        meta = l2l.algorithms.MAML(model, lr=0.37, first_order=first_order)
    else:
        meta = l2l.algorithms.MetaSGD(model, lr=0.37, first_order=first_order)
        with torch.no_grad():  # rates that differ per element
            for i, lr in enumerate(meta.lrs):
                lr.add_(torch.linspace(-0.1, 0.2, lr.numel(), dtype=lr.dtype).view(lr.shape) * i)
    support = [task(10 + k) for k in range(steps)]
    xq, yq = task(99, n=11)
    calls = []
    real_inner_update = module_tree.inner_update

    def counting(*args):
        calls.append(args[0].shape)
        return real_inner_update(*args)

    module_tree.inner_update = counting
    try:
        learner = meta.clone()
        for x, y in support:
            learner.adapt(F.cross_entropy(learner(x), y))
    finally:
        module_tree.inner_update = real_inner_update
    assert calls == [(sum(p.numel() for p in model.parameters()),)] * steps  # one fused call
    assert fastmeta.last_backend("inner_update") == ("cpu" if COMPILED else "reference")
    F.cross_entropy(learner(xq), yq).backward()

    params = leaves(model)
    if algorithm == "MAML":
        rates, rate_leaves = 0.37, []
    else:
        rate_leaves = [lr.detach().clone().requires_grad_() for lr in meta.lrs]
        rates = dict(zip(params, rate_leaves))
    fast = reference_adapt(model, params, rates, support, first_order)
    for (name, got), expected in zip(learner.module.named_parameters(), fast.values()):
        torch.testing.assert_close(got, expected, **TOL, msg=name)
    query_loss = F.cross_entropy(functional_call(model, fast, (xq,)), yq)
    expected = torch.autograd.grad(query_loss, [*params.values(), *rate_leaves])
    got = [p.grad for p in meta.parameters()]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    if algorithm == "MetaSGD":
        assert all(lr.grad.abs().sum() > 0 for lr in meta.lrs)  # the rates learn
    if not first_order:  # the second-order terms are really there
        fo_params = leaves(model)
        first = reference_adapt(model, fo_params, 0.37, support, True)
        fo = torch.autograd.grad(
            F.cross_entropy(functional_call(model, first, (xq,)), yq), list(fo_params.values())
        )
        assert max(float((a - b).abs().max()) for a, b in zip(fo, expected)) > 1e-6


def test_adapt_flags_override_the_clone_s():
    model = mlp()
    maml = l2l.algorithms.MAML(model, lr=0.3)
    x, y = task(3)
    xq, yq = task(4)
    grads = {}
    for how in ("clone", "adapt", "wrapper"):
        meta = maml if how != "wrapper" else l2l.algorithms.MAML(model, lr=0.3, first_order=True)
        learner = meta.clone(first_order=True) if how == "clone" else meta.clone()
        learner.adapt(F.cross_entropy(learner(x), y), first_order=True if how == "adapt" else None)
        model.zero_grad()
        F.cross_entropy(learner(xq), yq).backward()
        grads[how] = [p.grad.clone() for p in model.parameters()]
    params = leaves(model)
    fast = reference_adapt(model, params, 0.3, [(x, y)], first_order=True)
    expected = torch.autograd.grad(
        F.cross_entropy(functional_call(model, fast, (xq,)), yq), list(params.values())
    )
    for how, got in grads.items():
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **TOL, msg=how)


def test_clone_of_an_adapted_clone_continues_from_it():
    model = mlp()
    maml = l2l.algorithms.MAML(model, lr=0.21)
    (x1, y1), (x2, y2), (xq, yq) = task(5), task(6), task(7, n=13)
    first = maml.clone()
    first.adapt(F.cross_entropy(first(x1), y1))
    kept = [p.detach().clone() for p in first.parameters()]
    second = first.clone()
    second.adapt(F.cross_entropy(second(x2), y2))
    assert all(torch.equal(p, k) for p, k in zip(first.parameters(), kept))  # untouched
    (F.cross_entropy(second(xq), yq) + F.cross_entropy(first(xq), yq)).backward()

    params = leaves(model)
    one = reference_adapt(model, params, 0.21, [(x1, y1)], False)
    two = reference_adapt(model, one, 0.21, [(x2, y2)], False)
    loss = sum(F.cross_entropy(functional_call(model, p, (xq,)), yq) for p in (two, one))
    for g, e in zip(model.parameters(), torch.autograd.grad(loss, list(params.values()))):
        torch.testing.assert_close(g.grad, e, **TOL)


def test_allow_nograd_leaves_frozen_parameters_and_allow_unused_unused_ones():
    model = mlp(frozen="0.bias")
    x, y = task(8)
    with pytest.raises(ValueError, match=r"\['0.bias'\] do not require grad.*allow_nograd=True"):
        l2l.algorithms.MAML(model, lr=0.3).clone().adapt(F.cross_entropy(model(x), y))
    xq, yq = task(9)
    for how in ("wrapper", "clone", "adapt"):
        maml = l2l.algorithms.MAML(model, lr=0.3, allow_nograd=how == "wrapper")
        learner = maml.clone(allow_nograd=True) if how == "clone" else maml.clone()
        learner.adapt(F.cross_entropy(learner(x), y), allow_nograd=True if how == "adapt" else None)
        assert torch.equal(learner.module[0].bias, model[0].bias)
        model.zero_grad()
        F.cross_entropy(learner(xq), yq).backward()
        params = leaves(model)
        fast = reference_adapt(model, params, 0.3, [(x, y)], False)
        live = [n for n, p in params.items() if p.requires_grad]
        expected = torch.autograd.grad(
            F.cross_entropy(functional_call(model, fast, (xq,)), yq), [params[n] for n in live]
        )
        for n, e in zip(live, expected):
            torch.testing.assert_close(model.get_parameter(n).grad, e, **TOL, msg=how)
        assert model[0].bias.grad is None

    head_only = mlp()
    with pytest.raises(RuntimeError, match="not have been used"):
        learner = l2l.algorithms.MAML(head_only, lr=0.3).clone()
        learner.adapt(F.cross_entropy(learner.module[0](x)[:, :3], y))
    for maml in (
        l2l.algorithms.MAML(head_only, lr=0.3, allow_unused=True),
        l2l.algorithms.MAML(head_only, lr=0.3, allow_nograd=True),  # allow_unused follows it
    ):
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner.module[0](x)[:, :3], y))
        assert torch.equal(learner.module[2].weight, head_only[2].weight)  # unused: as it was
        assert not torch.equal(learner.module[0].weight, head_only[0].weight)


def test_meta_sgd_rates_default_given_and_broadcast():
    model = mlp(frozen="2.bias")
    meta = l2l.algorithms.MetaSGD(model, lr=0.2)
    assert isinstance(meta.lrs, nn.ParameterList) and len(meta.lrs) == 4  # one per parameter
    for lr, p in zip(meta.lrs, model.parameters()):
        assert lr.shape == p.shape and torch.all(lr == 0.2) and lr.dtype == p.dtype
    assert list(meta.parameters())[4:] == list(meta.lrs)  # after the model's, as learn2learn

    given = [torch.tensor(0.3, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    given[1] = torch.full((7,), 0.1, dtype=torch.float64, requires_grad=True)
    meta = l2l.algorithms.MetaSGD(model, lrs=given)
    assert meta.lrs is given and len(list(meta.parameters())) == 4  # a list: not registered
    x, y = task(11)
    xq, yq = task(12)
    learner = meta.clone()
    learner.adapt(F.cross_entropy(learner(x), y), allow_nograd=True)
    F.cross_entropy(learner(xq), yq).backward()
    params = leaves(model)
    rates = [r.detach().clone().requires_grad_() for r in given]
    fast = reference_adapt(model, params, dict(zip(params, rates)), [(x, y)], False)
    expected = torch.autograd.grad(
        F.cross_entropy(functional_call(model, fast, (xq,)), yq), [*params.values()][:3] + rates[:3]
    )
    got = [
        model[0].weight.grad,
        model[0].bias.grad,
        model[2].weight.grad,
        *(r.grad for r in given[:3]),
    ]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    assert given[3].grad is None  # the frozen parameter's rate is not used

    registered = nn.ParameterList(
        [nn.Parameter(torch.full_like(p, 0.1)) for p in model.parameters()]
    )
    assert len(list(l2l.algorithms.MetaSGD(model, lrs=registered).parameters())) == 8


def test_adapt_batch_stays_reachable_and_agrees_with_clones():
    model = mlp()
    maml = l2l.algorithms.MAML(model, lr=0.4)
    xs = torch.stack([task(20 + t)[0] for t in range(3)])
    ys = torch.stack([task(20 + t)[1] for t in range(3)])
    batched = maml.adapt_batch(xs, ys, F.cross_entropy, strategy="loop")
    for t in range(3):
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
        for name, p in learner.module.named_parameters():
            torch.testing.assert_close(batched.params(t)[name], p, **TOL)


def test_recurrent_module_clone_runs_on_its_adapted_weights():
    torch.manual_seed(2)
    model = nn.GRU(3, 4, batch_first=True).double()
    maml = l2l.algorithms.MAML(model, lr=0.5)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    learner = maml.clone()
    learner.adapt(learner(x)[0].pow(2).mean())
    fast = dict(learner.module.named_parameters())
    assert not torch.equal(fast["weight_ih_l0"], model.weight_ih_l0)
    torch.testing.assert_close(learner(x)[0], functional_call(model, fast, (x,))[0], **TOL)


# ---------------------------------------------------------------- the documented loop


def sine_tasks(seed: int, count: int, shots: int = 7):
    """Sine-wave regression tasks: amplitude in [0.5, 3], phase in [0, pi]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        amplitude = 0.5 + 2.5 * torch.rand((), generator=g, dtype=torch.float64)
        phase = torch.pi * torch.rand((), generator=g, dtype=torch.float64)
        x = 10 * torch.rand(2 * shots, 1, generator=g, dtype=torch.float64) - 5
        y = amplitude * torch.sin(x + phase)
        out.append((x[:shots], y[:shots], x[shots:], y[shots:]))
    return out


def adapted_query_loss(maml, tasks, steps):
    """The mean query MSE after `steps` adaptation steps on each task's support set."""
    total = 0.0
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.mse_loss(learner(xs), ys))
        total += F.mse_loss(learner(xq), yq).item()
    return total / len(tasks)


def test_learn2learn_s_maml_training_loop_runs_unchanged():
    """learn2learn's MAML example loop with `import fastmeta.compat.learn2learn as l2l`;
    the first step's meta-gradient equals the plain-torch reference's; the adapted
    loss on held-out tasks falls (about 1.9 -> 1.05 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 17), nn.ReLU(), nn.Linear(17, 17), nn.ReLU(), nn.Linear(17, 1)
    ).double()
    initial = copy.deepcopy(model)
    fast_lr, tasks_per_step, adapt_steps = 0.05, 4, 2
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), 0.02)
    lossfn = nn.MSELoss(reduction="mean")
    held_out = sine_tasks(12345, 20)
    before = adapted_query_loss(maml, held_out, adapt_steps)
    for iteration in range(60):
        opt.zero_grad()
        iteration_error = 0.0
        for x_support, y_support, x_query, y_query in sine_tasks(iteration, tasks_per_step):
            learner = maml.clone()
            for _ in range(adapt_steps):
                train_error = lossfn(learner(x_support), y_support)
                learner.adapt(train_error)
            valid_error = lossfn(learner(x_query), y_query)
            iteration_error += valid_error
        iteration_error /= tasks_per_step
        iteration_error.backward()
        if iteration == 0:
            params = leaves(initial)
            total = 0.0
            for xs, ys, xq, yq in sine_tasks(0, tasks_per_step):
                fast = dict(params)
                for _ in range(adapt_steps):
                    loss = F.mse_loss(functional_call(initial, fast, (xs,)), ys)
                    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                    fast = {n: w - fast_lr * g for (n, w), g in zip(fast.items(), grads)}
                total = total + F.mse_loss(functional_call(initial, fast, (xq,)), yq)
            expected = torch.autograd.grad(total / tasks_per_step, list(params.values()))
            for p, e in zip(maml.parameters(), expected):
                torch.testing.assert_close(p.grad, e, **TOL)
        opt.step()
    after = adapted_query_loss(maml, held_out, adapt_steps)
    assert after < 0.75 * before, (before, after)


# ---------------------------------------------------------------- module utilities


def test_clone_module_is_differentiable_and_keeps_sharing():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)).double()
    model[2].weight = model[0].weight  # tied
    clone = l2l.clone_module(model)
    assert clone[2].weight is clone[0].weight and clone[0].weight is not model[0].weight
    assert clone[1].running_mean is model[1].running_mean  # buffers without grad: shared
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(clone(x), model(x), **TOL)
    clone(x).pow(2).sum().backward()
    model2 = copy.deepcopy(model)
    model2(x).pow(2).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, model2[0].weight.grad, **TOL)
    assert l2l.clone_module(3) == 3  # not a module: as it is


def test_update_module_and_maml_update_step_the_parameters():
    model = mlp()
    clone = l2l.clone_module(model)
    updates = [torch.full_like(p, 0.5) for p in clone.parameters()]
    updates[1] = None
    l2l.update_module(clone, updates=updates)
    for p, q, u in zip(clone.parameters(), model.parameters(), updates):
        torch.testing.assert_close(p, q + (0 if u is None else u), **TOL)
    for p in clone.parameters():
        p.update = -p.detach()
    l2l.update_module(clone)  # the .update attributes
    assert all(torch.count_nonzero(p) == 0 for p in clone.parameters())
    with pytest.raises(ValueError, match="updates holds 2 tensors, the module has 4 parameters"):
        l2l.update_module(model, updates=updates[:2])

    x, y = task(13)
    for update in ("maml", "meta_sgd"):
        learner = l2l.algorithms.MAML(model, lr=0.3).clone()
        grads = torch.autograd.grad(
            F.cross_entropy(learner(x), y), learner.parameters(), create_graph=True
        )
        if update == "maml":
            assert maml_update(learner, 0.3, grads) is learner
        else:
            meta_sgd_update(learner, [torch.tensor(0.3, dtype=torch.float64)] * 4, grads)
        fast = reference_adapt(model, leaves(model), 0.3, [(x, y)], False)
        for p, e in zip(learner.parameters(), fast.values()):
            torch.testing.assert_close(p, e, **TOL)
    with pytest.raises(ValueError, match="grads holds 1 tensors, the model has 4 parameters"):
        maml_update(learner, 0.3, grads[:1])
    with pytest.raises(ValueError, match="meta_sgd_update: lrs is required"):
        meta_sgd_update(learner, grads=grads)


def test_detach_module_cuts_the_graph():
    model = mlp()
    x, y = task(14)
    for adapted in (False, True):
        learner = l2l.algorithms.MAML(model, lr=0.3).clone()
        if adapted:  # the adapted parameters are views of the fused update's output
            learner.adapt(F.cross_entropy(learner(x), y))
        l2l.detach_module(learner)
        assert all(not p.requires_grad and p.grad_fn is None for p in learner.parameters())
        l2l.detach_module(learner.module, keep_requires_grad=True)  # nothing had it now
        assert not any(p.requires_grad for p in learner.parameters())
    clone = l2l.clone_module(model)
    l2l.detach_module(clone, keep_requires_grad=True)
    assert all(p.requires_grad and p.is_leaf for p in clone.parameters())
    F.cross_entropy(clone(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.parameters())


def test_small_utilities():
    params = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    copies = l2l.clone_parameters(params)
    assert all(
        c is not p and torch.equal(c, p) and c.grad_fn is not None for c, p in zip(copies, params)
    )
    named = l2l.clone_named_parameters({"a": params[0]})
    assert torch.equal(named["a"], params[0]) and named["a"] is not params[0]
    x = torch.tensor([0.3, -1.2], requires_grad=True)
    box = l2l.magic_box(x)
    assert torch.equal(box, torch.ones(2))
    box.sum().backward()
    assert torch.equal(x.grad, torch.ones(2))
    assert l2l.magic_box(2.5) == 2.5
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert l2l.accuracy(preds, torch.tensor([1, 1, 1])).item() == pytest.approx(2 / 3)


# ---------------------------------------------------------------- bad input


def test_bad_arguments_name_the_argument():
    model = mlp()
    x, y = task(15)
    cases = [
        (
            lambda: l2l.algorithms.MAML("model", 0.1),
            TypeError,
            "MAML: model must be an nn.Module, got str",
        ),
        (
            lambda: l2l.algorithms.MAML(model, "0.1"),
            TypeError,
            "MAML: lr must be a number, got str",
        ),
        (
            lambda: l2l.algorithms.MAML(model, 0.1, "yes"),
            TypeError,
            "MAML: first_order must be True or False, got str 'yes'",
        ),
        (
            lambda: l2l.algorithms.MAML(model, 0.1, allow_unused=1),
            TypeError,
            "allow_unused must be True, False or None, got int 1",
        ),
        (
            lambda: l2l.algorithms.MetaSGD(model, lrs=torch.ones(3)),
            TypeError,
            "MetaSGD: lrs must be a list of tensors.*got Tensor",
        ),
        (
            lambda: l2l.algorithms.MetaSGD(model, lrs=[torch.ones(1)] * 3),
            ValueError,
            r"lrs holds 3 rates, the model has 4 parameters \(\['0.weight'",
        ),
        (
            lambda: l2l.algorithms.MetaSGD(
                model, lrs=[torch.ones(1), torch.ones(3), torch.ones(1), torch.ones(1)]
            ),
            ValueError,
            r"lrs\[1\] has shape \[3\], which does not broadcast to parameter '0.bias' "
            r"of shape \[7\]",
        ),
        (
            lambda: l2l.algorithms.MetaSGD(model, lrs=[1.0] * 4),
            TypeError,
            r"lrs\[0\] must be a floating-point tensor, got float",
        ),
        (
            lambda: l2l.algorithms.MAML(model, 0.1).clone().adapt(2.0),
            TypeError,
            "adapt: loss must be a tensor, got float",
        ),
        (
            lambda: l2l.algorithms.MAML(model, 0.1).clone(first_order="no"),
            TypeError,
            "clone: first_order must be True or False",
        ),
        (
            lambda: (
                l2l.algorithms.MAML(model, 0.1)
                .clone()
                .adapt(F.cross_entropy(model(x), y), allow_nograd=0)
            ),
            TypeError,
            "adapt: allow_nograd must be True or False, got int 0",
        ),
        (
            lambda: l2l.algorithms.MAML(model, 0.1).adapt(F.cross_entropy(model(x), y)),
            TypeError,
            r"MAML.adapt: adapt a clone.*learner = meta.clone\(\)",
        ),
        (
            lambda: maml_update(model, torch.ones(2)),
            ValueError,
            r"maml_update: lr must be a number or a one-element floating tensor, "
            r"got a torch.float32 tensor of shape \[2\]",
        ),
        (
            lambda: l2l.update_module([1]),
            TypeError,
            "update_module: module must be an nn.Module, got list",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
