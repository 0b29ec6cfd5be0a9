"""Runs of Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2) in a model, as fused ops.

fuse_conv_blocks(model) returns a view of the model (or None when nothing fuses) in
which each such run inside an nn.Sequential whose convolution has few input taps
(Cin*KH*KW <= MAX_TAPS: a first layer on 1- or 3-channel images) is a FusedConvBlock
that calls fastmeta.conv_block, and, with bn_relu_pool=True, the BatchNorm2d -> ReLU ->
MaxPool2d(2) of every other such run a FusedBnReluPool that calls
fastmeta.bn_relu_pool after the module's own convolution. The view shares every
submodule, parameter and buffer with the model: torch.func.functional_call on the
view swaps the same tensors. MAML's loop strategy runs the view where no second
derivative is taken (the query pass, first-order inner steps), MetaNetwork its
networks' first layers; a FusedConvBlock fuses only when its input needs no gradient
(the first layer, on data), so the op's backward takes its fast path (see the classes
for the measurements).
"""

import copy

import torch
from torch import Tensor, nn

from fastmeta import backend
from fastmeta.ops.bn_relu_pool import BN_RELU_POOL, bn_relu_pool_with_statistics
from fastmeta.ops.conv_block import CONV_BLOCK, conv_block_with_statistics, conv_size

MAX_TAPS = 27


def _fusable_tail(bn, relu, pool, channels: int) -> bool:
    """BatchNorm2d(channels) -> ReLU -> MaxPool2d(2) (stride 2, no padding)."""
    if not (
        isinstance(bn, nn.BatchNorm2d)
        and isinstance(relu, nn.ReLU)
        and isinstance(pool, nn.MaxPool2d)
    ):
        return False
    as_pair = nn.modules.utils._pair
    return (
        bn.num_features == channels
        and as_pair(pool.kernel_size) == (2, 2)
        and as_pair(pool.stride) == (2, 2)
        and as_pair(pool.padding) == (0, 0)
        and as_pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and not pool.return_indices
    )


def _fusable(conv, bn, relu, pool) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= MAX_TAPS
        and _fusable_tail(bn, relu, pool, conv.out_channels)
    )


class _FusedRun(nn.Module):
    """What the fused runs share: when the op applies, and the running statistics."""

    op = ""  # the fastmeta op's backend-registry name

    def _use_fused(self, x: Tensor, params, input_grad_ok: bool) -> bool:
        """The op applies: CPU, a non-empty batch (on an empty one nn.BatchNorm2d leaves
        the running statistics alone), batch norm in training mode, the op's backend usable
        for x's dtype; under autograd, x needing a gradient only if input_grad_ok, and
        parameter gradients only with with_gradients."""
        if not (self.bn.training and x.device.type == "cpu" and x.shape[0] > 0):
            return False
        if torch.is_grad_enabled():
            wants_gradients = any(p is not None and p.requires_grad for p in params)
            if (x.requires_grad and not input_grad_ok) or (
                (x.requires_grad or wants_gradients) and not self.with_gradients
            ):
                return False
        forced = backend.forced_backend()
        return (
            backend.op_unavailable_reason(self.op, forced[0] if forced else "cpu", "cpu", x.dtype)
            is None
        )

    def _record_statistics(self, mean: Tensor, rstd: Tensor, count: int):
        if self.bn.track_running_stats and self.bn.running_mean is not None:
            _update_running_statistics(self.bn, mean, rstd, count)


class FusedConvBlock(_FusedRun):
    """pool(relu(bn(conv(x)))) through fastmeta.conv_block when it applies (see
    _FusedRun._use_fused; x must need no gradient), else through the four modules.
    Batch norm's running statistics are updated as nn.BatchNorm2d would.

    Measured on the 2-core EPYC (conv 1->64 + BN + ReLU + pool, 75 images of 28x28,
    float32; python -m fastmeta.bench --case conv_block): forward 2.2 ms against 12.0
    for the four ATen modules, forward + backward without d_x 5.5 ms against 20.4.

    The op is differentiable once: callers use the block only where no second
    derivative is taken. With x needing no gradient its backward reads the window
    maxima the forward recorded instead of recomputing the convolution (a d_x would
    need the dense path, slower than ATen's)."""

    op = CONV_BLOCK.name

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        relu: nn.ReLU,
        pool: nn.MaxPool2d,
        with_gradients: bool = True,
    ):
        super().__init__()
        self.conv, self.bn, self.relu, self.pool = conv, bn, relu, pool
        self.with_gradients = with_gradients

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        params = (conv.weight, conv.bias, bn.weight, bn.bias)
        if not self._use_fused(x, params, input_grad_ok=False):
            return self.pool(self.relu(self.bn(self.conv(x))))
        out, mean, rstd = conv_block_with_statistics(
            x, conv.weight, conv.bias, bn.weight, bn.bias, conv.padding, bn.eps
        )
        hc, wc = conv_size(x.shape, conv.weight.shape, conv.padding)
        self._record_statistics(mean, rstd, x.shape[0] * hc * wc)
        return out


