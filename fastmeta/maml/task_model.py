"""A module as a function of its flattened adapted parameters, run per task.

Two execution strategies, same numbers:
  loop: one functional_call (and one autograd.grad) per task; small, cache-friendly
        kernels. The CPU default: at the conv4 Omniglot setting (T=32, second order)
        it ran 1.4 s a meta-step against 5.4 s for vmap on a 2-core EPYC.
  vmap: torch.func.vmap over tasks (convolutions become grouped convolutions, linear
        layers batched matmuls): few large kernels, the GPU default.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from fastmeta.fused_blocks import fuse_conv_blocks, rename_map
from fastmeta.maml.layout import ParamLayout

STRATEGIES = ("loop", "vmap")


def default_strategy(device: torch.device) -> str:
    return "loop" if device.type == "cpu" else "vmap"


def check_strategy(strategy: str, device: torch.device) -> str:
    if strategy == "auto":
        return default_strategy(device)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'auto' or one of {STRATEGIES}, got {strategy!r}")
    return strategy


@contextlib.contextmanager
def batch_statistics_only(module: nn.Module):
    """BatchNorm layers in training mode normalize with the batch statistics of each
    task and leave their running statistics untouched (as in the MAML reference code;
    vmap could not update them per task anyway). Eval mode uses the running ones."""
    changed = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _batch_norm_composite(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Training-mode batch norm from mean/var ops: x [N, C, ...] -> [N, C, ...]."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(shape)
    return y + bias.view(shape) if bias is not None else y


class CompositeBatchNorm(TorchFunctionMode):
    """Under torch.func.vmap(torch.func.grad(...)), differentiating the native
    batch_norm a second time gives wrong numbers (torch 2.14: the second-order
    meta-gradient of a Linear-BatchNorm1d-Tanh-Linear MAML step was off by 1e-3
    relative in float64, while the per-task loop, and the same model with batch norm
    written from mean/var, agree to 1e-16). This mode runs training-mode batch norm
    (batch statistics, no running ones) from mean/var ops inside vmap."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = dict(
                zip(
                    (
                        "input",
                        "running_mean",
                        "running_var",
                        "weight",
                        "bias",
                        "training",
                        "momentum",
                        "eps",
                    ),
                    args,
                ),
                **kwargs,
            )
            if bound.get("training") and bound.get("running_mean") is None:
                return _batch_norm_composite(
                    bound["input"], bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
                )
        return func(*args, **kwargs)


class TaskModel:
    """Calls `module` with the adapted parameters from a flat buffer; the rest of its
    parameters and buffers (`fixed`) are shared by every task.

    fuse: the loop strategy's query pass and first-order support passes run a view of
    the module whose Conv2d-BatchNorm2d-ReLU-MaxPool2d runs are fused ops (conv_block
    for first layers, bn_relu_pool after the others' convolutions; fused_blocks.py;
    differentiable once, so never where create_graph is used):
    True (the default) wherever that holds, "eval" only where no parameter gradient is
    wanted either, False never."""

    def __init__(
        self,
        module: nn.Module,
        layout: ParamLayout,
        fixed: dict[str, Tensor],
        fuse: bool | str = True,
    ):
        self.module, self.layout, self.fixed = module, layout, fixed
        if fuse not in (True, False, "eval"):
            raise ValueError(f"fuse must be True, False or 'eval', got {fuse!r}")
        self.fused = (
            fuse_conv_blocks(module, with_gradients=fuse is True, bn_relu_pool=True)
            if fuse
            else None
        )
        self.fused_names = rename_map(module, self.fused) if self.fused is not None else None

    def call(self, params: dict[str, Tensor], x, fused: bool = False):
        tensors = {**self.fixed, **params}
        if fused and self.fused is not None:
            return functional_call(
                self.fused, {self.fused_names[n]: t for n, t in tensors.items()}, (x,)
            )
        return functional_call(self.module, tensors, (x,))

    def task_gradients(
        self,
        weights: Tensor,
        x: Tensor,
        y: Tensor,
        loss_fn,
        strategy: str,
        create_graph: bool,
        allow_unused: bool,
    ) -> Tensor:
        """Support-loss gradient of every task: weights [P] (shared) or [T, P],
        x [T, ...], y [T, ...] -> g [T, P]; differentiable again if create_graph."""
        if strategy == "vmap":
            return self._gradients_vmap(weights, x, y, loss_fn, create_graph)
        rows = weights.unbind(0) if weights.dim() == 2 else [weights] * x.shape[0]
        grads = []
        for row, xt, yt in zip(rows, x, y):
            params = self.layout.unflatten(row)
            loss = loss_fn(self.call(params, xt, fused=not create_graph), yt)
            g = torch.autograd.grad(
                loss, list(params.values()), create_graph=create_graph, allow_unused=allow_unused
            )
            grads.append(self.layout.flatten(g, like=row))
        return torch.stack(grads)

    def _gradients_vmap(self, weights, x, y, loss_fn, create_graph):
        def task_loss(row, xt, yt):
            return loss_fn(self.call(self.layout.unflatten(row), xt), yt)

        in_dims = (0 if weights.dim() == 2 else None, 0, 0)
        grad = torch.func.vmap(torch.func.grad(task_loss), in_dims=in_dims)
        with CompositeBatchNorm(), torch.set_grad_enabled(create_graph):
            return grad(weights, x, y)

    def forward(self, weights: Tensor, x: Tensor, strategy: str):
        """Per-task outputs: weights [T, P], x [T, ...] -> [T, ...]."""
        if strategy == "vmap":
            with CompositeBatchNorm():
                return torch.func.vmap(lambda row, xt: self.call(self.layout.unflatten(row), xt))(
                    weights, x
                )
        return torch.stack(
            [
                self.call(self.layout.unflatten(row), xt, fused=True)
                for row, xt in zip(weights.unbind(0), x)
            ]
        )
