"""fastmeta.compat.higher from higher's documented behaviour: innerloop_ctx yields
(fmodel, diffopt); diffopt.step(loss) gives fmodel new fast weights by the torch
optimizer's rule; the steps stay on the tape (second order) unless
track_higher_grads=False; copy_initial_weights=True cuts the tape at the model's
parameters. The optimizers are checked step by step against torch.optim's own steps
and their meta-gradients against plain-torch unrolled references written here from
torch's documented algorithms (float64). The tests at the end compare with the real
higher 0.2.1 where it is installed (make's test dependencies install it)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPILED, rel_err
from torch import nn
from torch.func import functional_call

import fastmeta
import fastmeta.compat.higher as higher
from fastmeta.compat.higher import optim, patch, utils

DT = torch.float64
STEP_TOL = 1e-13  # fast weights against torch.optim's steps
GRAD_TOL = 1e-10  # meta-gradients against the unrolled references


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def on(model, params, buffers=None):
    """model's forward on `params` (a list in parameters() order) and `buffers`."""
    names = [n for n, _ in model.named_parameters()]
    state = {**dict(zip(names, params)), **(buffers or {})}
    return lambda x: functional_call(model, state, (x,))


def mlp(seed=0, bn=False) -> nn.Module:
    """Odd sizes; Tanh keeps the loss smooth for the second-order checks."""
    torch.manual_seed(seed)
    layers = [nn.Linear(7, 5), *([nn.BatchNorm1d(5)] if bn else []), nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).to(DT)


def batch(k: int, n: int = 9):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(n, 7, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_at(call, k: int) -> torch.Tensor:
    """Step k's loss; `call` maps inputs to logits (a model, fmodel, ...)."""
    x, y = batch(k)
    return F.cross_entropy(call(x), y)


def two_groups(opt_type, model, config):
    """The first layer in its own group with 3x the learning rate."""
    params = list(model.parameters())
    first = {"params": params[:2], "lr": 3 * config.get("lr", 1e-3)}
    return opt_type([first, {"params": params[2:]}], **config)


SGD_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.1, momentum=0.8, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "everything": dict(lr=0.05, momentum=0.7, dampening=0.1, weight_decay=0.02),
    "nesterov_wd_maximize": dict(
        lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.02, maximize=True
    ),
}
ADAM_CONFIGS = {
    "plain": dict(lr=0.01),
    "amsgrad": dict(lr=0.01, amsgrad=True),
    "weight_decay": dict(lr=0.01, weight_decay=0.1),
    "amsgrad_wd_betas": dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.05, amsgrad=True),
    "maximize": dict(lr=0.01, maximize=True),
}
OPT_CASES = (
    [(torch.optim.SGD, c) for c in SGD_CONFIGS]
    + [(torch.optim.Adam, c) for c in ADAM_CONFIGS]
    + [(torch.optim.AdamW, "weight_decay"), (torch.optim.AdamW, "amsgrad_wd_betas")]
)


def config_of(opt_type, name):
    return (SGD_CONFIGS if opt_type is torch.optim.SGD else ADAM_CONFIGS)[name]


def torch_trajectory(model, opt_type, config, steps, pre_steps=0):
    """The parameters after each of `steps` torch.optim steps (after `pre_steps`)."""
    model = copy.deepcopy(model)
    opt = two_groups(opt_type, model, config)
    trajectory = []
    for k in range(pre_steps + steps):
        opt.zero_grad()
        loss_at(model, k).backward()
        opt.step()
        if k >= pre_steps:
            trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory


def compat_trajectory(model, opt_type, config, steps, pre_steps=0, **ctx):
    """The same with diffopt steps, after `pre_steps` torch steps (whose state the
    differentiable optimizer copies)."""
    model = copy.deepcopy(model)
    opt = two_groups(opt_type, model, config)
    for k in range(pre_steps):
        opt.zero_grad()
        loss_at(model, k).backward()
        opt.step()
    with higher.innerloop_ctx(model, opt, **ctx) as (fmodel, diffopt):
        return [diffopt.step(loss_at(fmodel, pre_steps + k)) for k in range(steps)]


# ------------------------------------------------------------- layout and context


