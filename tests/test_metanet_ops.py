"""Meta Networks ops (gradient_mlp, attention_read) on every usable backend against
independent float64 computations, forward and backward."""

import math

import pytest
import torch
from conftest import rel_err

import fastmeta
from fastmeta.ops import attention_read, gradient_mlp

P = 10.0


def gradient_mlp_float64(grads, w1, b1, w2, b2, p=P):
    """The definition, written out element by element in float64 (autograd-able)."""
    g = grads.double()
    small = g.abs() < math.exp(-p)
    u0 = torch.where(small, torch.full_like(g, -1.0), g.abs().clamp_min(1e-300).log() / p)
    u1 = torch.where(small, math.exp(p) * g, g.sign())
    s = u0[..., None] * w1[:, 0].double() + u1[..., None] * w1[:, 1].double() + b1.double()
    return (torch.relu(s) * w2.double()).sum(-1) + b2.double()


def random_gradients(*shape, dtype=torch.float32):
    """Magnitudes from 1e-9 to 1e2 (both preprocessing branches), signs mixed, some
    exact zeros; none within 5% of the e^-p threshold, where float32 and float64 (or
    gradcheck's perturbations) may take different branches."""
    g = torch.randn(*shape, dtype=torch.float64) * 10 ** torch.empty(*shape).uniform_(-9, 2)
    g[torch.rand(*shape) < 0.05] = 0
    threshold = math.exp(-P)
    near = (g.abs() / threshold - 1).abs() < 0.05
    g[near] *= 1.2
    return g.to(dtype)


def mlp_parameters(hidden, dtype=torch.float32):
    return (
        torch.randn(hidden, 2, dtype=dtype),
        torch.randn(hidden, dtype=dtype),
        torch.randn(hidden, dtype=dtype),
        torch.randn((), dtype=dtype),
    )


@pytest.mark.op("gradient_mlp")
@pytest.mark.parametrize(
    "shape,hidden", [((1,), 1), ((7, 1001), 20), ((3, 5, 37), 33), ((2, 20011), 7)]
)
def test_gradient_mlp_matches_float64(backend_device, shape, hidden):
    name, device = backend_device
    grads = random_gradients(*shape).to(device)
    params = [t.to(device) for t in mlp_parameters(hidden)]
    inputs = [t.clone().requires_grad_() for t in (grads, *params)]
    expected_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    d_out = torch.randn(shape, device=device)
    with fastmeta.use_backend(name):
        out = gradient_mlp(*inputs, p=P)
        got = torch.autograd.grad(out, inputs, d_out)
    assert fastmeta.last_backend("gradient_mlp") == name
    expected = gradient_mlp_float64(*expected_inputs)
    want = torch.autograd.grad(expected, expected_inputs, d_out.double().cpu())
    assert out.shape == grads.shape and out.dtype == grads.dtype
    assert rel_err(out, expected) < 1e-5
    for arg, g, w in zip(("grads", "w1", "b1", "w2"), got, want):
        assert rel_err(g, w) < 1e-5, arg
    # d_b2 = sum(d_out): float32 rounding scales with sum |d_out|, not with |sum|, which
    # cancels to near zero for random d_out
    assert abs(float(got[4]) - float(want[4])) < 1e-6 * float(d_out.abs().sum()), "b2"


@pytest.mark.op("gradient_mlp")
def test_gradient_mlp_gradcheck(backend_device):
    name, device = backend_device
    if name == "triton":
        pytest.skip("Triton kernels run float32 only")
    inputs = [
        t.double().to(device).requires_grad_()
        for t in (random_gradients(3, 11), *mlp_parameters(5))
    ]
    # eps 1e-9: below e^-p gradients enter scaled by e^p = 2.2e4, so the default step
    # 1e-6 moves the hidden pre-activations by ~0.02 and crossed a relu kink (the finite
    # difference then disagrees) in about one run in four
    with fastmeta.use_backend(name):
        assert torch.autograd.gradcheck(lambda *a: gradient_mlp(*a, p=P), inputs, eps=1e-9)


@pytest.mark.op("gradient_mlp")
def test_gradient_mlp_backward_opcheck(backend_device):
    name, device = backend_device
    grads = random_gradients(4, 9).to(device)
    params = [t.to(device) for t in mlp_parameters(6)]
    with fastmeta.use_backend(name):
        torch.library.opcheck(
            torch.ops.fastmeta.gradient_mlp_backward.default,
            (torch.randn_like(grads), grads, *params[:3], P, True),
        )


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(w1=torch.randn(4, 3)), "w1 must be [H, 2], got [4, 3]"),
        (dict(b1=torch.randn(5)), "b1 must be [H=4]"),
        (dict(w2=torch.randn(4, 1)), "w2 must be [H=4]"),
        (dict(b2=torch.randn(1)), "b2 must be a 0-d tensor, got [1]"),
        (dict(grads=torch.ones(3, dtype=torch.int64)), "grads must be a floating-point tensor"),
        (dict(w1=torch.randn(4, 2, dtype=torch.float64)), "w1 has dtype torch.float64"),
        (dict(p=-1.0), "p must be a positive number"),
    ],
)
def test_gradient_mlp_bad_input(change, message):
    args = dict(
        grads=torch.randn(3),
        w1=torch.randn(4, 2),
        b1=torch.randn(4),
        w2=torch.randn(4),
        b2=torch.randn(()),
        p=P,
    )
    args.update(change)
    with pytest.raises((ValueError, TypeError)) as error:
        gradient_mlp(**args)
    assert message in str(error.value)


