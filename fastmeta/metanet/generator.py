"""The fast-weight generators m and d of Meta Networks, shared by every coordinate of a
loss gradient: a small MLP (the fused gradient_mlp op), and a small LSTM run over the
examples of an episode (the fused gradient_lstm op)."""

import torch
from torch import Tensor, nn

from fastmeta.ops.gradient_lstm import gradient_lstm, gradient_lstm_forward_reference
from fastmeta.ops.gradient_mlp import gradient_mlp, gradient_mlp_forward_reference


class GradientMLP(nn.Module):
    """grads [...] -> fast weights [...] (same shape), coordinate by coordinate:
    preprocess (log|g|/p, sign g) then 2 -> hidden -> 1 with a ReLU.

    The output layer starts `output_scale` times smaller than nn.Linear's default, so
    fresh fast weights are small next to the slow ones (0: zero)."""

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


class GradientLSTM(nn.Module):
    """grads [B, N, ...] -> fast weights [B, ...], coordinate by coordinate: an LSTM
    with `hidden` units reads the N examples' preprocessed gradients (log|g|/p, sign g)
    in the order given, from a zero state; a linear output of its last hidden state is
    the fast weight (fastmeta.ops.gradient_lstm). N = 1 is one step from zero state.

    Initialisation: torch.nn.LSTMCell's (uniform in +-1/sqrt(hidden); one bias, as the
    cell's two add up), and an output layer `output_scale` times smaller than
    nn.Linear's default, as GradientMLP's."""

    def __init__(self, hidden: int = 20, p: float = 10.0, output_scale: float = 0.1):
        super().__init__()
        self.p = p
        cell, last = nn.LSTMCell(2, hidden), nn.Linear(hidden, 1)
        self.w_ih = nn.Parameter(cell.weight_ih.detach())  # [4H, 2], gates (i, f, g, o)
        self.w_hh = nn.Parameter(cell.weight_hh.detach())  # [4H, H]
        self.b = nn.Parameter(cell.bias_ih.detach())  # [4H]
        self.w_out = nn.Parameter(last.weight.detach()[0] * output_scale)  # [H]
        self.b_out = nn.Parameter(torch.zeros(()))

    def _parameters_in_order(self) -> tuple[Tensor, ...]:
        return self.w_ih, self.w_hh, self.b, self.w_out, self.b_out

    def forward(self, grads: Tensor) -> Tensor:
        return gradient_lstm(grads, *self._parameters_in_order(), self.p)

    def plain(self, grads: Tensor) -> Tensor:
        """The same function in plain PyTorch (builds every step's [B, ..., 4H] gates)."""
        return gradient_lstm_forward_reference(grads, *self._parameters_in_order(), self.p)

    def extra_repr(self) -> str:
        return f"hidden={self.w_hh.shape[1]}, p={self.p:g}"
