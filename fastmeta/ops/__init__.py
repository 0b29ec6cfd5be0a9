"""Ops registered with torch.library under the `fastmeta` namespace.

One module per op, named after it: argument checks, the pure-PyTorch reference, the
op's declaration (fastmeta/ops/declaration.py: its kernels per backend and
direction, dtypes, race arguments, second-derivative policy), then the custom ops
with their fake (meta) kernels and autograd formulas. An op's kernels carry its
name: csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cu, and the Triton launchers
named <op>_forward / <op>_backward in fastmeta/kernels/.

DECLARATIONS is the table of every op with kernels of its own; prototypical_loss is
a composite (class_prototypes, then prototypical_cross_entropy, in one op call).
"""

from fastmeta.ops.attention_read import ATTENTION_READ, attention_read
from fastmeta.ops.bn_relu_pool import BN_RELU_POOL
from fastmeta.ops.class_prototypes import CLASS_PROTOTYPES, class_prototypes_op
from fastmeta.ops.conv_block import CONV_BLOCK
from fastmeta.ops.cosine_similarities import COSINE_SIMILARITIES
from fastmeta.ops.gradient_lstm import GRADIENT_LSTM, gradient_lstm
from fastmeta.ops.gradient_mlp import GRADIENT_MLP, gradient_mlp
from fastmeta.ops.inner_update import INNER_UPDATE, inner_update
from fastmeta.ops.prototypical_cross_entropy import (
    PROTOTYPICAL_CROSS_ENTROPY,
    prototypical_cross_entropy_op,
)
from fastmeta.ops.prototypical_loss import prototypical_loss_op
from fastmeta.ops.squared_distances import SQUARED_DISTANCES, squared_distances_op

DECLARATIONS = (
    ATTENTION_READ,
    BN_RELU_POOL,
    CLASS_PROTOTYPES,
    CONV_BLOCK,
    COSINE_SIMILARITIES,
    GRADIENT_LSTM,
    GRADIENT_MLP,
    INNER_UPDATE,
    PROTOTYPICAL_CROSS_ENTROPY,
    SQUARED_DISTANCES,
)

__all__ = [
    "DECLARATIONS",
    "attention_read",
    "class_prototypes_op",
    "gradient_lstm",
    "gradient_mlp",
    "inner_update",
    "prototypical_cross_entropy_op",
    "prototypical_loss_op",
    "squared_distances_op",
]
