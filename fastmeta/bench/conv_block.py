"""Benchmark: the fused conv4 blocks, forward and forward + backward.

fastmeta.conv_block (Conv2d(1 -> 64, 3x3) -> BatchNorm2d (batch statistics) -> ReLU ->
MaxPool2d(2) as one op; backward without d_x, as for data) against the four ATen
modules, on 28x28 Omniglot-sized images: 75 (one MAML task's query set), 1200 (a
MetaNetwork query pass of 16 episodes); its backward rows ask for the conv and batch
norm parameters' gradients, as MAML's and MetaNetwork's first layers do.
fastmeta.bn_relu_pool (BatchNorm2d -> ReLU -> MaxPool2d(2) after a convolution: conv4's
layers 2-4) against the three ATen ops on the activations of a MAML task's 75 query
images, with the gradients of the activation and batch norm's parameters.
Both compute the same outputs and gradients (checked before timing).
"""

import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import backend
from fastmeta.bench.harness import Candidate, run_config
from fastmeta.ops.bn_relu_pool import bn_relu_pool
from fastmeta.ops.conv_block import conv_block

CASE = "conv_block"
CHANNELS = 64
IMAGES = (75, 1200)
QUICK_IMAGES = (9,)
ACTIVATIONS = ((75, 64, 14, 14), (75, 64, 7, 7))  # conv4 layers 2 and 3, one MAML task
QUICK_ACTIVATIONS = ((9, 8, 14, 14),)


def _modules(device):
    conv = nn.Conv2d(1, CHANNELS, 3, padding=1).to(device)
    bn = nn.BatchNorm2d(CHANNELS, track_running_stats=False).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


def candidates(device: str, images: int, backward: bool) -> list[Candidate]:
    conv, bn = _modules(device)
    x = torch.rand(images, 1, 28, 28, device=device)  # pixel-like, offset from zero
    params = [conv.weight, conv.bias, bn.weight, bn.bias]
    go = torch.randn(images, CHANNELS, 14, 14, device=device)

    def aten():
        return F.max_pool2d(F.relu(bn(conv(x))), 2)

    def fused():
        with fastmeta.use_backend("cpu"):
            return conv_block(x, conv.weight, conv.bias, bn.weight, bn.bias, (1, 1), bn.eps)

    def with_grads(forward):
        return lambda: torch.autograd.grad(forward(), params, go)

    want, got = aten(), fused()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # All parameter gradients concatenated (d bias is 0 up to rounding: compare to the
    # whole). In float32 both are up to ~3e-4 from float64 at 1200 images: near-tied
    # window maxima send the gradient to different positions.
    g_got, g_want = (torch.cat([g.flatten() for g in with_grads(f)()]) for f in (fused, aten))
    error = float((g_got - g_want).norm() / g_want.norm())
    assert error < 2e-3, f"{CASE}: gradients differ from ATen's by {error:.1e}"
    if backward:
        return [
            Candidate("fastmeta.conv_block", with_grads(fused), is_fastmeta=True),
            Candidate("ATen modules", with_grads(aten)),
        ]
    return [
        Candidate("fastmeta.conv_block", lambda: _no_grad(fused), is_fastmeta=True),
        Candidate("ATen modules", lambda: _no_grad(aten)),
    ]


def activation_candidates(device: str, shape: tuple) -> list[Candidate]:
    """bn_relu_pool against batch_norm + relu + max_pool2d, forward + backward."""
    c = torch.randn(shape, device=device).add_(0.5).requires_grad_()
    gamma = torch.empty(shape[1], device=device).uniform_(0.5, 1.5).requires_grad_()
    beta = torch.empty(shape[1], device=device).uniform_(-0.5, 0.5).requires_grad_()
    go = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=device)

    def aten():
        y = F.batch_norm(c, None, None, gamma, beta, training=True)
        return torch.autograd.grad(F.max_pool2d(F.relu(y), 2), [c, gamma, beta], go)

    def fused():
        with fastmeta.use_backend("cpu"):
            return torch.autograd.grad(bn_relu_pool(c, gamma, beta), [c, gamma, beta], go)

    for g_got, g_want in zip(fused(), aten()):
        error = float((g_got - g_want).norm() / g_want.norm())
        assert error < 1e-4, f"bn_relu_pool: gradients differ from ATen's by {error:.1e}"
    return [
        Candidate("fastmeta.bn_relu_pool", fused, is_fastmeta=True),
        Candidate("ATen batch_norm+relu+max_pool2d", aten),
    ]


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def run(device: str, quick: bool = False, **timing):
    if device != "cpu":
        print(f"{CASE}: CPU only (fastmeta.conv_block has no GPU kernel), skipped")
        return []
    reason = backend.op_unavailable_reason(CASE, "cpu", "cpu", torch.float32)
    if reason is not None:
        print(f"{CASE}: the C++ kernels cannot run here ({reason}), skipped")
        return []
    results = []
    for images in QUICK_IMAGES if quick else IMAGES:
        for backward in (False, True):
            config = f"{images} images 1x28x28 -> 64, {'fwd+bwd' if backward else 'fwd'}"
            results += run_config(
                CASE, config, device, candidates(device, images, backward), memory=True, **timing
            )
    for shape in QUICK_ACTIVATIONS if quick else ACTIVATIONS:
        config = "bn_relu_pool " + "x".join(map(str, shape)) + ", fwd+bwd"
        results += run_config(
            CASE, config, device, activation_candidates(device, shape), memory=True, **timing
        )
    return results