def test_higher_module_layout():
    assert higher.patch is patch and higher.optim is optim and higher.utils is utils
    assert higher.monkeypatch is patch.monkeypatch
    assert higher.get_diff_optim is optim.get_diff_optim
    assert higher.create_diff_optim is optim.create_diff_optim
    assert higher.register_optim is optim.register_optim
    assert callable(patch.make_functional) and callable(patch.buffer_sync)
    assert callable(utils.get_func_params) and callable(utils.flatten)
    assert issubclass(optim.DifferentiableSGD, optim.DifferentiableOptimizer)
    assert issubclass(optim.DifferentiableAdam, optim.DifferentiableOptimizer)


def test_innerloop_ctx_yields_fmodel_and_diffopt_and_step_updates_fmodel():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert isinstance(fmodel, nn.Sequential) and fmodel is not model
        assert isinstance(diffopt, optim.DifferentiableSGD)
        x, _ = batch(0)
        loss = loss_at(fmodel, 0)
        grads = torch.autograd.grad(loss, list(fmodel.parameters()), retain_graph=True)
        new = diffopt.step(loss)
        assert isinstance(new, list) and len(new) == 4
        assert all(a is b for a, b in zip(new, fmodel.fast_params))
        for p0, g, p1 in zip(before, grads, new):
            assert rel_err(p1, p0 - 0.1 * g) < STEP_TOL
        want = on(model, new)(x)
        assert rel_err(fmodel(x), want) < STEP_TOL
        assert all(a is b for a, b in zip(fmodel[0].parameters(), new[:2]))  # the slots
        assert rel_err(fmodel[0](x), F.linear(x, new[0], new[1])) < STEP_TOL
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)  # the model never changes


# ------------------------------------------------------ steps equal torch.optim's


@pytest.mark.parametrize("pre_steps", [0, 2])
@pytest.mark.parametrize("opt_type,config", OPT_CASES)
def test_steps_equal_torch_optim(opt_type, config, pre_steps):
    """Four steps, two groups, float64; pre_steps=2: the optimizer's state (momentum
    buffers, Adam's moments and step counts) is copied at creation."""
    model = mlp(seed=1)
    cfg = config_of(opt_type, config)
    want = torch_trajectory(model, opt_type, cfg, 4, pre_steps)
    got = compat_trajectory(model, opt_type, cfg, 4, pre_steps)
    for step, (g, w) in enumerate(zip(got, want)):
        assert rel_err(flat(g), flat(w)) < STEP_TOL, f"step {step + 1}"
    assert rel_err(flat(got[-1]), flat(mlp(seed=1).parameters())) > 1e-3  # it moved


def test_steps_run_on_fused_inner_update():
    model = mlp()
    for opt_type in (torch.optim.SGD, torch.optim.Adam):
        fastmeta.backend.forget_last_backends(["inner_update"])
        compat_trajectory(model, opt_type, dict(lr=0.1), 1)
        assert fastmeta.last_backend("inner_update") == ("cpu" if COMPILED else "reference")


# ---------------------------------------------- meta-gradients: unrolled references


def reference_sgd(p, g, state, h):
    """torch.optim.SGD's documented step, one parameter, out of place."""
    g = -g if h.get("maximize") else g
    if h.get("weight_decay", 0):
        g = g + h["weight_decay"] * p
    if h.get("momentum", 0):
        b = g if "b" not in state else h["momentum"] * state["b"] + (1 - h.get("dampening", 0)) * g
        state["b"] = b
        g = g + h["momentum"] * b if h.get("nesterov") else b
    return p - h["lr"] * g


def reference_adam(p, g, state, h, decoupled=False):
    """torch.optim.Adam's documented step (AdamW's with decoupled=True)."""
    b1, b2 = h.get("betas", (0.9, 0.999))
    lr, wd, eps = h["lr"], h.get("weight_decay", 0), h.get("eps", 1e-8)
    g = -g if h.get("maximize") else g
    if wd and decoupled:
        p = p * (1 - lr * wd)
    elif wd:
        g = g + wd * p
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = b1 * state.get("m", 0) + (1 - b1) * g
    v = state["v"] = b2 * state.get("v", 0) + (1 - b2) * g * g
    if h.get("amsgrad"):
        v = state["vmax"] = torch.maximum(state.get("vmax", torch.zeros_like(v)), v)
    return p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


def reference_meta_grads(model, hypers, rule, steps, leaves):
    """Grads of the query loss after `steps` unrolled inner steps from model's
    parameters (hypers[i]: parameter i's hyperparameters), w.r.t. `leaves`."""
    params, states = list(model.parameters()), [{} for _ in hypers]
    for k in range(steps):
        loss = loss_at(on(model, params), k)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [rule(p, g, s, h) for p, g, s, h in zip(params, grads, states, hypers)]
    query = loss_at(on(model, params), 99)
    return torch.autograd.grad(query, leaves)


