"""Runs of Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2) in a model, as one fused op.

fuse_conv_blocks(model) returns a view of the model (or None when nothing fuses) in
which each such run inside an nn.Sequential whose convolution has few input taps
(Cin*KH*KW <= MAX_TAPS: a first layer on 1- or 3-channel images) is a FusedConvBlock
that calls fastmeta.conv_block. The view shares every submodule, parameter and
buffer with the model: torch.func.functional_call on the view swaps the same
tensors. MAML's loop strategy runs the view where no second derivative is taken (the
query pass, first-order inner steps), MetaNetwork its networks' first layers; a block
fuses only when its input needs no gradient (the first layer, on data), so the op's
backward takes its fast path (see FusedConvBlock for the measurements).
"""

import copy

import torch
from torch import Tensor, nn

from fastmeta import backend
from fastmeta.ops.conv_block import OP, conv_block_with_statistics, conv_size

MAX_TAPS = 27


def _fusable(conv, bn, relu, pool) -> bool:
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            and isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d)):
        return False
    as_pair = nn.modules.utils._pair
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= MAX_TAPS
            and bn.num_features == conv.out_channels
            and as_pair(pool.kernel_size) == (2, 2) and as_pair(pool.stride) == (2, 2)
            and as_pair(pool.padding) == (0, 0) and as_pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices)


class FusedConvBlock(nn.Module):
    """pool(relu(bn(conv(x)))) through fastmeta.conv_block when it applies (CPU,
    float32/64, batch norm in training mode (its running statistics updated as
    nn.BatchNorm2d would), the op's backend usable, x needing no gradient, and, with
    with_gradients=False, no parameter gradient wanted either), else through the four
    modules.

    Measured on the 2-core EPYC (conv 1->64 + BN + ReLU + pool, 75 images of 28x28,
    float32; benchmarks/conv_block_micro.py): forward 2.2 ms against 12.0 for the four
    ATen modules, backward without d_x 2.5 ms against 10.7.

    The op is differentiable once: callers use the block only where no second
    derivative is taken. With x needing no gradient its backward reads the window
    maxima the forward recorded instead of recomputing the convolution (a d_x would
    need the dense path, slower than ATen's)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: nn.ReLU, pool: nn.MaxPool2d,
                 with_gradients: bool = True):
        super().__init__()
        self.conv, self.bn, self.relu, self.pool = conv, bn, relu, pool
        self.with_gradients = with_gradients

    def _use_fused(self, x: Tensor) -> bool:
        if not (self.bn.training and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64)):
            return False
        if torch.is_grad_enabled():
            params = (self.conv.weight, self.conv.bias, self.bn.weight, self.bn.bias)
            wants_gradients = any(p is not None and p.requires_grad for p in params)
            if x.requires_grad or (wants_gradients and not self.with_gradients):
                return False
        forced = backend.forced_backend()
        return backend.op_unavailable_reason(OP, forced[0] if forced else "cpu", "cpu",
                                             x.dtype) is None

    def forward(self, x: Tensor) -> Tensor:
        if not self._use_fused(x):
            return self.pool(self.relu(self.bn(self.conv(x))))
        conv, bn = self.conv, self.bn
        out, mean, rstd = conv_block_with_statistics(x, conv.weight, conv.bias, bn.weight,
                                                     bn.bias, conv.padding, bn.eps)
        if bn.track_running_stats and bn.running_mean is not None:
            hc, wc = conv_size(x.shape, conv.weight.shape, conv.padding)
            _update_running_statistics(bn, mean, rstd, x.shape[0] * hc * wc)
        return out


@torch.no_grad()
def _update_running_statistics(bn: nn.BatchNorm2d, mean: Tensor, rstd: Tensor, count: int):
    """What nn.BatchNorm2d's training forward does to its buffers: an exponential (or,
    with momentum None, cumulative) average of the batch mean and unbiased variance."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    var = (rstd.pow(-2) - bn.eps) * (count / max(count - 1, 1))
    bn.running_mean.lerp_(mean, factor)
    bn.running_var.lerp_(var, factor)


def _fuse_sequential(seq: nn.Sequential, with_gradients: bool) -> nn.Sequential | None:
    children = list(seq.children())
    out, fused_any, i = [], False, 0
    while i < len(children):
        run = children[i:i + 4]
        if len(run) == 4 and _fusable(*run):
            out.append(FusedConvBlock(*run, with_gradients=with_gradients))
            fused_any, i = True, i + 4
            continue
        inner = fuse_conv_blocks(children[i], with_gradients)
        out.append(inner if inner is not None else children[i])
        fused_any = fused_any or inner is not None
        i += 1
    return nn.Sequential(*out) if fused_any else None


def fuse_conv_blocks(module: nn.Module, with_gradients: bool = True) -> nn.Module | None:
    """A view of `module` with its fusable blocks fused, or None if it has none.
    with_gradients=False: the blocks fuse only calls that want no parameter gradient."""
    if isinstance(module, nn.Sequential):
        return _fuse_sequential(module, with_gradients)
    replaced = {name: fuse_conv_blocks(child, with_gradients)
                for name, child in module.named_children()}
    replaced = {name: view for name, view in replaced.items() if view is not None}
    if not replaced:
        return None
    view = copy.copy(module)  # the same attributes; its own table of submodules
    view._modules = {**module._modules, **replaced}
    return view


def rename_map(model: nn.Module, view: nn.Module) -> dict[str, str]:
    """Each parameter/buffer name of `model` -> its name in `view` (same tensors)."""
    def names(m):
        return {id(t): n for n, t in (*m.named_parameters(remove_duplicate=False),
                                      *m.named_buffers(remove_duplicate=False))}
    in_view = names(view)
    return {n: in_view[i] for i, n in names(model).items() if i in in_view}
