"""The conformance suite: one harness run over every public op (tests/op_samples.py)
on every backend usable here for it, with outputs poisoned (conftest: torch.empty
fills NaN, so an unwritten element fails the comparison).

Per (op, backend, device): forward and gradients against the float64 oracle in
float32 and, where the backend takes it, float64; gradcheck and gradgradcheck (or,
for an op differentiable once, the error of a second derivative) in float64;
torch.library.opcheck. Per (op, device): torch.compile(fullgraph=True) equals eager.
Per op: each bad input raises the error that names the argument.
"""

import pytest
import torch
from conftest import DEVICES, rel_err
from op_samples import SAMPLES, OpSample

import fastmeta
from fastmeta import backend
from fastmeta.ops import DECLARATIONS, declaration

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 3e-3, torch.bfloat16: 2e-2}
HALF = (torch.float16, torch.bfloat16)


def _usable(sample: OpSample, name: str, device: str, dtype=torch.float32) -> bool:
    return backend.op_unavailable_reason(sample.declared, name, device, dtype) is None


def _mixed_precision(sample: OpSample) -> bool:
    """Whether the op has a fused backend that takes float16 and bfloat16."""
    dtypes = next(d.dtypes for d in DECLARATIONS if d.name == sample.declared)
    return any(set(HALF) <= set(taken) for taken in dtypes.values())


def _half_cases():
    return [
        pytest.param(sample, name, device, dtype, id=f"{sample.id}-{name}-{device}-{dtype}")
        for sample in SAMPLES
        if _mixed_precision(sample)
        for device in DEVICES
        for name in backend.op_backends(sample.declared)
        for dtype in HALF
        if _usable(sample, name, device, dtype)
    ]


def _cases(with_backend: bool):
    cases = []
    for sample in SAMPLES:
        for device in DEVICES:
            if not with_backend:
                cases.append(pytest.param(sample, device, id=f"{sample.id}-{device}"))
                continue
            for name in backend.op_backends(sample.declared):
                if _usable(sample, name, device):
                    cases.append(
                        pytest.param(sample, name, device, id=f"{sample.id}-{name}-{device}")
                    )
    return cases


def _op(sample: OpSample):
    return getattr(torch.ops.fastmeta, sample.name).default


def _selected(sample: OpSample, result) -> list[torch.Tensor]:
    """The op's differentiable outputs, in the order of sample.outputs."""
    return [result] if not sample.outputs else [result[i] for i in sample.outputs]


def _with_grad(sample: OpSample, args: list) -> list:
    return [
        a.detach().clone().requires_grad_() if i in sample.grad_args else a
        for i, a in enumerate(args)
    ]


def _to_float64_cpu(args: list) -> list:
    return [
        a.detach().cpu().double()
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a.cpu()
        if isinstance(a, torch.Tensor)
        else a
        for a in args
    ]


def test_every_declared_op_has_a_sample():
    """An op added to fastmeta.ops.DECLARATIONS without an OpSample fails here."""
    declared = {d.name for d in DECLARATIONS}
    sampled = {s.name for s in SAMPLES}
    assert declared <= sampled, f"ops without an OpSample: {sorted(declared - sampled)}"
    for sample in SAMPLES:
        policy = next((d.differentiable for d in DECLARATIONS if d.name == sample.name), None)
        assert policy in (None, sample.differentiable), sample.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("sample,name,device", _cases(with_backend=True))
def test_forward_and_gradients_match_the_float64_oracle(sample, name, device, dtype):
    if not _usable(sample, name, device, dtype):
        pytest.skip(f"{name} on {device} does not take {dtype}")
    check_against_the_oracle(sample, name, device, dtype)


@pytest.mark.parametrize("sample,name,device,dtype", _half_cases())
def test_half_precision_matches_the_float64_oracle(sample, name, device, dtype):
    """float16/bfloat16 arguments: float32 math inside, outputs and gradients in the
    arguments' dtype, within the dtype's rounding of the float64 oracle (on the same
    rounded inputs)."""
    check_against_the_oracle(sample, name, device, dtype)