META_CASES = [
    (torch.optim.SGD, "everything", reference_sgd),
    (torch.optim.SGD, "nesterov_wd_maximize", reference_sgd),
    (torch.optim.Adam, "amsgrad_wd_betas", reference_adam),
    (torch.optim.Adam, "maximize", reference_adam),
    (torch.optim.AdamW, "amsgrad_wd_betas", lambda *a: reference_adam(*a, decoupled=True)),
]


@pytest.mark.parametrize("opt_type,config,rule", META_CASES)
def test_meta_gradients_equal_unrolled_reference(opt_type, config, rule):
    """Second order through 3 steps, copy_initial_weights=False, with per-group
    learning rates given as `override` tensors that require grad: the gradients
    reach the model's parameters and the learning rates, as in the reference."""
    cfg = config_of(opt_type, config)
    lrs = [torch.tensor(v, dtype=DT, requires_grad=True) for v in (0.03, 0.02)]
    model = mlp(seed=2)
    opt = two_groups(opt_type, model, cfg)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": lrs}) as (
        fmodel,
        diffopt,
    ):
        for k in range(3):
            diffopt.step(loss_at(fmodel, k))
        got = torch.autograd.grad(loss_at(fmodel, 99), [*model.parameters(), *lrs])
    hypers = [{**cfg, "lr": lrs[0]}] * 2 + [{**cfg, "lr": lrs[1]}] * 2
    want = reference_meta_grads(model, hypers, rule, 3, [*model.parameters(), *lrs])
    assert rel_err(flat(got[:4]), flat(want[:4])) < GRAD_TOL
    assert rel_err(flat(got[4:]), flat(want[4:])) < GRAD_TOL
    assert all(float(g.abs()) > 0 for g in got[4:])


# ------------------------------------------------------------ first order, copying


def test_track_higher_grads_false_is_first_order():
    model = mlp(seed=3)
    cfg = SGD_CONFIGS["everything"]
    tracked = compat_trajectory(model, torch.optim.SGD, cfg, 3, copy_initial_weights=False)
    opt = two_groups(torch.optim.SGD, model, cfg)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False) as (
        fmodel,
        diffopt,
    ):
        for k in range(3):
            new = diffopt.step(loss_at(fmodel, k))
            assert all(p.grad_fn is None and p.requires_grad for p in new)  # detached leaves
            assert rel_err(flat(new), flat(tracked[k])) < STEP_TOL
        with pytest.raises(ValueError, match="time=1, but only the latest"):
            fmodel.parameters(time=1)
        with pytest.raises(ValueError, match="only the latest fast weights are kept"):
            _ = fmodel.init_fast_params
        assert all(a is b for a, b in zip(fmodel.parameters(time=0), new))
        query = loss_at(fmodel, 99)
        first_order = torch.autograd.grad(query, fmodel.fast_params, retain_graph=True)
        query.backward()
    assert all(p.grad is None for p in model.parameters())  # nothing reaches the model
    adapted = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(adapted.parameters(), new):
            p.copy_(q)
    want = torch.autograd.grad(loss_at(adapted, 99), list(adapted.parameters()))
    assert rel_err(flat(first_order), flat(want)) < STEP_TOL
    hypers = [{**cfg, "lr": 3 * cfg["lr"]}] * 2 + [cfg] * 2
    second = reference_meta_grads(model, hypers, reference_sgd, 3, list(model.parameters()))
    assert rel_err(flat(first_order), flat(second)) > 1e-3  # not the second-order one


@pytest.mark.parametrize("copy_initial_weights", [True, False])
def test_copy_initial_weights(copy_initial_weights):
    """True: the initial fast weights are detached copies; no gradient reaches the
    model (higher's default, the well-known gotcha), but the same meta-gradient
    reaches the time-0 fast weights. False: it reaches the model's parameters."""
    model = mlp(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=copy_initial_weights) as (
        fmodel,
        diffopt,
    ):
        initial = list(fmodel.parameters(time=0))
        for k in range(2):
            diffopt.step(loss_at(fmodel, k))
        query = loss_at(fmodel, 99)
        at_initial = torch.autograd.grad(query, initial, retain_graph=True)
        query.backward()
    hypers = [dict(lr=0.1, momentum=0.5)] * 4
    want = reference_meta_grads(model, hypers, reference_sgd, 2, list(model.parameters()))
    assert rel_err(flat(at_initial), flat(want)) < GRAD_TOL
    for p, p0 in zip(model.parameters(), initial):
        assert torch.equal(p0, p) and p0.data_ptr() != p.data_ptr()
        assert (p0.grad_fn is None) == copy_initial_weights
    if copy_initial_weights:
        assert all(p.grad is None for p in model.parameters())
    else:
        assert rel_err(flat(p.grad for p in model.parameters()), flat(want)) < GRAD_TOL


