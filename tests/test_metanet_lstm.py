"""The LSTM task generator d (the paper's d): the fused gradient_lstm op on every usable
backend against an LSTM written out gate by gate in float64, forward and gradients;
gradcheck; bad arguments; and MetaNetwork(task_generator="lstm"), fused against the
same model in plain PyTorch, first and second order."""

import math

import pytest
import torch
from conftest import COMPILED, rel_err
from test_metanet import assert_fused_equals_plain, episodes, live
from test_metanet_ops import P, random_gradients

import fastmeta
from fastmeta import backend
from fastmeta.metanet import GradientLSTM, MetaNetwork, mlp_network
from fastmeta.ops import gradient_lstm

OP = "gradient_lstm"


def lstm_float64(grads, w_ih, w_hh, b, w_out, b_out, p=P):
    """The definition written out: for every coordinate, gates from W [u_t; h] + b with
    W = [w_ih w_hh] [4H, 2 + H], then c = f c + i g, h = o tanh c over t = 0 .. N-1
    from zero state; w_out . h_N + b_out. grads [B, N, ...] -> [B, ...]."""
    g = grads.double().reshape(grads.shape[0], grads.shape[1], -1)  # [B, N, Q]
    H = w_hh.shape[1]
    small = g.abs() < math.exp(-p)
    u = torch.stack(
        (
            torch.where(small, torch.full_like(g, -1.0), g.abs().clamp_min(1e-300).log() / p),
            torch.where(small, math.exp(p) * g, g.sign()),
        ),
        -1,
    )  # [B, N, Q, 2]
    W = torch.cat((w_ih, w_hh), 1).double()
    h = c = g.new_zeros(g.shape[0], g.shape[2], H)
    for t in range(g.shape[1]):
        z = torch.cat((u[:, t], h), -1) @ W.T + b.double()
        i, f = torch.sigmoid(z[..., :H]), torch.sigmoid(z[..., H : 2 * H])
        cell_input, o = torch.tanh(z[..., 2 * H : 3 * H]), torch.sigmoid(z[..., 3 * H :])
        c = f * c + i * cell_input
        h = o * torch.tanh(c)
    out = h @ w_out.double() + b_out.double()
    return out.reshape(grads.shape[0], *grads.shape[2:])


def lstm_parameters(hidden, dtype=torch.float32):
    """w_ih [4H, 2], w_hh [4H, H], b [4H], w_out [H], b_out []: scaled so that the gates
    are neither all saturated nor all linear."""
    return (
        torch.randn(4 * hidden, 2, dtype=dtype),
        torch.randn(4 * hidden, hidden, dtype=dtype) / math.sqrt(hidden),
        torch.randn(4 * hidden, dtype=dtype),
        torch.randn(hidden, dtype=dtype),
        torch.randn((), dtype=dtype),
    )


TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "shape,hidden",
    [((1, 1), 1), ((2, 1, 7), 3), ((3, 3, 2, 5), 4), ((2, 5, 33), 20), ((1, 12, 301), 17)],
    ids=["N=1-one-coordinate", "N=1", "N=3-coords-2x5", "N=5-H=20", "N=12-partial-blocks"],
)
def test_gradient_lstm_matches_float64(backend_device, shape, hidden, dtype):
    name, device = backend_device
    if backend.op_unavailable_reason(OP, name, device, dtype):
        pytest.skip(backend.op_unavailable_reason(OP, name, device, dtype))
    grads = random_gradients(*shape, dtype=dtype).to(device)
    params = [t.to(device) for t in lstm_parameters(hidden, dtype)]
    inputs = [t.clone().requires_grad_() for t in (grads, *params)]
    expected_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    out_shape = (shape[0], *shape[2:])
    d_out = torch.randn(out_shape, device=device, dtype=dtype)
    with fastmeta.use_backend(name):
        out = gradient_lstm(*inputs, p=P)
        got = torch.autograd.grad(out, inputs, d_out)
    assert fastmeta.last_backend(OP) == name
    expected = lstm_float64(*expected_inputs)
    want = torch.autograd.grad(expected, expected_inputs, d_out.double().cpu())
    assert out.shape == out_shape and out.dtype == dtype
    assert rel_err(out, expected) < TOLERANCE[dtype]
    for arg, g, w in zip(("grads", "w_ih", "w_hh", "b", "w_out"), got, want):
        if float(w.norm()) == 0:  # d_w_hh when N = 1: h_0 = 0
            assert float(g.norm()) == 0, arg
            continue
        assert rel_err(g, w) < TOLERANCE[dtype], arg
    # d_b_out = sum(d_out): rounding scales with sum |d_out|, not with the sum
    assert abs(float(got[5]) - float(want[5])) < 1e-6 * float(d_out.abs().sum()), "b_out"


