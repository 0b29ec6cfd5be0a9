"""Base and representation networks for MetaNetwork: conv4 for images, an MLP for
vectors, each with its last hidden layer (and a classifier's output layer) augmented
and no batch norm after an augmented layer (so per-example gradients are exact)."""

from collections.abc import Sequence

from torch import nn

from fastmeta.metanet.layers import AugmentedConv2d, AugmentedLinear
from fastmeta.models import conv_bn_relu_pool


def _conv_block(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu_pool(in_channels, channels))


def conv4_network(
    in_channels: int = 1,
    channels: int = 64,
    ways: int | None = None,
    image_size: Sequence[int] = (28, 28),
) -> nn.Sequential:
    """3 x (conv3x3, BN, ReLU, maxpool2), then an augmented conv3x3 and maxpool2,
    flattened: [n, C, H, W] -> [n, channels * (H // 16) * (W // 16)] features, or
    [n, ways] logits through an augmented linear output layer when `ways` is given."""
    h, w = image_size
    if min(h, w) < 16:
        raise ValueError(f"conv4 needs images of at least 16x16, got {h}x{w}")
    layers = [
        _conv_block(in_channels, channels),
        _conv_block(channels, channels),
        _conv_block(channels, channels),
        AugmentedConv2d(channels, channels, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Flatten(),
    ]
    if ways is not None:
        layers.append(AugmentedLinear(channels * (h // 16) * (w // 16), ways, activation=False))
    return nn.Sequential(*layers)


def mlp_network(dim: int, hidden: int = 64, ways: int | None = None) -> nn.Sequential:
    """Linear-ReLU, then an augmented linear layer: [n, dim] -> [n, hidden] features,
    or [n, ways] logits through an augmented linear output layer."""
    layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.ReLU(), AugmentedLinear(hidden, hidden)]
    if ways is not None:
        layers.append(AugmentedLinear(hidden, ways, activation=False))
    return nn.Sequential(*layers)


def networks(input_shape: Sequence[int], ways: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(base, representation) for examples of shape `input_shape`: conv4 for images
    [C, H, W], the MLP for vectors [D]."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        return (conv4_network(c, ways=ways, image_size=(h, w)), conv4_network(c, image_size=(h, w)))
    if len(input_shape) == 1:
        return mlp_network(input_shape[0], ways=ways), mlp_network(input_shape[0])
    raise ValueError(
        f"no MetaNetwork networks for examples of shape {list(input_shape)}: "
        f"expected vectors [D] or images [C, H, W]"
    )