# ---------------------------------------------------- params=, override=, time=k


def test_forward_and_step_with_params():
    model = mlp(seed=5)
    x, _ = batch(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        other = [(1.5 * p).detach().requires_grad_() for p in model.parameters()]
        out = fmodel(x, params=other)
        assert rel_err(out, on(model, other)(x)) < STEP_TOL
        assert all(a is b for a, b in zip(fmodel.fast_params, other))
        assert len(list(fmodel.parameters(time=1))) == 4  # the forward added a version
        loss = loss_at(lambda x: fmodel(x, params=other), 0)
        grads = torch.autograd.grad(loss, other, retain_graph=True)
        new = diffopt.step(loss, params=other)
        assert rel_err(flat(new), flat(p - 0.2 * g for p, g in zip(other, grads))) < STEP_TOL
    plain = optim.get_diff_optim(opt, model.parameters())  # no fmodel: params are needed
    with pytest.raises(ValueError, match="pass params"):
        plain.step(loss_at(model, 0))
    stepped = plain.step(loss_at(on(model, other), 0), params=other)
    assert rel_err(flat(stepped), flat(new)) < STEP_TOL


def test_override_at_step_persists_and_errors():
    model = mlp(seed=6)
    opt = two_groups(torch.optim.SGD, model, dict(lr=0.1))
    with higher.innerloop_ctx(model, opt, override={"lr": [0.0]}) as (fmodel, diffopt):
        start = list(fmodel.parameters())
        frozen = diffopt.step(loss_at(fmodel, 0))  # lr 0 in both groups: no change
        assert rel_err(flat(frozen), flat(start)) == 0
        loss = loss_at(fmodel, 1)
        grads = torch.autograd.grad(loss, frozen, retain_graph=True)
        moved = diffopt.step(loss, override={"lr": [0.5, 0.25]})
        want = [p - lr * g for p, g, lr in zip(frozen, grads, (0.5, 0.5, 0.25, 0.25))]
        assert rel_err(flat(moved), flat(want)) < STEP_TOL
        assert [g["lr"] for g in diffopt.param_groups] == [0.5, 0.25]  # in force from now
        with pytest.raises(ValueError, match=r"override\['lr'\] holds 3 values; give 1"):
            diffopt.step(loss_at(fmodel, 2), override={"lr": [0.1, 0.2, 0.3]})
        with pytest.raises(ValueError, match="'lrr' is not a hyperparameter"):
            diffopt.step(loss_at(fmodel, 2), override={"lrr": [0.1]})
        with pytest.raises(TypeError, match=r"override\['lr'\] must be a list"):
            diffopt.step(loss_at(fmodel, 2), override={"lr": 0.1})


def test_parameters_time_history():
    model = mlp(seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        versions = [list(fmodel.parameters())]
        for k in range(3):
            versions.append(diffopt.step(loss_at(fmodel, k)))
        for time, version in enumerate(versions):
            assert all(a is b for a, b in zip(fmodel.parameters(time=time), version))
        assert all(a is b for a, b in zip(fmodel.parameters(time=-1), versions[3]))
        assert all(a is b for a, b in zip(fmodel.init_fast_params, versions[0]))
        assert isinstance(fmodel.init_fast_params, list)
        assert all(a is b for a, b in zip(fmodel.fast_params, versions[3]))
        with pytest.raises(IndexError, match="time=4, but the fast weights have 4 versions"):
            fmodel.parameters(time=4)
        assert len({id(p) for v in versions for p in v}) == 16  # four distinct versions


def test_grad_callback():
    """A callback given at creation applies to every step; one given to step()
    replaces it; both see one gradient per parameter (None: frozen)."""
    model = mlp(seed=8)
    model[0].bias.requires_grad_(False)
    want_model = copy.deepcopy(model)
    seen = []

    def clip(grads):
        seen.append([g is None for g in grads])
        total = flat(g.detach() for g in grads if g is not None).norm()
        scale = min(1.0, 0.05 / (float(total) + 1e-6))  # as clip_grad_norm_ scales
        return [None if g is None else g * scale for g in grads]

    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with higher.innerloop_ctx(model, opt) as (fmodel, _):
        diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel, grad_callback=clip)
        for k in range(3):
            got = diffopt.step(loss_at(fmodel, k))
        buffers = [diffopt.state[0][i]["momentum_buffer"] for i in (0, 2, 3)]
        zeroed = diffopt.step(
            loss_at(fmodel, 3), grad_callback=lambda gs: [None if g is None else 0 * g for g in gs]
        )
    want_opt = torch.optim.SGD(want_model.parameters(), lr=0.5, momentum=0.9)
    for k in range(3):
        want_opt.zero_grad()
        loss_at(want_model, k).backward()
        torch.nn.utils.clip_grad_norm_(want_model.parameters(), 0.05)
        want_opt.step()
    assert rel_err(flat(got), flat(want_model.parameters())) < STEP_TOL
    assert seen == [[False, True, False, False]] * 3  # the step's own callback replaced it
    want = [p - 0.5 * 0.9 * b for p, b in zip([got[0], got[2], got[3]], buffers)]
    assert rel_err(flat(zeroed[i] for i in (0, 2, 3)), flat(want)) < STEP_TOL
    assert zeroed[1] is got[1]  # frozen: never stepped


# ------------------------------------------------------------ models: BN, ties, RNN


def test_batchnorm_buffers_update_in_train_mode():
    """fmodel's own copies of the running statistics update in training mode, as the
    same forwards on a copy of the buffers do; fmodel.eval() uses them; the model's
    buffers and mode never change."""
    model = mlp(seed=9, bn=True).train()
    saved = {k: b.clone() for k, b in model.named_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for k in range(2):
            diffopt.step(loss_at(fmodel, k))
        out = fmodel(batch(99)[0])
        buffers = {k: b.clone() for k, b in saved.items()}
        versions = [list(fmodel.parameters(time=t)) for t in range(3)]
        want = [on(model, versions[t], buffers)(batch(k)[0]) for t, k in ((0, 0), (1, 1), (2, 99))]
        assert rel_err(out, want[-1]) < STEP_TOL
        got = dict(fmodel.named_buffers())
        assert int(got["1.num_batches_tracked"]) == int(buffers["1.num_batches_tracked"]) == 3
        for key in ("1.running_mean", "1.running_var"):
            assert rel_err(got[key], buffers[key]) < STEP_TOL
            assert rel_err(got[key], saved[key]) > 1e-3  # they moved
        fmodel.eval()
        assert model.training and not fmodel.training and not fmodel[1].training
        evaluated = fmodel(batch(5)[0])
    model.eval()
    assert rel_err(evaluated, on(model, versions[2], buffers)(batch(5)[0])) < STEP_TOL
    for key, b in model.named_buffers():
        assert torch.equal(b, saved[key])  # the model's buffers never change


class Tied(nn.Module):
    """A submodule used twice and a weight shared by two layers."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(7, 7)
        self.twice = nn.Sequential(self.inner, nn.Tanh(), self.inner)
        self.head = nn.Linear(7, 3)
        self.tail = nn.Linear(7, 3)
        self.tail.weight = self.head.weight

    def forward(self, x):
        h = torch.tanh(self.twice(x))
        return self.head(h) + self.tail(h * h)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(7, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.lstm(x.view(x.shape[0], 1, 7).expand(-1, 3, -1))
        return self.head(out[:, -1])


@pytest.mark.parametrize("make", [Tied, Recurrent])
def test_tied_and_recurrent_models_step_as_torch(make):
    torch.manual_seed(10)
    model = make().to(DT)
    assert (
        len(list(model.parameters())) < sum(len(m._parameters) for m in model.modules())
        or make is Recurrent
    )
    cfg = dict(lr=0.1, momentum=0.9)
    want_model = copy.deepcopy(model)
    want_opt = torch.optim.SGD(want_model.parameters(), **cfg)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), **cfg)) as (
        fmodel,
        diffopt,
    ):
        for k in range(3):
            got = diffopt.step(loss_at(fmodel, k))
            want_opt.zero_grad()
            loss_at(want_model, k).backward()
            want_opt.step()
            assert rel_err(flat(got), flat(want_model.parameters())) < STEP_TOL
        assert rel_err(fmodel(batch(5)[0]), want_model(batch(5)[0])) < STEP_TOL


def test_frozen_parameters_stay_frozen():
    model = mlp(seed=11)
    model[2].weight.requires_grad_(False)
    for track in (True, False):
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt, track_higher_grads=track) as (fmodel, diffopt):
            for k in range(3):
                new = diffopt.step(loss_at(fmodel, k))
            assert not new[2].requires_grad and torch.equal(new[2], model[2].weight)
            assert 2 not in diffopt.state[0]  # no Adam state for it


def test_optimizer_over_some_parameters():
    """An inner optimizer over the head only (ANIL): the other fast weights stay the
    initial ones, and with copy_initial_weights=False the meta-gradient still
    reaches them through the head's steps, as in the unrolled reference."""
    model = mlp(seed=16)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.2, momentum=0.5)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        initial = list(fmodel.parameters())
        for k in range(2):
            new = diffopt.step(loss_at(fmodel, k))
            assert new[0] is initial[0] and new[1] is initial[1]
        loss_at(fmodel, 99).backward()
    frozen = dict(lr=0.0)  # the body's reference rate: no step
    hypers = [frozen, frozen] + [dict(lr=0.2, momentum=0.5)] * 2
    want = reference_meta_grads(model, hypers, reference_sgd, 2, list(model.parameters()))
    assert rel_err(flat(p.grad for p in model.parameters()), flat(want)) < GRAD_TOL


def device_run(model, opt, device):
    """Three Adam steps of a float32 model on `device`: the fast weights, on the CPU."""
    with higher.innerloop_ctx(model, opt, device=device) as (fmodel, diffopt):
        for k in range(3):
            x, y = batch(k)
            new = diffopt.step(F.cross_entropy(fmodel(x.float().to(device)), y.to(device)))
        assert all(t.device.type == device for t in [*new, *fmodel.buffers()])
        kernel = fastmeta.backend.default_backend("inner_update", device, torch.float32)
        assert fastmeta.last_backend("inner_update") == kernel
    return flat(new).cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_moves_fast_weights_buffers_and_state():
    """device='cuda' with a CPU model: fast weights, BatchNorm buffers and the
    optimizer's state (after two CPU steps) on the GPU; the steps as on the CPU."""
    model = mlp(seed=17, bn=True).float()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    for k in range(2):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x.float()), y).backward()
        opt.step()
    assert rel_err(device_run(model, opt, "cuda"), device_run(model, opt, "cpu")) < 1e-5


