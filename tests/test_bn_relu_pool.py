"""fastmeta.bn_relu_pool (BatchNorm2d batch stats -> ReLU -> MaxPool2d(2) on an
activation) on every backend against a float64 PyTorch oracle, and its fused view of a
conv stack."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPILED, CPU_KERNEL
from torch import nn

import fastmeta
from fastmeta.fused_blocks import FusedBnReluPool, FusedConvBlock, fuse_conv_blocks
from fastmeta.models import conv_bn_relu_pool
from fastmeta.ops.bn_relu_pool import bn_relu_pool, bn_relu_pool_with_statistics
from fastmeta.ops.conv_block import conv_block

OP = "bn_relu_pool"

# (N, C, H, W): odd sizes, rows/columns the pool drops (they still count in the
# statistics and get a gradient through them), the smallest pool, conv4's layers 2-4.
SHAPES = [(3, 5, 9, 7), (2, 3, 2, 2), (1, 4, 5, 6), (75, 6, 14, 14), (7, 3, 7, 7), (4, 2, 3, 3)]


def oracle(c, gamma, beta, eps=1e-5):
    return F.max_pool2d(F.relu(F.batch_norm(c, None, None, gamma, beta, training=True, eps=eps)), 2)


def make_inputs(shape, dtype, seed, tied=False):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(*shape, generator=g, dtype=torch.float64) + 2.0  # offset, as after a conv
    if tied:  # few distinct values: many exactly tied windows and relu boundaries
        c = (c * 2).round() / 2
    gamma, beta = (torch.randn(shape[1], generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype).requires_grad_() for t in (c, gamma, beta)]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_oracle(backend_device, shape, tied):
    name, device = backend_device
    inputs = make_inputs(shape, torch.float32, seed=sum(shape), tied=tied)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    want = oracle(*exact)
    go = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, exact, go)
    with fastmeta.use_backend(name):
        got = bn_relu_pool(*inputs)
        got_grads = torch.autograd.grad(got, inputs, go.float())
    assert fastmeta.last_backend(OP) == name
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for arg, g_got, g_want in zip(("c", "gamma", "beta"), got_grads, want_grads):
        err = float((g_got.double() - g_want).abs().max()) / float(g_want.abs().max())
        assert err < 2e-5, (arg, err)


def test_statistics_match_batch_norm():
    c, gamma, beta = make_inputs((4, 3, 6, 5), torch.float64, seed=4)
    c = (c * 1e3 + 1e4).detach()  # a large offset must not cancel the variance
    for name in ("reference", "cpu"):
        with fastmeta.use_backend(name):
            _, mean, rstd, _ = torch.ops.fastmeta.bn_relu_pool(c, gamma, beta, 1e-5)
        var, want_mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-5), rtol=1e-9, atol=0)


def test_bad_input_names_the_argument():
    c, gamma, beta = make_inputs((2, 3, 4, 4), torch.float32, seed=3)
    with pytest.raises(ValueError, match=r"c must be \[N, C, H, W\].*got \[2, 3, 4\]"):
        bn_relu_pool(c[..., 0], gamma, beta)
    with pytest.raises(ValueError, match=r"H, W >= 2.*got \[2, 3, 1, 4\]"):
        bn_relu_pool(c[:, :, :1], gamma, beta)
    with pytest.raises(ValueError, match=r"beta must be \[C\] = \[3\].*got \[4\]"):
        bn_relu_pool(c, gamma, torch.zeros(4))
    with pytest.raises(TypeError, match="gamma has dtype torch.float64"):
        bn_relu_pool(c, gamma.double(), beta)
    with pytest.raises(TypeError, match="c must be a floating-point tensor"):
        bn_relu_pool(c.int(), gamma, beta)


def test_fused_view_matches_the_model_and_updates_running_statistics():
    """fuse_conv_blocks(bn_relu_pool=True): layers 2-3 of a conv stack run the fused op
    (their input needs a gradient); outputs, every gradient and the running statistics
    equal the plain model's."""
    torch.manual_seed(0)
    layers = []
    for cin in (1, 8, 8):
        layers += [nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 3 * 3, 5)).double()
    plain = copy.deepcopy(model)
    assert fuse_conv_blocks(model) is not None
    assert not any(isinstance(m, FusedBnReluPool) for m in fuse_conv_blocks(model).modules())
    view = fuse_conv_blocks(model, bn_relu_pool=True)
    assert isinstance(view[0], FusedConvBlock)
    assert [type(m) for m in view[1:5]] == [nn.Conv2d, FusedBnReluPool, nn.Conv2d, FusedBnReluPool]
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    fastmeta.backend.forget_last_backends([OP])
    got, want = view(x), plain(x)
    assert fastmeta.last_backend(OP) == CPU_KERNEL
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(want)
    for g_got, g_want in zip(
        torch.autograd.grad(got, list(model.parameters()), go),
        torch.autograd.grad(want, list(plain.parameters()), go),
    ):
        torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)
    norms = [[m for m in net if isinstance(m, nn.BatchNorm2d)] for net in (model, plain)]
    for fused_bn, plain_bn in zip(*norms):
        torch.testing.assert_close(fused_bn.running_var, plain_bn.running_var)
        torch.testing.assert_close(fused_bn.running_mean, plain_bn.running_mean)


