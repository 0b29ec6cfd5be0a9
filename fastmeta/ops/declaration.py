"""The op declaration: everything about an op's backends in one table.

Each op module declares its op once, for example:

    GRADIENT_MLP = OpDeclaration(
        name="gradient_mlp",
        forward=Kernels({
            "reference": gradient_mlp_forward_reference,
            "cpu": compiled("gradient_mlp_forward"),      # torch.ops.fastmeta_C.<name>
            "triton": triton("metanet_triton", "gradient_mlp_forward"),
        }),
        backward=Kernels({...}, device_from=1),
        dtypes={"cpu": FLOAT32_64, "triton": FLOAT32},
        differentiable=ONCE,
    )

(`every_backend(reference, kernel, triton_module)` writes the common four-entry table
of a direction whose cpu, cuda and triton kernels share one name) and then defines its
torch.library ops, whose bodies check arguments and call
`GRADIENT_MLP.run_forward(*args)`. From the declaration follow: the backends and
dtypes the registry knows (fastmeta.backend), what runs for each (op, backend,
direction), which argument gives the device and dtype that choose the backend,
which form the shape bucket of the GPU race (fastmeta/race.py), and the
second-derivative policy:

  ANY_ORDER  the backward is differentiable (its own op with an autograd formula,
             or differentiable torch ops): grad of grad is exact, to any order.
  ONCE       the backward op's derivative raises a RuntimeError naming the op, so a
             second derivative fails loudly instead of silently being zero.

Every kernel of one direction takes the same arguments in the same order as the
reference, already checked and contiguous: the op body makes them so, once.
"""

import dataclasses
import importlib
from typing import Callable

import torch

from fastmeta import backend
from fastmeta import race as racing

FLOAT32 = (torch.float32,)
FLOAT32_64 = (torch.float32, torch.float64)
HALF = (torch.float16, torch.bfloat16)
ANY_ORDER = "any order"
ONCE = "once"


@dataclasses.dataclass(frozen=True)
class KernelRef:
    """A kernel found on first use: `torch.ops.fastmeta_C.<name>` (the extension may
    not be built) or `fastmeta.kernels.<module>.<name>` (Triton may be missing)."""

    module: str | None  # None: a fastmeta_C op
    name: str

    def resolve(self) -> Callable:
        if self.module is None:
            return getattr(torch.ops.fastmeta_C, self.name).default
        return getattr(importlib.import_module(f"fastmeta.kernels.{self.module}"), self.name)


def contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, each made contiguous (no copy when it already is)."""
    return tuple(t.contiguous() for t in tensors)


def compiled(name: str) -> KernelRef:
    """The fastmeta._C kernel op `name` (one schema; the dispatcher picks its CPU or
    CUDA implementation by device: csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cu)."""
    return KernelRef(None, name)


def triton(module: str, name: str) -> KernelRef:
    """The Triton launcher `name` of fastmeta/kernels/<module>.py."""
    return KernelRef(module, name)


def every_backend(reference: Callable, kernel: str, triton_module: str) -> dict:
    """The four backends of a direction whose kernels all carry the name `kernel`:
    reference, cpu and cuda (the fastmeta_C op `kernel`) and triton (the launcher
    `kernel` of fastmeta/kernels/<triton_module>.py)."""
    return {
        "reference": reference,
        "cpu": compiled(kernel),
        "cuda": compiled(kernel),
        "triton": triton(triton_module, kernel),
    }


@dataclasses.dataclass
class Kernels:
    """One direction of an op (its forward or its backward) on each backend.

    impls: backend -> the function (or a KernelRef to it) that runs the direction;
    device_from: the argument whose device and dtype choose the backend;
    race_on: the arguments whose shapes (tensors) or values (the rest) make the shape
    bucket in which a device's racing backends are timed against each other (on CUDA:
    cuda against triton); () for a direction that is never raced.
    """

    impls: dict[str, Callable | KernelRef]
    device_from: int = 0
    race_on: tuple[int, ...] = ()
    # outputs kept in float32 for float16/bfloat16 arguments (a softmax the backward
    # reads: rounding it to half would be amplified there)
    float32_outputs: tuple[int, ...] = ()

    def function(self, name: str) -> Callable:
        """The function backend `name` runs (a KernelRef is resolved on first use and
        replaced by what it found)."""
        impl = self.impls[name]
        if isinstance(impl, KernelRef):
            impl = self.impls[name] = impl.resolve()
        return impl


@dataclasses.dataclass
class OpDeclaration:
    """An op: its name, its kernels per backend and direction, the dtypes each fused
    backend takes (a backend missing from `dtypes` takes every floating dtype), and
    its second-derivative policy (ANY_ORDER or ONCE). Registers the op with
    fastmeta.backend when created."""

    name: str
    forward: Kernels
    backward: Kernels | None = None  # None: the backward is differentiable torch ops
    dtypes: dict[str, tuple[torch.dtype, ...]] = dataclasses.field(default_factory=dict)
    differentiable: str = ANY_ORDER
    # Backends that take float16/bfloat16 by running their float32 kernels on float32
    # copies of the half arguments (math and accumulation in float32), their floating
    # outputs cast back to the arguments' dtype.
    upcast: tuple[str, ...] = ()

    def __post_init__(self):
        backends = self.backends
        if backends[0] != "reference":
            raise ValueError(f"{self.name}: the reference must be the first backend")
        if self.backward is not None and tuple(self.backward.impls) != backends:
            raise ValueError(f"{self.name}: forward and backward have different backends")
        if self.differentiable not in (ANY_ORDER, ONCE):
            raise ValueError(f"{self.name}: differentiable must be ANY_ORDER or ONCE")
        for name in self.upcast:
            if not set(HALF) <= set(self.dtypes.get(name, HALF)):
                raise ValueError(f"{self.name}: upcast backend {name} does not declare HALF")
        backend.register_op(self.name, backends, self.dtypes)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.forward.impls)

    def run_forward(self, *args):
        """The forward on the backend selected for these (checked, contiguous) args."""
        return self._run(self.forward, "forward", args)

    def run_backward(self, *args):
        """The backward on the backend selected for these args."""
        return self._run(self.backward, "backward", args)

    def _run(self, kernels: Kernels, direction: str, args: tuple):
        lead = args[kernels.device_from]
        race = (lambda: _race(kernels, direction, args)) if kernels.race_on else None
        name = backend.select(self.name, lead.device, lead.dtype, race)
        if lead.dtype in HALF and name in self.upcast:
            return _upcast_call(kernels, name, args, lead.dtype)
        return kernels.function(name)(*args)

    def apply_second_derivative_policy(self, backward_op) -> None:
        """Applies the second-derivative policy to the op's backward op (a
        torch.library custom op): under ONCE its derivative raises."""
        if self.differentiable == ONCE:
            _forbid_second_derivative(backward_op, f"fastmeta.{self.name}")


def _upcast_call(kernels: Kernels, name: str, args: tuple, dtype: torch.dtype):
    """Backend `name` on float32 copies of the `dtype` arguments; floating outputs cast
    to dtype, but for kernels.float32_outputs."""

    def up(a):
        return a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a

    def down(i, t):
        keep = not t.is_floating_point() or i in kernels.float32_outputs
        return t if keep else t.to(dtype)

    out = kernels.function(name)(*(up(a) for a in args))
    return tuple(down(i, t) for i, t in enumerate(out)) if isinstance(out, tuple) else down(0, out)


def register_float32_autocast(op) -> None:
    """Under torch.autocast (CPU and CUDA), `op` runs in float32: its floating inputs
    are cast to float32 (torch's rule for distances, softmax and cross-entropy, as
    cdist, log_softmax, cross_entropy and cosine_similarity)."""
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast(op, device_type, torch.float32)


def _race(kernels: Kernels, direction: str, args: tuple) -> racing.Race:
    """The Race of one call: run it on a named backend; the bucket is `direction`, the
    values of the non-tensor race arguments and the shapes of the tensor ones."""

    def run(name):
        return kernels.function(name)(*args)

    chosen = [args[i] for i in kernels.race_on]
    tensors = [a for a in chosen if isinstance(a, torch.Tensor)]
    tag = (direction, *(a for a in chosen if not isinstance(a, torch.Tensor)))
    return racing.Race(run, *tensors, tag=tag)


def _forbid_second_derivative(backward_op, name: str) -> None:
    def raise_on_derivative(ctx, *grads):
        raise RuntimeError(
            f"{name} is differentiable once: its backward has no derivative "
            f"(fastmeta uses it only where none is taken)"
        )

    backward_op.register_autograd(
        raise_on_derivative, setup_context=lambda ctx, inputs, output: None
    )