# ---------------------------------------- make_functional, get_func_params, flatten


def test_make_functional_monkeypatch_buffer_sync():
    model = mlp(seed=12, bn=True)
    x, _ = batch(0)
    fmodule = patch.make_functional(model)
    assert isinstance(fmodule, nn.Sequential) and isinstance(fmodule, patch.PatchedModule)
    with pytest.raises(ValueError, match="no fast weights yet: pass params"):
        fmodule(x)
    params = utils.get_func_params(model)
    assert rel_err(fmodule(x, params=params), copy.deepcopy(model)(x)) < STEP_TOL
    with pytest.raises(ValueError, match="params must hold 6 tensors"):
        fmodule(x, params=params[:5])
    with pytest.raises(ValueError, match=r"params\[1\] \(0.bias\) must have shape \[5\]"):
        fmodule(x, params=[params[0], params[0], *params[2:]])
    with pytest.raises(ValueError, match="already a patched module"):
        patch.make_functional(fmodule)
    patch.buffer_sync(model, fmodule)
    assert all(torch.equal(a, b) for a, b in zip(fmodule.buffers(), model.buffers()))

    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    fmodel(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_get_func_params_and_flatten():
    model = mlp(seed=13)
    model[0].bias.requires_grad_(False)
    copies = utils.get_func_params(model)
    shared = utils.get_func_params(model, safe_copy=False)
    for p, c, s in zip(model.parameters(), copies, shared):
        assert torch.equal(c, p) and c.is_leaf and c.requires_grad == p.requires_grad
        assert c.data_ptr() != p.data_ptr() and s.data_ptr() == p.data_ptr()
    t = torch.ones(2)
    assert utils.flatten({"a": [1, (2, 3)], "b": {"c": t}}) == [1, 2, 3, t]
    assert utils.flatten(5) == [5] and utils.flatten([]) == []


# ---------------------------------------------------- the rest of higher.optim


def test_create_register_and_trainable_opt_params(monkeypatch):
    model = mlp(seed=14)
    fast = [p.detach().clone().requires_grad_() for p in model.parameters()]
    groups = [{"params": fast[:2], "lr": 0.3}, {"params": fast[2:]}]
    diffopt = higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, params=groups)
    want = torch_trajectory(model, torch.optim.SGD, dict(lr=0.1, momentum=0.9), 2)
    for k in range(2):
        fast = diffopt.step(loss_at(on(model, fast), k), params=fast)
        assert rel_err(flat(fast), flat(want[k])) < STEP_TOL

    class SignSGD(torch.optim.SGD):
        pass

    class DifferentiableSignSGD(optim.DifferentiableOptimizer):
        def _update(self, grouped_grads):
            for group, grads in zip(self.param_groups, grouped_grads):
                for i, (p, g) in enumerate(zip(group["params"], grads)):
                    group["params"][i] = p - group["lr"] * g.sign()

    monkeypatch.setitem(optim._opt_mapping, SignSGD, optim.DifferentiableSGD)
    higher.register_optim(SignSGD, DifferentiableSignSGD)
    with higher.innerloop_ctx(model, SignSGD(model.parameters(), lr=0.01)) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableSignSGD)
        new = diffopt.step(loss_at(fmodel, 0))
    assert torch.allclose(
        (flat(new) - flat(model.parameters())).abs(), torch.tensor(0.01, dtype=DT)
    )
    with pytest.raises(TypeError, match="DifferentiableOptimizer subclass"):
        higher.register_optim(SignSGD, SignSGD)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, nesterov=True)
    override = optim.get_trainable_opt_params(opt)
    assert sorted(override) == ["dampening", "lr", "momentum", "weight_decay"]  # no flags
    assert all(v[0].requires_grad for v in override.values())
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (f, d):
        d.step(loss_at(f, 0))
        loss_at(f, 99).backward()
    assert float(override["lr"][0].grad.abs()) > 0
    with torch.no_grad():
        override["lr"][0].fill_(0.25)
    optim.apply_trainable_opt_params(opt, override)
    assert opt.param_groups[0]["lr"] == 0.25 and opt.param_groups[0]["nesterov"] is True


