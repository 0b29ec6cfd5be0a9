"""fastmeta.inner_update against a float64 reference, on every usable backend."""

import pytest
import torch
from conftest import rel_err

import fastmeta

OP = "inner_update"
ALPHA_KINDS = ("scalar", "per_element", "per_task")


def make_alpha(kind, T, P, dtype, device):
    shape = {"scalar": (), "per_element": (P,), "per_task": (T, P)}[kind]
    return torch.rand(shape, dtype=dtype, device=device) * 0.5 + 0.05


def reference_float64(theta, alpha, g, go, sign=-1.0):
    """Plain float64 math of the op, written independently of fastmeta.

    Returns (out, d_theta, d_alpha, d_g). With sign=+1 and absolute-valued inputs it
    gives each result's magnitude (the sums of |terms|), the scale of float32 rounding.
    """
    theta, alpha, g, go = (x.detach().double().cpu() for x in (theta, alpha, g, go))
    out = theta[None, :] + sign * alpha * g
    d_theta = go.sum(0)
    d_g = sign * alpha * go
    d_alpha = sign * (g * go)
    if alpha.dim() == 0:
        d_alpha = d_alpha.sum()
    elif alpha.dim() == 1:
        d_alpha = d_alpha.sum(0)
    return out, d_theta, d_alpha, d_g


def float32_error(got, want, magnitude) -> float:
    """||got - want|| over ||magnitude||: float32 rounding keeps this near 1e-7, even
    where the result cancels to near zero (a plain relative error would blow up)."""
    err = (got.detach().double().cpu() - want).norm() / magnitude.norm().clamp_min(1e-300)
    return float("inf") if torch.isnan(err) else float(err)


@pytest.mark.parametrize(
    "T,P", [(1, 1), (3, 1000), (32, 1000), (3, 1_000_003), (32, 1_000_003), (1, 1_000_003), (32, 1)]
)
@pytest.mark.parametrize("alpha_kind", ALPHA_KINDS)
def test_matches_float64_reference(backend_device, T, P, alpha_kind):
    name, device = backend_device
    theta = torch.randn(P, device=device, requires_grad=True)
    g = torch.randn(T, P, device=device, requires_grad=True)
    alpha = make_alpha(alpha_kind, T, P, torch.float32, device).requires_grad_()
    go = torch.randn(T, P, device=device)
    with fastmeta.use_backend(name):
        out = fastmeta.inner_update(theta, alpha, g)
        assert fastmeta.last_backend(OP) == name
        out.backward(go)
    expected = reference_float64(theta, alpha, g, go)
    magnitudes = reference_float64(*(x.abs() for x in (theta, alpha, g, go)), sign=1.0)
    for got, want, mag, label in zip(
        (out, theta.grad, alpha.grad, g.grad),
        expected,
        magnitudes,
        ("out", "d_theta", "d_alpha", "d_g"),
    ):
        assert got.shape == want.shape, label
        assert got.dtype == torch.float32, label
        error = float32_error(got, want, mag)
        assert error < 1e-6, f"{label}: {error}"


@pytest.mark.parametrize("need_g,need_alpha", [(False, False), (True, False), (False, True)])
def test_backward_skips_unneeded_grads(backend_device, need_g, need_alpha):
    name, device = backend_device
    T, P = 5, 333
    theta = torch.randn(P, device=device, requires_grad=True)
    g = torch.randn(T, P, device=device, requires_grad=need_g)
    alpha = make_alpha("per_element", T, P, torch.float32, device).requires_grad_(need_alpha)
    go = torch.randn(T, P, device=device)
    with fastmeta.use_backend(name):
        fastmeta.inner_update(theta, alpha, g).backward(go)
    _, d_theta, d_alpha, d_g = reference_float64(theta, alpha, g, go)
    assert rel_err(theta.grad, d_theta) < 1e-6
    assert (g.grad is not None) == need_g and (alpha.grad is not None) == need_alpha
    if need_g:
        assert rel_err(g.grad, d_g) < 1e-6
    if need_alpha:
        assert rel_err(alpha.grad, d_alpha) < 1e-6


