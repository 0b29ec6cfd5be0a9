"""Ops registered with torch.library under the `fastmeta` namespace.

One module per op: argument checks, the pure-PyTorch reference, the backend table,
the custom op with its fake (meta) kernel and autograd formula.
"""

from fastmeta.ops.attention_read import attention_read
from fastmeta.ops.class_prototypes import class_prototypes_op
from fastmeta.ops.gradient_mlp import gradient_mlp
from fastmeta.ops.inner_update import inner_update
from fastmeta.ops.prototypical_cross_entropy import prototypical_cross_entropy_op
from fastmeta.ops.prototypical_loss import prototypical_loss_op
from fastmeta.ops.squared_distances import squared_distances_op

__all__ = ["attention_read", "class_prototypes_op", "gradient_mlp", "inner_update",
           "prototypical_cross_entropy_op", "prototypical_loss_op", "squared_distances_op"]