def test_errors_name_the_argument():
    model = mlp()
    with pytest.raises(ValueError, match="no differentiable version of RMSprop"):
        with higher.innerloop_ctx(model, torch.optim.RMSprop(model.parameters())):
            pass
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got str"):
        higher.monkeypatch("model")
    with pytest.raises(TypeError, match="opt must be a torch.optim.Optimizer"):
        higher.get_diff_optim("sgd", model.parameters())
    stranger = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(
        ValueError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \[2\]\) is not"
    ):
        higher.get_diff_optim(stranger, model.parameters())
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (f, d):
        with pytest.raises(ValueError, match="loss does not depend on any fast weight"):
            d.step(loss_at(model, 0))  # the model, not fmodel
        with pytest.raises(ValueError, match="loss must be a one-element tensor, got \\[9, 3\\]"):
            d.step(f(batch(0)[0]))
        with pytest.raises(TypeError, match="track_higher_grads must be a bool"):
            f.track_higher_grads = 1


# ---------------------------------------- higher's MAML example, only the import changed


def conv_bn_net(seed: int, n_way: int, dtype) -> nn.Module:
    torch.manual_seed(seed)

    def block(cin):
        return [nn.Conv2d(cin, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1), *block(4), nn.Flatten(), nn.Linear(16, n_way)).to(dtype)


