"""conv4, the network of the ProtoNets, MAML and Meta Networks Omniglot experiments,
built in one place: 4 x (conv3x3, batch norm, ReLU, maxpool2)."""

from collections.abc import Sequence

from torch import nn


def conv_bn_relu_pool(
    in_channels: int, channels: int, track_running_stats: bool = True
) -> list[nn.Module]:
    """One conv4 block, [N, in_channels, H, W] -> [N, channels, H // 2, W // 2]: Conv2d
    3x3 (padding 1), BatchNorm2d, ReLU, MaxPool2d(2). The fused conv_block and
    bn_relu_pool ops (fastmeta/fused_blocks.py) recognise this run of modules."""
    return [
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


def conv4(
    in_channels: int = 1,
    channels: int = 64,
    ways: int | None = None,
    image_size: Sequence[int] = (28, 28),
    track_running_stats: bool = True,
) -> nn.Sequential:
    """4 conv4 blocks and a flatten, one flat nn.Sequential: [N, C, H, W] ->
    [N, channels * (H // 16) * (W // 16)] features, or [N, ways] logits through a final
    nn.Linear when `ways` is given (its input size from `image_size`, (H, W)).
    track_running_stats=False: batch norm always uses batch statistics (MAML's)."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers += conv_bn_relu_pool(
            in_channels if i == 0 else channels, channels, track_running_stats
        )
    layers.append(nn.Flatten())
    if ways is not None:
        h, w = image_size
        layers.append(nn.Linear(channels * (h // 16) * (w // 16), ways))
    return nn.Sequential(*layers)
