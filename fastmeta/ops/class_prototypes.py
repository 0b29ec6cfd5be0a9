"""Class prototypes: the per-class mean of support embeddings (ProtoNets).

    prototypes[b, k] = (1 / n_bk) sum_{i : y_bi = k} support[b, i]     [B, C, D]
Backward (linear): d_support[b, i] = d_prototypes[b, y_bi] / n_{b, y_bi}.
The backward's own backward is the forward again, so the op is differentiable to
any order. Labels may come in any order; shots per class may differ; every class
needs at least one support example.

Ops: torch.ops.fastmeta.class_prototypes, torch.ops.fastmeta.class_prototypes_backward.
Backends: reference (here), cpu and cuda (csrc/{cpu,cuda}/class_prototypes_*),
triton (fastmeta/kernels/protonet_triton.py).
"""

import torch
from torch import Tensor

from fastmeta.ops._checks import (
    check_floating,
    check_labels,
    check_num_classes,
    check_tensor,
    on_one_device,
    shape_str,
)
from fastmeta.ops._opmath import opmath
from fastmeta.ops.declaration import (
    ANY_ORDER,
    FLOAT32,
    FLOAT32_64,
    HALF,
    Kernels,
    OpDeclaration,
    every_backend,
    register_float32_autocast,
)
from fastmeta.ops.eager import eager_function, eager_path
from fastmeta.validation import Labels, check_label_values


def check_class_prototypes_args(
    support: Tensor,
    labels: Tensor,
    num_classes: int,
    name: str = "fastmeta.class_prototypes",
    labels_name: str = "labels",
) -> None:
    """Raises a clear error (naming `name` and the arguments) unless support [B, S, D]
    and integer labels [B, S] on its device are episodes of num_classes classes (the
    host-side checks: label values are checked by the ops, see fastmeta.validation)."""
    check_tensor(name, "support", support)
    check_floating(name, "support", support)
    if support.dim() != 3:
        raise ValueError(f"{name}: support must be [B, S, D], got shape {shape_str(support)}")
    check_num_classes(name, num_classes)
    if num_classes > support.shape[1] and support.shape[0] > 0:
        raise ValueError(
            f"{name}: num_classes={num_classes} exceeds the {support.shape[1]} support examples "
            f"per episode (support {shape_str(support)}): every class needs one"
        )
    check_labels(name, labels_name, labels, support.shape[:2])
    if labels.device != support.device:
        raise ValueError(
            f"{name}: {labels_name} is on {labels.device} but support is on {support.device}"
        )


def _counts(labels: Tensor, num_classes: int, dtype) -> Tensor:
    counts = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=dtype))


def class_sums(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """x [B, S, D], int64 labels [B, S] in [0, num_classes) -> (the sum of each class's
    examples in support order [B, C, D], each class's count [B, C]) in x's dtype: torch
    ops (scatter_add), differentiable to any order, no host sync."""
    B, S, D = x.shape
    sums = x.new_zeros(B, num_classes, D)
    sums.scatter_add_(1, labels[..., None].expand(B, S, D), x)
    return sums, _counts(labels, num_classes, x.dtype)


def class_prototypes_forward_reference(support: Tensor, labels: Tensor, num_classes: int):
    (x,) = opmath(support)
    sums, counts = class_sums(x, labels, num_classes)
    return (sums / counts[..., None]).to(support.dtype)


def class_prototypes_backward_reference(grad: Tensor, labels: Tensor) -> Tensor:
    (g,) = opmath(grad)
    B, C, D = g.shape
    counts = _counts(labels, C, g.dtype).gather(1, labels)
    d_support = g.gather(1, labels[..., None].expand(B, labels.shape[1], D)) / counts[..., None]
    return d_support.to(grad.dtype)


CLASS_PROTOTYPES = OpDeclaration(
    name="class_prototypes",
    forward=Kernels(
        every_backend(
            class_prototypes_forward_reference, "class_prototypes_forward", "protonet_triton"
        ),
        race_on=(0, 2),
    ),
    backward=Kernels(
        every_backend(
            class_prototypes_backward_reference, "class_prototypes_backward", "protonet_triton"
        ),
        race_on=(0, 1),
    ),
    dtypes={"cpu": FLOAT32_64 + HALF, "cuda": FLOAT32_64 + HALF, "triton": FLOAT32 + HALF},
    upcast=("cpu", "cuda"),
    differentiable=ANY_ORDER,  # the backward op's derivative is the forward op
)


def class_prototypes_forward(support: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    check_class_prototypes_args(support, labels, num_classes)
    check_label_values(
        "fastmeta.class_prototypes", Labels("labels", labels, num_classes, every_class=True)
    )
    return CLASS_PROTOTYPES.run_forward(
        support.contiguous(), labels.long().contiguous(), num_classes
    )


class_prototypes_op = torch.library.custom_op("fastmeta::class_prototypes", mutates_args=())(
    class_prototypes_forward
)


@class_prototypes_op.register_fake
@on_one_device(class_prototypes_op)
def _(support, labels, num_classes):
    return support.new_empty(support.shape[0], num_classes, support.shape[2])


@torch.library.custom_op("fastmeta::class_prototypes_backward", mutates_args=())
def class_prototypes_backward_op(grad: Tensor, labels: Tensor) -> Tensor:
    return CLASS_PROTOTYPES.run_backward(grad.contiguous(), labels.long().contiguous())


@class_prototypes_backward_op.register_fake
@on_one_device(class_prototypes_backward_op)
def _(grad, labels):
    return grad.new_empty(grad.shape[0], labels.shape[1], grad.shape[2])


def _setup_forward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_forward(ctx, grad):
    (labels,) = ctx.saved_tensors
    return class_prototypes_backward_op(grad, labels), None, None


def _setup_backward(ctx, inputs, output):
    grad, labels = inputs
    ctx.num_classes = grad.shape[1]
    ctx.save_for_backward(labels)


def _backward_backward(ctx, grad_d_support):
    (labels,) = ctx.saved_tensors  # the adjoint of the backward is the forward
    return class_prototypes_op(grad_d_support, labels, ctx.num_classes), None


class_prototypes_op.register_autograd(_backward_forward, setup_context=_setup_forward)
register_float32_autocast(class_prototypes_op)
class_prototypes_backward_op.register_autograd(_backward_backward, setup_context=_setup_backward)
_Eager = eager_function(
    "class_prototypes", class_prototypes_forward, _setup_forward, _backward_forward
)


def class_prototypes(support: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The op ([B, S, D], [B, S] -> [B, C, D]), on its eager fast path where one applies
    (fastmeta/ops/eager.py)."""
    if eager_path(support, labels):
        return _Eager.apply(support, labels, num_classes)
    return class_prototypes_op(support, labels, num_classes)
