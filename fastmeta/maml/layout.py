"""Where each adapted parameter lives in a flat buffer: [P] shared, [T, P] per task."""

import torch
from torch import Tensor


class ParamLayout:
    """The adapted parameters of a module, in order, flattened into one buffer.

    flatten(tensors)  -> [P]       (differentiable: a cat of the parameters)
    unflatten(flat)   -> {name: view of flat with the parameter's shape}
    A gradient that is None (an unused parameter) flattens to zeros.
    """

    def __init__(self, named: list[tuple[str, Tensor]]):
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.numel = sum(self.sizes)

    def flatten(self, tensors, like: Tensor | None = None) -> Tensor:
        parts = []
        for t, shape in zip(tensors, self.shapes):
            parts.append((t if t is not None else like.new_zeros(shape)).reshape(-1))
        return torch.cat(parts)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        chunks = flat.split(self.sizes, dim=-1)
        lead = flat.shape[:-1]
        return {
            name: c.view(*lead, *shape) for name, c, shape in zip(self.names, chunks, self.shapes)
        }
