"""The networks the CLI trains: conv4 for images, a small MLP for vectors."""

from collections.abc import Sequence

from torch import nn

from fastmeta.models import conv4


def mlp(dim: int, hidden: int = 64, layers: int = 2) -> nn.Sequential:
    """`layers` x (Linear-`hidden`, ReLU) minus the last ReLU: [N, dim] -> [N, hidden]."""
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks += [nn.Linear(dim if i == 0 else hidden, hidden), nn.ReLU()]
    return nn.Sequential(*blocks[:-1])


def encoder(input_shape: Sequence[int]) -> tuple[nn.Module, int]:
    """(encoder, embedding size) for examples of shape `input_shape`: conv4 for
    images [C, H, W] (H, W >= 16), an MLP for vectors [D]."""
    if len(input_shape) == 3 and min(input_shape[1:]) >= 16:
        c, h, w = input_shape
        return conv4(c), 64 * (h // 16) * (w // 16)
    if len(input_shape) == 1:
        return mlp(input_shape[0]), 64
    raise ValueError(
        f"no encoder for examples of shape {list(input_shape)}: expected "
        f"vectors [D] or images [C, H, W] of at least 16x16"
    )
