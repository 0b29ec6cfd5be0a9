"""The fast-weight generators m and d of Meta Networks: one small MLP shared by every
coordinate of a loss gradient, run by the fused gradient_mlp op."""

import torch
from torch import Tensor, nn

from fastmeta.ops.gradient_mlp import gradient_mlp, gradient_mlp_forward_reference


class GradientMLP(nn.Module):
    """grads [...] -> fast weights [...] (same shape), coordinate by coordinate:
    preprocess (log|g|/p, sign g) then 2 -> hidden -> 1 with a ReLU.

    The output layer starts `output_scale` times smaller than nn.Linear's default, so
    fresh fast weights are small next to the slow ones."""

    def __init__(self, hidden: int = 20, p: float = 10.0, output_scale: float = 0.1):
        super().__init__()
        self.p = p
        first, last = nn.Linear(2, hidden), nn.Linear(hidden, 1)
        self.w1, self.b1 = nn.Parameter(first.weight.detach()), nn.Parameter(first.bias.detach())
        self.w2 = nn.Parameter(last.weight.detach()[0] * output_scale)
        self.b2 = nn.Parameter(torch.zeros(()))

    def forward(self, grads: Tensor) -> Tensor:
        return gradient_mlp(grads, self.w1, self.b1, self.w2, self.b2, self.p)

    def plain(self, grads: Tensor) -> Tensor:
        """The same function in plain PyTorch (builds the [..., hidden] activations)."""
        return gradient_mlp_forward_reference(grads, self.w1, self.b1, self.w2, self.b2, self.p)

    def extra_repr(self) -> str:
        return f"hidden={self.w1.shape[0]}, p={self.p:g}"