def check_against_the_oracle(sample: OpSample, name: str, device: str, dtype: torch.dtype):
    args = _with_grad(sample, sample.make(device, dtype, False))
    with fastmeta.use_backend(name):
        result = _op(sample)(*args)
        outputs = _selected(sample, result)
        cotangents = [torch.randn_like(o) for o in outputs]
        grads = torch.autograd.grad(outputs, [args[i] for i in sample.grad_args], cotangents)
    assert fastmeta.last_backend(sample.declared) == name
    for out in result if isinstance(result, tuple) else (result,):
        if out.is_floating_point():  # statistics, softmax, ...: every element written
            assert not out.isnan().any(), "an output holds NaN (an unwritten element?)"

    expected_args = _with_grad(sample, _to_float64_cpu(args))
    expected = sample.oracle(*expected_args)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    expected_grads = torch.autograd.grad(
        expected,
        [expected_args[i] for i in sample.grad_args],
        [c.double().cpu() for c in cotangents],
    )
    for i, (got, want) in enumerate(zip(outputs, expected)):
        assert got.dtype == dtype and got.shape == want.shape, f"output {i}"
        assert rel_err(got, want) < TOLERANCE[dtype], f"output {i}"
    # A gradient that is zero in exact arithmetic (a convolution's bias under batch
    # norm) is measured against the largest gradient instead of its own norm; so is one
    # of sample.cancelling when that is larger than its own.
    scale = max(float(g.norm()) for g in expected_grads)
    for position, got, want in zip(sample.grad_args, grads, expected_grads):
        assert got.dtype == args[position].dtype and got.shape == want.shape, f"d_arg{position}"
        floor = scale if position in sample.cancelling else 1e-2 * scale
        error = float((got.detach().double().cpu() - want).norm()) / max(float(want.norm()), floor)
        assert error < TOLERANCE[dtype], f"gradient of argument {position}: {error}"


@pytest.mark.parametrize("sample,name,device", _cases(with_backend=True))
def test_gradcheck_and_the_second_derivative_policy(sample, name, device):
    if not _usable(sample, name, device, torch.float64):
        pytest.skip(f"{name} on {device} has no float64")
    args = _with_grad(sample, sample.make(device, torch.float64, True))
    op = _op(sample)

    def differentiable_outputs(*grad_inputs):
        full = list(args)
        for position, value in zip(sample.grad_args, grad_inputs):
            full[position] = value
        return tuple(_selected(sample, op(*full)))

    inputs = tuple(args[i] for i in sample.grad_args)
    with fastmeta.use_backend(name):
        assert torch.autograd.gradcheck(differentiable_outputs, inputs)
        if sample.differentiable == declaration.ANY_ORDER:
            assert torch.autograd.gradgradcheck(differentiable_outputs, inputs)
        else:
            outputs = differentiable_outputs(*inputs)
            grads = torch.autograd.grad(
                outputs, inputs, [torch.ones_like(o) for o in outputs], create_graph=True
            )
            with pytest.raises(
                RuntimeError, match=f"fastmeta.{sample.name} is differentiable once"
            ):
                torch.autograd.grad(sum(g.sum() for g in grads), inputs)


@pytest.mark.parametrize("sample,name,device", _cases(with_backend=True))
def test_opcheck(sample, name, device):
    args = sample.make(device, torch.float32, True)
    with fastmeta.use_backend(name):
        torch.library.opcheck(_op(sample), args)
        torch.library.opcheck(_op(sample), _with_grad(sample, args))


@pytest.mark.parametrize("sample,name,device,dtype", _half_cases())
def test_opcheck_in_half_precision(sample, name, device, dtype):
    """The fake kernels state the half-precision outputs' dtypes (the loss's float32
    prototypes and softmax) as the kernels make them."""
    with fastmeta.use_backend(name):
        torch.library.opcheck(_op(sample), _with_grad(sample, sample.make(device, dtype, True)))


@pytest.mark.parametrize("sample,device", _cases(with_backend=False))
def test_compiles_with_fullgraph(sample, device):
    torch._dynamo.reset()
    args = sample.make(device, torch.float32, False)
    op = _op(sample)

    def outputs(*args):
        return _selected(sample, op(*args))

    compiled = torch.compile(outputs, fullgraph=True, dynamic=False)
    for got, want in zip(compiled(*args), outputs(*args)):
        assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize(
    "sample,bad", [pytest.param(s, b, id=f"{s.id}-{b.label}") for s in SAMPLES for b in s.bad]
)
def test_bad_input_names_the_argument(sample, bad):
    args = bad.change(sample.make("cpu", torch.float32, False))
    with pytest.raises(bad.error, match=bad.match):
        _op(sample)(*args)