def test_gradient_lstm_gradcheck(backend_device):
    name, device = backend_device
    if backend.op_unavailable_reason(OP, name, device, torch.float64):
        pytest.skip(backend.op_unavailable_reason(OP, name, device, torch.float64))
    inputs = [
        t.double().to(device).requires_grad_()
        for t in (random_gradients(2, 3, 5), *lstm_parameters(3))
    ]
    # eps 1e-9: below e^-p gradients enter scaled by e^p = 2.2e4
    with fastmeta.use_backend(name):
        assert torch.autograd.gradcheck(lambda *a: gradient_lstm(*a, p=P), inputs, eps=1e-9)


def test_gradient_lstm_backward_opcheck(backend_device):
    name, device = backend_device
    grads = random_gradients(2, 4, 9).to(device)
    params = [t.to(device) for t in lstm_parameters(6)]
    with fastmeta.use_backend(name):
        torch.library.opcheck(
            torch.ops.fastmeta.gradient_lstm_backward.default,
            (torch.randn(2, 9, device=device), grads, *params[:4], P, True),
        )


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(grads=torch.randn(5)), "grads must be [B, N, ...] (episodes, examples"),
        (dict(grads=torch.ones(2, 3, dtype=torch.int64)), "grads must be a floating-point"),
        (dict(w_hh=torch.randn(8, 3)), "w_hh must be [4H, H] with H >= 1, got [8, 3]"),
        (dict(w_ih=torch.randn(8, 3)), "w_ih must be [8, 2] for H=2 of w_hh [8, 2], got [8, 3]"),
        (dict(b=torch.randn(7)), "b must be [8] for H=2"),
        (dict(w_out=torch.randn(3)), "w_out must be [2] for H=2"),
        (dict(b_out=torch.randn(1)), "b_out must be a 0-d tensor, got [1]"),
        (dict(b=torch.randn(8, dtype=torch.float64)), "b has dtype torch.float64"),
        (dict(p=0.0), "p must be a positive number, got 0.0"),
    ],
)
def test_gradient_lstm_bad_input(change, message):
    args = dict(
        grads=torch.randn(2, 3),
        w_ih=torch.randn(8, 2),
        w_hh=torch.randn(8, 2),
        b=torch.randn(8),
        w_out=torch.randn(2),
        b_out=torch.randn(()),
        p=P,
    )
    args.update(change)
    with pytest.raises((ValueError, TypeError)) as raised:
        gradient_lstm(**args)
    assert message in str(raised.value)


def test_generator_reads_the_examples_in_the_order_given():
    """GradientLSTM (fused and plain) is the op on its parameters; reversing the
    examples changes its output (the paper's d is not permutation invariant)."""
    torch.manual_seed(0)
    d = GradientLSTM(hidden=5).double()
    grads = random_gradients(2, 4, 3, 6, dtype=torch.float64)
    expected = lstm_float64(grads, d.w_ih, d.w_hh, d.b, d.w_out, d.b_out, d.p)
    assert rel_err(d(grads), expected) < 1e-12
    assert rel_err(d.plain(grads), expected) < 1e-12
    assert rel_err(d(grads.flip(1)), expected) > 1e-3


@pytest.mark.parametrize("second_order", [False, True])
def test_conv4_lstm_model_equals_plain_pytorch_float64(second_order):
    torch.manual_seed(0)
    model = live(MetaNetwork(ways=3, second_order=second_order, task_generator="lstm")).double()
    batch = episodes(2, 3, 2, 4, (1, 28, 28))
    fastmeta.backend.forget_last_backends([OP])
    assert_fused_equals_plain(model, batch, 1e-9)
    assert fastmeta.last_backend(OP) == ("cpu" if COMPILED else "reference")
    assert all(p.grad is not None for p in model.d.parameters())


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_lstm_model_equals_plain_pytorch_on_every_backend_float32(name):
    if backend.op_unavailable_reason(OP, name, "cpu", torch.float32):
        pytest.skip(backend.op_unavailable_reason(OP, name, "cpu", torch.float32))
    torch.manual_seed(1)
    model = live(
        MetaNetwork(mlp_network(13, 24, ways=4), mlp_network(13, 24), task_generator="lstm")
    )
    batch = episodes(3, 4, 3, 5, (13,), dtype=torch.float32)
    assert_fused_equals_plain(model, batch, 1e-4, name)
    assert fastmeta.last_backend(OP) == name


def test_lstm_model_depends_on_the_support_order():
    """The memory read is order-free, but Q* (d over the examples in order) is not."""
    torch.manual_seed(3)
    rep = mlp_network(5, 16)
    model = live(MetaNetwork(mlp_network(5, 16, ways=3), rep, task_generator="lstm")).double()
    sx, sy, qx, _ = episodes(2, 3, 2, 4, (5,))
    with torch.no_grad():
        model.d.w_out.mul_(100)  # Q* large enough to move the logits visibly
    order = torch.arange(sx.shape[1]).flip(0)
    assert not torch.allclose(model(sx, sy, qx), model(sx[:, order], sy[:, order], qx))


def test_bad_task_generator_names_the_argument_and_the_choices():
    with pytest.raises(ValueError) as raised:
        MetaNetwork(mlp_network(3, ways=2), mlp_network(3), task_generator="gru")
    assert "task_generator must be one of ('mlp', 'lstm'), got 'gru'" in str(raised.value)
