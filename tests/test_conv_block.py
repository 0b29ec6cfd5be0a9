"""fastmeta.conv_block (Conv2d -> BatchNorm2d batch stats -> ReLU -> MaxPool2d(2)) on
every backend against a float64 PyTorch oracle, and its use inside MAML."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPILED, CPU_KERNEL
from torch import nn

import fastmeta
from fastmeta.fused_blocks import FusedConvBlock, fuse_conv_blocks
from fastmeta.models import conv_bn_relu_pool
from fastmeta.ops.conv_block import conv_block, conv_block_with_statistics

OP = "conv_block"

# (N, Cin, H, W, C, K, pad): odd sizes, a conv output with an odd row/column that the
# pool drops (it still counts in the batch statistics), K = 1 and 5, no and wide padding.
SHAPES = [
    (3, 1, 9, 7, 5, 3, 1),
    (4, 3, 8, 11, 6, 3, 0),
    (2, 2, 6, 6, 3, 5, 2),
    (5, 1, 28, 28, 7, 3, 1),
    (1, 3, 5, 4, 2, 1, 0),
]


def oracle(x, weight, bias, gamma, beta, pad, eps=1e-5):
    c = F.conv2d(x, weight, bias, padding=pad)
    return F.max_pool2d(F.relu(F.batch_norm(c, None, None, gamma, beta, training=True, eps=eps)), 2)


def make_inputs(shape, dtype, device, seed, binary=False):
    N, Cin, H, W, C, K, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64)
    if binary:  # strokes on a blank page: many exactly tied windows
        x = (x > 0.8).double()
    params = [torch.randn(C, Cin, K, K, generator=g, dtype=torch.float64)] + [
        torch.randn(C, generator=g, dtype=torch.float64) for _ in range(3)
    ]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, *params)]


@pytest.mark.parametrize("need_x", [True, False], ids=["with_dx", "parameters_only"])
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_oracle(backend_device, shape, binary, need_x):
    """need_x False takes the backward's path from the recorded window maxima."""
    name, device = backend_device
    inputs = make_inputs(shape, torch.float32, device, seed=sum(shape), binary=binary)
    inputs[0].requires_grad_(need_x)
    if binary:  # strokes offset from 0, as images are: the patch moments must not cancel
        inputs[0].data.add_(3.0)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    pad = shape[-1]
    want = oracle(*exact, pad)
    go = torch.randn_like(want)
    wanted = [t for t in exact if t.requires_grad]
    want_grads = torch.autograd.grad(want, wanted, go)
    with fastmeta.use_backend(name):
        got = conv_block(*inputs, padding=(pad, pad))
        got_grads = torch.autograd.grad(got, [t for t in inputs if t.requires_grad], go.float())
    assert fastmeta.last_backend(OP) == name
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    scale = max(float(g.abs().max()) for g in want_grads)
    names = ("x", "weight", "bias", "gamma", "beta")[0 if need_x else 1 :]
    for arg, g_got, g_want in zip(names, got_grads, want_grads):
        # d bias is 0 in exact arithmetic (batch norm removes the mean): compare to the scale
        err = float((g_got.double() - g_want).abs().max()) / scale
        assert err < 2e-5, (arg, err)


def test_gradcheck_without_an_input_gradient():
    """The backward from the recorded window maxima (x needs no gradient; gradcheck with
    d_x, opcheck and the second-derivative error are in the conformance suite)."""
    inputs = make_inputs((2, 2, 6, 5, 3, 3, 1), torch.float64, "cpu", seed=1)
    data = inputs[0].detach()
    for name in ("reference", "cpu"):
        with fastmeta.use_backend(name):
            assert torch.autograd.gradcheck(
                lambda *t: conv_block(data, *t, padding=(1, 1)), inputs[1:]
            )


def test_bad_input_names_the_argument():
    x, w, b, g, beta = make_inputs((2, 1, 6, 6, 3, 3, 1), torch.float32, "cpu", seed=3)
    with pytest.raises(ValueError, match=r"x must be \[N, Cin, H, W\].*x \[2, 2, 6, 6\]"):
        conv_block(torch.randn(2, 2, 6, 6), w, b, g, beta)
    with pytest.raises(ValueError, match=r"gamma must be \[C\] = \[3\].*got \[4\]"):
        conv_block(x, w, b, torch.ones(4), beta)
    with pytest.raises(ValueError, match="needs at least 2x2"):
        conv_block(x[..., :2, :2], w, b, g, beta, padding=(0, 0))
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        conv_block(x, w.double(), b, g, beta)


def conv3(ways=5, track_running_stats=False):
    """Three conv4 blocks of 8 channels and a linear head, for 28x28 images."""
    layers = []
    for cin in (1, 8, 8):
        layers += conv_bn_relu_pool(cin, 8, track_running_stats)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 3 * 3, ways))