def test_float_alpha_and_deterministic_backward(backend_device):
    name, device = backend_device
    theta = torch.randn(4097, device=device, requires_grad=True)
    g = torch.randn(7, 4097, device=device, requires_grad=True)
    alpha = torch.tensor(0.4, device=device, requires_grad=True)
    go = torch.randn(7, 4097, device=device)
    with fastmeta.use_backend(name):
        out = fastmeta.inner_update(theta, 0.4, g)
        first = torch.autograd.grad(fastmeta.inner_update(theta, alpha, g), (theta, alpha, g), go)
        second = torch.autograd.grad(fastmeta.inner_update(theta, alpha, g), (theta, alpha, g), go)
    assert rel_err(out, reference_float64(theta, alpha, g, go)[0]) < 1e-6
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _float64_ok(name, device):
    return fastmeta.backend.unavailable_reason(name, device, torch.float64) is None


@pytest.mark.parametrize("alpha_kind", ALPHA_KINDS)
def test_gradcheck_and_gradgradcheck(backend_device, alpha_kind):
    name, device = backend_device
    if not _float64_ok(name, device):
        pytest.skip(f"{name} on {device} has no float64")
    T, P = 3, 5
    theta = torch.randn(P, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(T, P, dtype=torch.float64, device=device, requires_grad=True)
    alpha = make_alpha(alpha_kind, T, P, torch.float64, device).requires_grad_()
    with fastmeta.use_backend(name):
        assert torch.autograd.gradcheck(fastmeta.inner_update, (theta, alpha, g))
        assert torch.autograd.gradgradcheck(fastmeta.inner_update, (theta, alpha, g))


def test_second_order_meta_gradient(backend_device):
    """MAML-style: g depends on theta (create_graph), the meta-gradient goes through g."""
    name, device = backend_device
    T, P = 4, 37
    x = torch.randn(T, P, device=device)
    theta0 = torch.randn(P, device=device)
    alpha0 = torch.tensor(0.3, device=device)

    def meta_grads(update, dtype):
        theta = theta0.to(dtype).requires_grad_()
        alpha = alpha0.to(dtype).requires_grad_()
        xs = x.to(dtype)
        support_loss = ((theta * xs).sin() ** 2).sum()
        (g,) = torch.autograd.grad(support_loss, theta, create_graph=True)  # same g each task
        g = g * xs  # task-specific, still a function of theta
        fast = update(theta, alpha, g)
        query_loss = (fast.cos() * xs).sum()
        return torch.autograd.grad(query_loss, (theta, alpha))

    with fastmeta.use_backend(name):
        got = meta_grads(fastmeta.inner_update, torch.float32)
    want = meta_grads(lambda th, a, g: th - a * g, torch.float64)
    for a, b in zip(got, want):  # float32 through two sin/cos layers and a second-order term
        assert rel_err(a, b) < 1e-4


def test_opcheck(backend_device):
    name, device = backend_device
    T, P = 3, 17
    cases = [
        (
            torch.randn(P, device=device),
            make_alpha(kind, T, P, torch.float32, device),
            torch.randn(T, P, device=device),
        )
        for kind in ALPHA_KINDS
    ]
    with fastmeta.use_backend(name):
        for theta, alpha, g in cases:
            for rg in (False, True):
                args = (
                    theta.clone().requires_grad_(rg),
                    alpha.clone().requires_grad_(rg),
                    g.clone().requires_grad_(rg),
                )
                torch.library.opcheck(torch.ops.fastmeta.inner_update.default, args)
            go = torch.randn(T, P, device=device)
            torch.library.opcheck(
                torch.ops.fastmeta.inner_update_backward.default, (go, alpha, g, True, True)
            )
        # transposed (non-contiguous) g and grad_out: outputs stay contiguous, as the fake says
        g_t = torch.randn(P, T, device=device).t()
        theta, alpha = torch.randn(P, device=device), torch.tensor(0.1, device=device)
        torch.library.opcheck(torch.ops.fastmeta.inner_update.default, (theta, alpha, g_t))
        torch.library.opcheck(
            torch.ops.fastmeta.inner_update_backward.default,
            (torch.randn(P, T, device=device).t(), alpha, g_t, True, True),
        )


def test_torch_compile_fullgraph(backend_device):
    name, device = backend_device
    torch._dynamo.reset()
    T, P = 3, 257

    def step(theta, alpha, g):
        return (fastmeta.inner_update(theta, alpha, g).tanh() ** 2).sum()

    compiled = torch.compile(step, fullgraph=True)
    theta = torch.randn(P, device=device, requires_grad=True)
    g = torch.randn(T, P, device=device, requires_grad=True)
    alpha = make_alpha("per_element", T, P, torch.float32, device).requires_grad_()
    with fastmeta.use_backend(name):
        loss = compiled(theta, alpha, g)
        grads = torch.autograd.grad(loss, (theta, alpha, g))
        assert fastmeta.last_backend(OP) == name
    with fastmeta.use_backend("reference"):
        loss_ref = step(theta, alpha, g)
        grads_ref = torch.autograd.grad(loss_ref, (theta, alpha, g))
    assert rel_err(loss, loss_ref) < 1e-6
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 1e-5


BAD_INPUTS = [
    # (description, theta shape, alpha shape, g shape, error type, words the message must hold)
    ("theta too long", (6,), (), (3, 5), ValueError, ["theta", "[5]", "[6]"]),
    ("theta 2-D", (3, 5), (), (3, 5), ValueError, ["theta", "[3, 5]"]),
    ("g 1-D", (5,), (), (5,), ValueError, ["g", "[T, P]", "[5]"]),
    ("alpha wrong length", (5,), (4,), (3, 5), ValueError, ["alpha", "[4]"]),
    ("alpha [1] is not a scalar", (5,), (1,), (3, 5), ValueError, ["alpha", "[1]"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_shapes_name_the_argument(case):
    _, theta_shape, alpha_shape, g_shape, error, words = case
    with pytest.raises(error) as info:
        fastmeta.inner_update(
            torch.randn(theta_shape), torch.rand(alpha_shape), torch.randn(g_shape)
        )
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_dtypes_and_devices_name_the_argument():
    theta, g = torch.randn(5), torch.randn(3, 5)
    with pytest.raises(
        TypeError, match="theta must be a floating-point tensor, got dtype torch.int64"
    ):
        fastmeta.inner_update(torch.arange(5), 0.1, g)
    with pytest.raises(TypeError, match="theta has dtype torch.float64 but g has torch.float32"):
        fastmeta.inner_update(theta.double(), torch.tensor(0.1), g)
    with pytest.raises(TypeError, match="alpha has dtype torch.float64"):
        fastmeta.inner_update(theta, torch.tensor(0.1, dtype=torch.float64), g)
    with pytest.raises(ValueError, match="theta is on meta but g is on cpu"):
        fastmeta.inner_update(theta.to("meta"), torch.tensor(0.1), g)
    with pytest.raises(TypeError, match="g must be a torch.Tensor, got list"):
        fastmeta.inner_update(theta, 0.1, [[1.0]])


@pytest.mark.parametrize(
    "dtype,tolerance", [(torch.float64, 1e-13), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]
)
def test_other_dtypes(backend_device, dtype, tolerance):
    name, device = backend_device
    reason = fastmeta.backend.unavailable_reason(name, device, dtype)
    if reason is not None:
        pytest.skip(reason)
    T, P = 5, 3001
    theta = torch.randn(P, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, P, device=device, dtype=dtype, requires_grad=True)
    alpha = make_alpha("per_element", T, P, dtype, device).requires_grad_()
    go = torch.randn(T, P, device=device, dtype=dtype)
    with fastmeta.use_backend(name):
        out = fastmeta.inner_update(theta, alpha, g)
        out.backward(go)
    expected = reference_float64(theta, alpha, g, go)
    magnitudes = reference_float64(*(x.abs() for x in (theta, alpha, g, go)), sign=1.0)
    for got, want, mag in zip((out, theta.grad, alpha.grad, g.grad), expected, magnitudes):
        assert got.dtype == dtype
        assert float32_error(got, want, mag) < tolerance
