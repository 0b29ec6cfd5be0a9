"""The eager fast path of an op: the same implementation, without the dispatcher.

A torch.library custom op with a registered autograd formula costs, per forward and
backward, several Python/C++ round trips (dispatcher, the autograd wrapper, the
redispatch below autograd, the backward op's own dispatch): about as much host time
as the whole eager formulation of a small ProtoNet episode. An op whose calls are
that cheap also gets an autograd.Function over the *same* forward, setup_context and
backward functions as its custom op; its public wrapper calls

    if eager_path(*tensors): return Function.apply(*args)
    return custom_op(*args)

so plain eager calls skip the dispatcher, while everything that must see the op takes
the custom op: torch.compile tracing, functorch transforms (vmap, grad), tensor
subclasses and dispatch modes (FakeTensor, opcheck), torch.autocast, meta tensors.
Under the profiler the fast path records a range named like the op
(`fastmeta::<name>`).
"""

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.profiler import record_function

_PLAIN = (Tensor, torch.nn.Parameter)
_DEVICES = ("cpu", "cuda")


def eager_path(*tensors: Tensor) -> bool:
    """Whether a call on `tensors` may take the eager fast path."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._is_any_autocast_enabled():  # the op's autocast rule applies
        return False
    return all(type(t) in _PLAIN and t.device.type in _DEVICES for t in tensors)


def eager_function(
    name: str, forward: Callable, setup_context: Callable, backward: Callable
) -> type[torch.autograd.Function]:
    """An autograd.Function running `forward` (the custom op's implementation),
    `setup_context(ctx, inputs, output)` and `backward(ctx, *grads)` (its autograd
    formula), recording `fastmeta::<name>` while the profiler runs. Written in the
    forward(ctx, ...) style: a Function with a separate setup_context staticmethod binds
    its arguments through inspect.signature on every call (about 40 us here); the eager
    path never meets a functorch transform, the one thing that style is needed for."""
    label = f"fastmeta::{name}"

    def run(ctx, *args):
        if torch.autograd.profiler._is_profiler_enabled:
            with record_function(label):
                output = forward(*args)
        else:
            output = forward(*args)
        setup_context(ctx, args, output)
        return output

    namespace = {
        "forward": staticmethod(run),
        "backward": staticmethod(backward),
        "__doc__": f"The eager fast path of {label} (fastmeta/ops/eager.py).",
    }
    return type(f"Eager_{name}", (torch.autograd.Function,), namespace)