def synthetic_tasks(it: int, tasks: int, n_way: int, dtype):
    """n_way classes of a fixed pool of 8 noisy 8x8 patterns, labels shuffled per
    task: 2 support and 3 query images per class."""
    pool = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1000 + it)
    out = []
    for _ in range(tasks):
        classes = torch.randperm(8, generator=g)[:n_way]
        out.append((*_draw(pool, classes, 2, g, dtype), *_draw(pool, classes, 3, g, dtype)))
    return out


def _draw(pool, classes, per_class, g, dtype):
    y = torch.arange(len(classes)).repeat_interleave(per_class)
    x = pool[classes[y]] + 0.3 * torch.randn(len(y), 1, 8, 8, generator=g)
    return x.to(dtype), y


def maml_step(net, meta_opt, tasks, n_inner_iter):
    """higher's omniglot MAML example's train step, verbatim but for the data."""
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
    qry_losses = []
    meta_opt.zero_grad()
    for x_spt, y_spt, x_qry, y_qry in tasks:
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(n_inner_iter):
                spt_logits = fnet(x_spt)
                spt_loss = F.cross_entropy(spt_logits, y_spt)
                diffopt.step(spt_loss)
            qry_logits = fnet(x_qry)
            qry_loss = F.cross_entropy(qry_logits, y_qry)
            qry_losses.append(qry_loss.detach())
            qry_loss.backward()
    meta_opt.step()
    return float(sum(qry_losses)) / len(qry_losses)