def test_fuse_conv_blocks_fuses_only_small_first_layers():
    model = conv3()
    view = fuse_conv_blocks(model)
    fused = [m for m in view.modules() if isinstance(m, FusedConvBlock)]
    assert len(fused) == 1 and fused[0].conv is model[0]  # 8 * 9 taps > MAX_TAPS
    assert fuse_conv_blocks(nn.Sequential(nn.Linear(3, 3))) is None

    class Wrapper(nn.Module):  # a user module holding the Sequential
        def __init__(self):
            super().__init__()
            self.features = conv3()

        def forward(self, x):
            return self.features(x)

    wrapped = Wrapper()
    view = fuse_conv_blocks(wrapped)
    assert isinstance(view.features[0], FusedConvBlock) and wrapped.features is not view.features
    x = torch.randn(6, 1, 28, 28)
    fastmeta.backend.forget_last_backends([OP])
    torch.testing.assert_close(view(x.requires_grad_()), wrapped(x), rtol=1e-5, atol=1e-5)
    assert fastmeta.last_backend(OP) is None  # a gradient for x wanted: the ATen path
    x = x.detach()
    fused_out, plain_out = view(x), wrapped(x)  # the weights' gradients: the fused op
    assert fastmeta.last_backend(OP) == CPU_KERNEL
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    weights = list(wrapped.parameters())
    go = torch.randn_like(plain_out)
    for got, want in zip(
        torch.autograd.grad(fused_out, weights, go), torch.autograd.grad(plain_out, weights, go)
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_maml_evaluation_uses_the_fused_block_and_matches_unfused():
    torch.manual_seed(0)
    model = conv3(track_running_stats=True)
    T = 3
    xs, xq = torch.randn(T, 5, 1, 28, 28), torch.randn(T, 10, 1, 28, 28)
    ys = torch.arange(5).expand(T, -1)
    outputs = []
    for fuse in (True, False):
        learner = fastmeta.MAML(model, lr=0.4, fuse=fuse, strategy="loop").adapt_batch(
            xs, ys, F.cross_entropy
        )
        fastmeta.backend.forget_last_backends([OP])
        with torch.no_grad():
            outputs.append(learner(xq))
        assert (fastmeta.last_backend(OP) is not None) == (fuse and COMPILED)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_block_updates_running_statistics_like_batch_norm(momentum):
    torch.manual_seed(0)
    model = conv3(track_running_stats=True)
    model[1].momentum = momentum
    plain = copy.deepcopy(model)
    view = fuse_conv_blocks(model)
    for _ in range(2):
        x = torch.rand(7, 1, 28, 28)
        fastmeta.backend.forget_last_backends([OP])
        torch.testing.assert_close(view(x), plain(x), rtol=1e-5, atol=1e-5)
        assert fastmeta.last_backend(OP) == CPU_KERNEL
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(model[1], name), getattr(plain[1], name), rtol=1e-5, atol=1e-6
        )


def test_maml_fuses_training_passes_only_with_fuse_true():
    torch.manual_seed(0)
    model = conv3()
    T = 2
    xs, xq = torch.randn(T, 5, 1, 28, 28), torch.randn(T, 10, 1, 28, 28)
    ys, yq = torch.arange(5).expand(T, -1), torch.randint(0, 5, (T, 10))
    grads = []
    for fuse in ("eval", True):
        model.zero_grad()
        learner = fastmeta.MAML(model, lr=0.4, fuse=fuse, strategy="loop").adapt_batch(
            xs, ys, F.cross_entropy
        )
        fastmeta.backend.forget_last_backends((OP, "bn_relu_pool"))
        F.cross_entropy(learner(xq).flatten(0, 1), yq.flatten()).backward()
        for op in (OP, "bn_relu_pool"):  # layer 1, and layers 2-3 after their convolutions
            fused = fastmeta.last_backend(op) is not None
            assert fused == (fuse is True and COMPILED)
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fuse must be True, False or 'eval'"):
        fastmeta.MAML(model, lr=0.4, fuse="always").adapt_batch(xs, ys, F.cross_entropy)


@pytest.mark.parametrize("need_x", [True, False], ids=["with_dx", "parameters_only"])
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(backend_device, need_x):
    """N = 0: empty output, NaN statistics (var_mean of nothing), every parameter
    gradient 0 (the cpu kernel gave NaN weight gradients), on every backend."""
    name, device = backend_device
    x = torch.randn(0, 2, 8, 8, device=device, requires_grad=need_x)
    params = [
        t.to(device).requires_grad_()
        for t in (torch.randn(3, 2, 3, 3), torch.randn(3), torch.rand(3), torch.randn(3))
    ]
    with fastmeta.use_backend(name):
        out, mean, rstd = conv_block_with_statistics(x, *params)
        inputs = [x, *params] if need_x else params
        grads = torch.autograd.grad(out.sum(), inputs)
    assert fastmeta.last_backend(OP) == name
    assert out.shape == (0, 3, 4, 4) and mean.isnan().all() and rstd.isnan().all()
    if need_x:
        assert grads[0].shape == x.shape
    for g in grads[-4:]:
        assert torch.equal(g, torch.zeros_like(g))
