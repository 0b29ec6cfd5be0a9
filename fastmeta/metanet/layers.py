"""Layer augmentation (Munkhdalai and Yu 2017, section 3.3): a slow branch with weights
W and a fast branch with fast weights W*, added after their activations:
    relu(W x + b) + relu(W* x)      (activation=True)
    W x + b + W* x                  (activation=False, e.g. an output layer)

Where W* comes from is decided outside the layer, by the MetaNetwork pass that runs
it: a `FastBranch` set on the layer for the duration of that pass (see
`fast_branches`). Without one the layer is its slow branch alone.

Both layers see their input as rows [n, L, K] (K = in_features for Linear, L = 1;
K = C*kh*kw and L = output positions for Conv2d), so a fast weight is always [O, K]
and one memory read serves both.
"""

import contextlib
import math
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FastBranch(Protocol):
    def __call__(self, layer: "AugmentedLayer", x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(slow pre-activation z, fast pre-activation or None) of `layer` on x."""


class AugmentedLayer(nn.Module):
    """Common part of AugmentedLinear and AugmentedConv2d: weight [O, ...], bias [O]."""

    weight: nn.Parameter
    bias: nn.Parameter

    def __init__(self, activation: bool):
        super().__init__()
        self.activation = activation
        self.fast_branch: FastBranch | None = None

    def reset_parameters(self) -> None:  # nn.Linear / nn.Conv2d's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.fan_in)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def fan_in(self) -> int:
        """K: the length of one input row."""
        return self.weight[0].numel()

    def slow(self, x: Tensor) -> Tensor:
        """W x + b: the slow branch's pre-activation."""
        raise NotImplementedError

    def rows(self, x: Tensor) -> Tensor:
        """The layer input as rows [n, L, K]."""
        raise NotImplementedError

    def from_rows(self, y: Tensor, x: Tensor) -> Tensor:
        """[n, L, O] back to the layer's output layout (x: its input)."""
        raise NotImplementedError

    def to_rows(self, z: Tensor) -> Tensor:
        """The layer's output layout as rows [n, L, O]: from_rows' inverse."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        z, fast = self.fast_branch(self, x) if self.fast_branch else (self.slow(x), None)
        if not self.activation:
            return z if fast is None else z + fast
        return F.relu(z) if fast is None else F.relu(z) + F.relu(fast)


class AugmentedLinear(AugmentedLayer):
    """[n, in_features] -> [n, out_features]; fast weights [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, activation: bool = True):
        super().__init__(activation)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def slow(self, x):
        return F.linear(x, self.weight, self.bias)

    def rows(self, x):
        return x[:, None, :]

    def from_rows(self, y, x):
        return y[:, 0]

    def to_rows(self, z):
        return z[:, None, :]

    def extra_repr(self) -> str:
        out, k = self.weight.shape
        return f"in_features={k}, out_features={out}, activation={self.activation}"


class AugmentedConv2d(AugmentedLayer):
    """[n, C, H, W] -> [n, O, H', W'] (stride 1); fast weights [O, C*kh*kw]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        activation: bool = True,
    ):
        super().__init__(activation)
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def slow(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)

    def rows(self, x):
        return F.unfold(x, self.weight.shape[2:], padding=self.padding).transpose(1, 2)

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        k = self.weight.shape[2]
        return x.shape[2] + 2 * self.padding - k + 1, x.shape[3] + 2 * self.padding - k + 1

    def from_rows(self, y, x):
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], *self._out_size(x))

    def to_rows(self, z):
        return z.flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        out, c, k, _ = self.weight.shape
        return f"{c}, {out}, kernel_size={k}, padding={self.padding}, activation={self.activation}"


def augmented_layers(net: nn.Module) -> list[AugmentedLayer]:
    return [m for m in net.modules() if isinstance(m, AugmentedLayer)]


@contextlib.contextmanager
def fast_branches(net: nn.Module, branch: FastBranch) -> Iterator[None]:
    """Runs every augmented layer of `net` with `branch` inside the block."""
    layers = augmented_layers(net)
    for layer in layers:
        layer.fast_branch = branch
    try:
        yield
    finally:
        for layer in layers:
            layer.fast_branch = None


def split_at_first_augmented(net: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, tail): the modules before the first augmented layer, and the rest. The
    prefix depends on slow weights only, so a pass computes it once per input."""
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"MetaNetwork networks must be nn.Sequential, got {type(net).__name__}")
    for i, module in enumerate(net):
        if augmented_layers(module):
            return net[:i], net[i:]
    raise ValueError(f"the network has no AugmentedLinear or AugmentedConv2d layer:\n{net}")