class FusedBnReluPool(_FusedRun):
    """pool(relu(bn(c))) through fastmeta.bn_relu_pool when it applies (see
    _FusedRun._use_fused), else through the three modules; running statistics as
    nn.BatchNorm2d. The op is differentiable once, like FusedConvBlock's."""

    op = BN_RELU_POOL.name

    def __init__(
        self, bn: nn.BatchNorm2d, relu: nn.ReLU, pool: nn.MaxPool2d, with_gradients: bool = True
    ):
        super().__init__()
        self.bn, self.relu, self.pool = bn, relu, pool
        self.with_gradients = with_gradients

    def forward(self, c: Tensor) -> Tensor:
        bn = self.bn
        if (
            bn.weight is None
            or c.dim() != 4
            or not self._use_fused(c, (bn.weight, bn.bias), input_grad_ok=True)
        ):
            return self.pool(self.relu(self.bn(c)))
        out, mean, rstd = bn_relu_pool_with_statistics(c, bn.weight, bn.bias, bn.eps)
        self._record_statistics(mean, rstd, c.shape[0] * c.shape[2] * c.shape[3])
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


def _fuse_sequential(
    seq: nn.Sequential, with_gradients: bool, bn_relu_pool: bool
) -> nn.Sequential | None:
    children = list(seq.children())
    out, fused_any, i = [], False, 0
    while i < len(children):
        run = children[i : i + 4]
        if len(run) == 4 and _fusable(*run):
            out.append(FusedConvBlock(*run, with_gradients=with_gradients))
            fused_any, i = True, i + 4
            continue
        if (
            bn_relu_pool
            and len(run) == 4
            and isinstance(run[0], nn.Conv2d)
            and _fusable_tail(*run[1:], run[0].out_channels)
        ):
            out += [run[0], FusedBnReluPool(*run[1:], with_gradients=with_gradients)]
            fused_any, i = True, i + 4
            continue
        inner = fuse_conv_blocks(children[i], with_gradients, bn_relu_pool)
        out.append(inner if inner is not None else children[i])
        fused_any = fused_any or inner is not None
        i += 1
    return nn.Sequential(*out) if fused_any else None


def fuse_conv_blocks(
    module: nn.Module, with_gradients: bool = True, bn_relu_pool: bool = False
) -> nn.Module | None:
    """A view of `module` with its fusable blocks fused, or None if it has none.
    with_gradients=False: the blocks fuse only calls that want no gradient.
    bn_relu_pool=True: also the batch norm, ReLU and pool after larger convolutions."""
    if isinstance(module, nn.Sequential):
        return _fuse_sequential(module, with_gradients, bn_relu_pool)
    replaced = {
        name: fuse_conv_blocks(child, with_gradients, bn_relu_pool)
        for name, child in module.named_children()
    }
    replaced = {name: view for name, view in replaced.items() if view is not None}
    if not replaced:
        return None
    view = copy.copy(module)  # the same attributes; its own table of submodules
    view._modules = {**module._modules, **replaced}
    return view


def rename_map(model: nn.Module, view: nn.Module) -> dict[str, str]:
    """Each parameter/buffer name of `model` -> its name in `view` (same tensors)."""

    def names(m):
        return {
            id(t): n
            for n, t in (
                *m.named_parameters(remove_duplicate=False),
                *m.named_buffers(remove_duplicate=False),
            )
        }

    in_view = names(view)
    return {n: in_view[i] for i, n in names(model).items() if i in in_view}
