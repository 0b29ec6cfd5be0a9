"""Ops registered with torch.library under the `fastmeta` namespace.

One module per op: argument checks, the pure-PyTorch reference, the backend table,
the custom op with its fake (meta) kernel and autograd formula.
"""

from fastmeta.ops.inner_update import inner_update

__all__ = ["inner_update"]
