"""Meta Networks (Munkhdalai and Yu, 2017): fastmeta.MetaNetwork, its augmented layers
and fast-weight generators."""

from fastmeta.metanet.generator import GradientLSTM, GradientMLP
from fastmeta.metanet.layers import AugmentedConv2d, AugmentedLinear
from fastmeta.metanet.model import MetaNetwork, contrastive_loss
from fastmeta.metanet.networks import conv4_network, mlp_network, networks

__all__ = [
    "AugmentedConv2d",
    "AugmentedLinear",
    "GradientLSTM",
    "GradientMLP",
    "MetaNetwork",
    "contrastive_loss",
    "conv4_network",
    "mlp_network",
    "networks",
]