def reference_maml_grads(net, tasks, lr, n_inner_iter):
    """The same meta-gradient in plain torch: functional_call on unrolled weights,
    each task with its own copy of the BatchNorm buffers."""
    total = [torch.zeros_like(p) for p in net.parameters()]
    for x_spt, y_spt, x_qry, y_qry in tasks:
        buffers = {k: b.clone() for k, b in net.named_buffers()}
        params = list(net.parameters())
        for _ in range(n_inner_iter):
            loss = F.cross_entropy(on(net, params, buffers)(x_spt), y_spt)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params = [p - lr * g for p, g in zip(params, grads)]
        query = F.cross_entropy(on(net, params, buffers)(x_qry), y_qry)
        for t, g in zip(total, torch.autograd.grad(query, list(net.parameters()))):
            t += g
    return total


def test_higher_maml_example_gradients_equal_plain_torch():
    net = conv_bn_net(0, 3, DT).train()
    tasks = synthetic_tasks(0, 3, 3, DT)
    want = reference_maml_grads(net, tasks, 1e-1, 3)
    meta_opt = torch.optim.SGD(net.parameters(), lr=0.0)
    maml_step(net, meta_opt, tasks, 3)
    assert rel_err(flat(p.grad for p in net.parameters()), flat(want)) < GRAD_TOL


def test_higher_maml_example_trains():
    net = conv_bn_net(1, 3, torch.float32).train()
    meta_opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    losses = [
        maml_step(net, meta_opt, synthetic_tasks(it, 2, 3, torch.float32), 2) for it in range(15)
    ]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


# ---------------------------------------------------- against the real higher 0.2.1


@pytest.fixture
def real_higher():
    return pytest.importorskip("higher")


def run_inner_loop(lib, model, make_opt, steps, **ctx):
    """Fast weights per step, BN buffers, and meta-gradients (model's parameters and
    an lr override tensor) of one inner loop run with `lib`."""
    model = copy.deepcopy(model)
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    with lib.innerloop_ctx(model, make_opt(model), override={"lr": [lr]}, **ctx) as (f, d):
        history = [d.step(loss_at(f, k)) for k in range(steps)]
        query = loss_at(f, 99)
        query.backward()
        buffers = [b.clone() for b in f.buffers()]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return history, buffers, grads, lr.grad


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: two_groups(torch.optim.SGD, m, SGD_CONFIGS["everything"]),
        lambda m: two_groups(torch.optim.SGD, m, SGD_CONFIGS["nesterov"]),
        lambda m: two_groups(
            torch.optim.Adam, m, dict(lr=0.01, eps=0.0, amsgrad=True, weight_decay=0.1)
        ),
    ],
    ids=["sgd", "sgd-nesterov", "adam-eps0"],
)
@pytest.mark.parametrize("track_higher_grads", [True, False])
def test_same_as_real_higher(real_higher, make_opt, track_higher_grads):
    """BatchNorm model, copy_initial_weights=False, lr override that requires grad,
    three steps: the same fast weights, buffers and gradients as higher's (Adam with
    eps=0: higher adds eps where torch.optim.Adam did before torch 1.6)."""
    model = mlp(seed=15, bn=True).train()
    ctx = dict(copy_initial_weights=False, track_higher_grads=track_higher_grads)
    ours = run_inner_loop(higher, model, make_opt, 3, **ctx)
    theirs = run_inner_loop(real_higher, model, make_opt, 3, **ctx)
    for got, want in zip(ours[0], theirs[0]):
        assert rel_err(flat(got), flat(want)) < STEP_TOL
    for got, want in zip(ours[1], theirs[1]):
        assert torch.equal(got, want) if got.dtype == torch.long else rel_err(got, want) < STEP_TOL
    assert len(ours[2]) == len(theirs[2]) == (6 if track_higher_grads else 0)
    if track_higher_grads:
        assert rel_err(flat(ours[2]), flat(theirs[2])) < GRAD_TOL
        assert rel_err(ours[3], theirs[3]) < GRAD_TOL
    else:
        assert ours[3] is None and theirs[3] is None