def test_fused_block_ops_do_not_depend_on_the_thread_count():
    """conv_block and bn_relu_pool give bitwise the same outputs and gradients with 1, 2
    and 3 threads (each sum has one owner and a fixed order)."""
    if not COMPILED:
        pytest.skip("the C++ kernels are not built")
    g = torch.Generator().manual_seed(5)
    x = torch.rand(13, 1, 28, 28, generator=g)
    conv_params = [
        torch.randn(9, 1, 3, 3, generator=g),
        torch.randn(9, generator=g),
        torch.rand(9, generator=g) + 0.5,
        torch.randn(9, generator=g),
    ]
    c, gamma, beta = make_inputs((13, 9, 14, 14), torch.float32, seed=6)

    def run():
        params = [p.detach().requires_grad_() for p in conv_params]
        with fastmeta.use_backend("cpu"):
            y = conv_block(x, *params)
            z = bn_relu_pool(c, gamma, beta)
            return [
                y,
                *torch.autograd.grad(y, params, torch.ones_like(y)),
                z,
                *torch.autograd.grad(z, [c, gamma, beta], torch.ones_like(z)),
            ]

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_the_reference_and_says_so(dtype):
    """The C++ kernels take float32 and float64: a half-precision call runs the reference
    (it crashed inside the kernel before), and backends() lists the fallback."""
    torch.manual_seed(0)
    c = torch.randn(3, 4, 6, 6)
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    got = bn_relu_pool(c.to(dtype), gamma.to(dtype), beta.to(dtype))
    assert fastmeta.last_backend(OP) == "reference" and got.dtype == dtype
    want = bn_relu_pool(c.double(), gamma.double(), beta.double())
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    x = torch.randn(2, 1, 8, 8).to(dtype)
    block = conv_block(x, torch.randn(3, 1, 3, 3).to(dtype), None, None, None)
    assert fastmeta.last_backend("conv_block") == "reference" and block.dtype == dtype
    report = fastmeta.backends()
    for op in (OP, "conv_block"):  # a fallback only where the cpu backend exists
        assert (dtype in report.fallbacks.get(op, {}).get("cpu", {})) == COMPILED, op


def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(backend_device):
    """N = 0 (it crashed the cpu kernel): empty output, NaN statistics (var_mean of
    nothing), zero gamma/beta gradients, on every backend."""
    name, device = backend_device
    c = torch.randn(0, 4, 6, 6, device=device, requires_grad=True)
    gamma = torch.rand(4, device=device, requires_grad=True)
    beta = torch.randn(4, device=device, requires_grad=True)
    with fastmeta.use_backend(name):
        out, mean, rstd = bn_relu_pool_with_statistics(c, gamma, beta)
        grads = torch.autograd.grad(out.sum(), (c, gamma, beta), allow_unused=True)
    assert fastmeta.last_backend(OP) == name
    assert out.shape == (0, 4, 3, 3) and mean.isnan().all() and rstd.isnan().all()
    assert grads[0].shape == c.shape
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g))


def test_the_fused_view_of_an_empty_batch_is_the_model():
    """ProtoNet(fuse=True) and MAML reach the fused blocks with whatever batch they get:
    an empty one gives what the plain modules give, running statistics unchanged."""
    model = nn.Sequential(*conv_bn_relu_pool(1, 4), *conv_bn_relu_pool(4, 4))
    plain = copy.deepcopy(model)
    view = fuse_conv_blocks(model, bn_relu_pool=True)
    x = torch.randn(0, 1, 12, 12)
    got, want = view(x), plain(x)
    assert got.shape == want.shape == (0, 4, 3, 3)
    for fused_bn, plain_bn in zip(model[1::4], plain[1::4]):
        torch.testing.assert_close(fused_bn.running_mean, plain_bn.running_mean)
        torch.testing.assert_close(fused_bn.running_var, plain_bn.running_var)