def attention_read_float64(attention, weights, x):
    """Query by query: W*_j = sum_i a_ji W*_i, then x_j W*_j^T."""
    B, M, _ = attention.shape
    out = []
    for b in range(B):
        rows = []
        for j in range(M):
            mixed = (attention[b, j, :, None, None].double() * weights[b].double()).sum(0)
            rows.append(x[b, j].double() @ mixed.T)
        out.append(torch.stack(rows))
    return torch.stack(out)


# (B, M, N, O, K, L); (1, 5, 2, 130, 129, 27) spans two O, K and M L row tiles of the
# Triton kernels even at the interpreter's 128-wide tiles; the last has O*K > 2^18, so the
# cpu and cuda kernels take one query at a time
READ_SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (3, 7, 5, 6, 11, 1),
    (2, 5, 4, 9, 13, 10),
    (1, 5, 2, 130, 129, 27),
    (1, 3, 2, 64, 4201, 2),
]

# fast_weights [1, 65, 4099, 8191]: 2.18e9 elements (8.7 GB in float32); W[0, 64] starts
# at element 64 * 4099 * 8191 > 2**31, past int32 (tests/test_gpu_kernels.py runs it)
LARGE_READ = (1, 2, 65, 4099, 8191, 1)


@pytest.mark.op("attention_read")
@pytest.mark.parametrize("B,M,N,O,K,L", READ_SHAPES)
def test_attention_read_matches_float64(backend_device, B, M, N, O, K, L):
    name, device = backend_device
    if name == "triton" and device == "cpu" and O * K > 10**5:
        pytest.skip("too large for the Triton interpreter")
    attention = torch.softmax(torch.randn(B, M, N), -1)
    inputs = [
        t.to(device).requires_grad_()
        for t in (attention, torch.randn(B, N, O, K), torch.randn(B, M, L, K))
    ]
    expected_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    d_out = torch.randn(B, M, L, O, device=device)
    with fastmeta.use_backend(name):
        out = attention_read(*inputs)
        got = torch.autograd.grad(out, inputs, d_out)
    assert fastmeta.last_backend("attention_read") == name
    expected = attention_read_float64(*expected_inputs)
    want = torch.autograd.grad(expected, expected_inputs, d_out.double().cpu())
    assert rel_err(out, expected) < 1e-5
    for arg, g, w in zip(("attention", "fast_weights", "x"), got, want):
        assert rel_err(g, w) < 1e-4, arg  # d_attention: float32 sums over O*K terms


@pytest.mark.op("attention_read")
def test_attention_read_partial_gradients(backend_device):
    """Only the gradients asked for are computed, and they are the same."""
    name, device = backend_device
    a, w, x = (torch.randn(2, 3, 4), torch.randn(2, 4, 5, 6), torch.randn(2, 3, 2, 6))
    with fastmeta.use_backend(name):
        for wanted in range(3):
            inputs = [t.to(device).requires_grad_(i == wanted) for i, t in enumerate((a, w, x))]
            (grad,) = torch.autograd.grad(attention_read(*inputs).sum(), [inputs[wanted]])
            every = [t.to(device).requires_grad_() for t in (a, w, x)]
            expected = torch.autograd.grad(attention_read(*every).sum(), every)[wanted]
            assert torch.equal(grad, expected)


@pytest.mark.op("attention_read")
def test_attention_read_backward_opcheck(backend_device):
    name, device = backend_device
    shapes = ((2, 3, 4), (2, 4, 5, 6), (2, 3, 2, 6))
    with fastmeta.use_backend(name):
        args = [torch.randn(s, device=device) for s in shapes]
        torch.library.opcheck(
            torch.ops.fastmeta.attention_read_backward.default,
            (torch.randn(2, 3, 2, 5, device=device), *args, True, False, True),
        )


def test_attention_read_fake_path_past_2_31_elements():
    """The op's fake (meta) kernels give the shapes of a read over > 2**31 fast-weight
    elements, forward and backward, without allocating them."""
    B, M, N, O, K, L = LARGE_READ
    assert (N - 1) * O * K > 2**31
    inputs = [
        torch.empty(s, device="meta", requires_grad=True)
        for s in ((B, M, N), (B, N, O, K), (B, M, L, K))
    ]
    out = attention_read(*inputs)
    assert out.shape == (B, M, L, O) and out.device.type == "meta"
    grads = torch.autograd.grad(out, inputs, torch.empty_like(out))
    assert [g.shape for g in grads] == [t.shape for t in inputs]
    assert all(g.device.type == "meta" for g in grads)


@pytest.mark.parametrize(
    "shapes,message",
    [
        (((2, 3), (2, 4, 5, 6), (2, 3, 2, 6)), "expected attention [B, M, N]"),
        (((2, 3, 4), (2, 5, 5, 6), (2, 3, 2, 6)), "B, M, N and K disagree"),
        (((2, 3, 4), (2, 4, 5, 6), (2, 3, 2, 7)), "x [2, 3, 2, 7]"),
        (((2, 3, 4), (1, 4, 5, 6), (2, 3, 2, 6)), "fast_weights [1, 4, 5, 6]"),
    ],
)
def test_attention_read_bad_shapes(shapes, message):
    with pytest.raises(ValueError) as error:
        attention_read(*(torch.randn(s) for s in shapes))
    assert message in str(error.value)


def test_attention_read_bad_dtype():
    with pytest.raises(TypeError, match="fast_weights has dtype torch.float64"):
        attention_read(
            torch.randn(1, 2, 3),
            torch.randn(1, 3, 4, 5, dtype=torch.float64),
            torch.randn(1, 2, 1, 5),
        )
    with pytest.raises(TypeError, match="attention must be a floating-point tensor"):
        attention_read(
            torch.ones(1, 2, 3, dtype=torch.int64), torch.randn(1, 3, 4, 5), torch.randn(1, 2, 1, 5)
        )
