"""Property-based fuzzing (Hypothesis) of every public op on every usable backend.

Each example draws sizes (0 and 1 included in every dimension), a dtype, values
(normal, exact ties, or sprinkled with 0, +-1, 1e-40 denormals, +-1e30, +-inf and
NaN), label layouts (every class present, random, sorted, one out of range, int32),
memory layouts (contiguous, transposed, strided slices, expanded) and a mutation
(none, one argument of another dtype, one argument on the meta device). The same
arguments go to the reference backend and to the backend under test, through the
public wrapper (fastmeta.ops.<op>.<op>); both must agree:

- both raise: the same exception type and message;
- both return: same shapes, dtypes and devices, NaN exactly where the reference has
  NaN, the same infinities, integer outputs (argmax) equal, finite values within the
  dtype's tolerance of the tensor's scale; gradients (random finite cotangents) alike.

Outputs are poisoned (conftest: torch.empty fills NaN), so an unwritten element
shows as a NaN the reference does not have.

Profiles (FASTMETA_FUZZ): `ci` (default: a fixed seed, a few examples per op and
backend, part of `make test`) and `long` (random seeds, many examples; `make fuzz`).
"""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as TF
from conftest import usable_backend_devices
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from op_samples import SAMPLES

import fastmeta
from fastmeta import backend

settings.register_profile(
    "ci",
    max_examples=12,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("FASTMETA_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROFILE = os.environ.get("FASTMETA_FUZZ", "ci")

SPECIALS = (0.0, 1.0, -1.0, 2.5, 1e-40, -1e-40, 1e30, -1e30, math.inf, -math.inf, math.nan)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


# ---------------------------------------------------------------- drawing arguments


@st.composite
def values(draw, shape, dtype):
    """A float tensor of `shape`: normal, small integers (exact ties) or specials."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mode = draw(st.sampled_from(["normal", "ties", "specials", "constant"]))
    if mode == "ties":
        return torch.randint(-2, 3, shape, generator=generator).to(dtype)
    if mode == "constant":
        return torch.full(shape, draw(st.sampled_from(SPECIALS)), dtype=dtype)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if mode == "specials":
        palette = torch.tensor(draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=3)))
        where = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.1, 0.5]))
        pick = torch.randint(0, len(palette), shape, generator=generator)
        x = torch.where(where, palette.double()[pick], x)
    return x.to(dtype)


@st.composite
def labels(draw, B, S, C, every_class):
    """[B, S] class indices in [0, C): every class present when `every_class` and S >= C."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = draw(st.sampled_from(["balanced", "random", "sorted", "out of range"]))
    if layout == "random" or (every_class and S < C):
        y = torch.randint(0, max(C, 1), (B, S), generator=generator)
    else:
        base = torch.arange(S) % max(C, 1) if every_class else torch.zeros(S, dtype=torch.long)
        y = (
            base[torch.stack([torch.randperm(S, generator=generator) for _ in range(B)])]
            if B
            else base.new_zeros(0, S)
        )
        if layout == "sorted":
            y = y.sort(-1).values
    if layout == "out of range" and y.numel():
        y.view(-1)[draw(st.integers(0, y.numel() - 1))] = draw(st.sampled_from([-1, C]))
    return y.to(draw(st.sampled_from([torch.int64, torch.int64, torch.int32])))


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values (or, for "expanded", the first row's) in another memory layout."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and t.dim() >= 1:
        buffer = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        buffer[..., ::2] = t
        return buffer[..., ::2]
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] > 0:
        return t[:1].expand_as(t)
    return t


def _sizes(draw, *names, high=5):
    return [draw(st.integers(0, high), label=name) for name in names]


def _protonet_pair(draw, dtype):
    B, M, C, D = _sizes(draw, "B", "M", "C", "D")
    return draw(values((B, M, D), dtype)), draw(values((B, C, D), dtype))


def _squared_distances(draw, dtype):
    return list(_protonet_pair(draw, dtype))


def _cosine_similarities(draw, dtype):
    return [*_protonet_pair(draw, dtype), draw(st.sampled_from([1e-8, 1e-3, 1.0]))]


def _class_prototypes(draw, dtype):
    B, S, D = _sizes(draw, "B", "S", "D", high=6)
    C = draw(st.integers(1, 4), label="C")
    return [draw(values((B, S, D), dtype)), draw(labels(B, S, C, True)), C]


def _tau(draw, dtype):
    # |tau| <= 2: a large tau turns rounding-level differences of the distances (another
    # GEMM order) into different softmax rows
    return torch.tensor(draw(st.sampled_from([0.3, 1.0, 0.0, -2.0])), dtype=dtype)


def _distance(draw):
    return draw(st.sampled_from(["squared_euclidean", "euclidean", "cosine"]), label="distance")


def _prototypical_cross_entropy(draw, dtype):
    queries, prototypes = _protonet_pair(draw, dtype)
    C = prototypes.shape[1]
    query_labels = draw(labels(queries.shape[0], queries.shape[1], C, False))
    return [queries, prototypes, query_labels, _tau(draw, dtype), _distance(draw)]


def _prototypical_loss(draw, dtype):
    support, support_labels, C = _class_prototypes(draw, dtype)
    B, D = support.shape[0], support.shape[2]
    M = draw(st.integers(0, 5), label="M")
    query_labels = draw(labels(B, M, C, False))
    return [support, support_labels, draw(values((B, M, D), dtype)), query_labels, C] + [
        _tau(draw, dtype),
        _distance(draw),
    ]


def _inner_update(draw, dtype):
    T, P = _sizes(draw, "T", "P", high=7)
    alpha = draw(st.sampled_from([(), (P,)]))
    return [draw(values((P,), dtype)), draw(values(alpha, dtype)), draw(values((T, P), dtype))]


def _gradient_mlp(draw, dtype):
    rows, P, H = _sizes(draw, "rows", "P", "H")
    return [
        draw(values((rows, P), dtype)),
        draw(values((H, 2), dtype)),
        draw(values((H,), dtype)),
        draw(values((H,), dtype)),
        draw(values((), dtype)),
        draw(st.sampled_from([10.0, 1.0])),
    ]


def _gradient_lstm(draw, dtype):
    B, N, Q = _sizes(draw, "B", "N", "Q", high=4)
    H = draw(st.integers(0, 4), label="H")
    return [
        draw(values((B, N, Q), dtype)),
        draw(values((4 * H, 2), dtype)),
        draw(values((4 * H, H), dtype)),
        draw(values((4 * H,), dtype)),
        draw(values((H,), dtype)),
        draw(values((), dtype)),
        draw(st.sampled_from([10.0, 1.0])),
    ]


def _attention_read(draw, dtype):
    B, M, N, O, K, L = _sizes(draw, "B", "M", "N", "O", "K", "L", high=4)
    return [
        draw(values((B, M, N), dtype)),
        draw(values((B, N, O, K), dtype)),
        draw(values((B, M, L, K), dtype)),
    ]


def _image_sizes(draw):
    N = draw(st.integers(0, 3), label="N")
    H, W = (draw(st.integers(2, 7), label=name) for name in "HW")
    return N, H, W


def _conv_block(draw, dtype):
    N, H, W = _image_sizes(draw)
    Cin, C = (draw(st.integers(1, 3), label=name) for name in ("Cin", "C"))
    return [
        draw(values((N, Cin, H, W), dtype)),
        draw(values((C, Cin, 3, 3), dtype)),
        *(draw(values((C,), dtype)) for _ in range(3)),
        [1, 1],
        1e-5,  # with eps = 0 a constant conv output has var 0 only up to rounding here
    ]


def _bn_relu_pool(draw, dtype):
    N, H, W = _image_sizes(draw)
    C = draw(st.integers(1, 3), label="C")
    return [
        draw(values((N, C, H, W), dtype)),
        *(draw(values((C,), dtype)) for _ in range(2)),
        draw(st.sampled_from([1e-5, 0.0])),
    ]


ARGUMENTS = {
    "squared_distances": _squared_distances,
    "cosine_similarities": _cosine_similarities,
    "class_prototypes": _class_prototypes,
    "prototypical_cross_entropy": _prototypical_cross_entropy,
    "prototypical_loss": _prototypical_loss,
    "inner_update": _inner_update,
    "gradient_mlp": _gradient_mlp,
    "gradient_lstm": _gradient_lstm,
    "attention_read": _attention_read,
    "conv_block": _conv_block,
    "bn_relu_pool": _bn_relu_pool,
}


@st.composite
def cases(draw, op: str, backend_name: str, device: str):
    """(arguments on `device`, what was done to them) for one call of `op`, in a dtype
    the backend takes."""
    declared = next(s for s in SAMPLES if s.name == op).declared
    dtypes = [
        dtype
        for dtype in (torch.float32, torch.float64)
        if backend.op_unavailable_reason(declared, backend_name, device, dtype) is None
    ]
    dtype = draw(st.sampled_from(dtypes))
    args = ARGUMENTS[op](draw, dtype)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for i in tensors:
        args[i] = _laid_out(
            args[i], draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
        )
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    floating = [i for i in tensors if args[i].is_floating_point()]
    mixed = ["other dtype"] if len(floating) > 1 else []  # else the call's dtype changes
    mutation = draw(st.sampled_from(["none", "none", "none", "meta", *mixed]))
    if mutation == "meta":
        i = draw(st.sampled_from(tensors))
        args[i] = args[i].to("meta")
    elif mutation == "other dtype":
        i = draw(st.sampled_from(floating))
        args[i] = args[i].to(torch.float64 if args[i].dtype == torch.float32 else torch.float32)
    return args, f"{dtype}, {mutation}"


# ---------------------------------------------------------------- running and comparing


def _call(op: str, backend_name: str, args: list, sample):
    """(outputs, gradients of the differentiable arguments) or the exception raised."""
    function = getattr(importlib.import_module(f"fastmeta.ops.{op}"), op)
    args = [
        a.detach().clone().requires_grad_()
        if i in sample.grad_args and isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for i, a in enumerate(args)
    ]
    try:
        with fastmeta.use_backend(backend_name):
            result = function(*args)
            results = list(result) if isinstance(result, tuple) else [result]
            differentiable = results if not sample.outputs else [results[i] for i in sample.outputs]
            inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = []
            if inputs and all(o.device.type != "meta" for o in differentiable):
                generator = torch.Generator().manual_seed(0)
                cotangents = [  # the same values (float32's) in every dtype
                    torch.randn(o.shape, generator=generator).to(o.device, o.dtype)
                    for o in differentiable
                ]
                grads = torch.autograd.grad(
                    differentiable, inputs, cotangents, allow_unused=True, materialize_grads=True
                )
    except Exception as error:  # noqa: BLE001 - compared with the reference's
        return error
    return [r.detach() for r in results], [g.detach() for g in grads]


def _largest_finite(tensors) -> float:
    return max(
        (
            t[t.isfinite()].abs().max().item()
            for t in tensors
            if t.is_floating_point() and t.device.type != "meta" and t.isfinite().any()
        ),
        default=0.0,
    )


def _assert_close(got, want, exact, what: str, floor: float = 0.0):
    """got (the backend's) against want (the reference backend's), in the same dtype:
    shapes, dtypes and devices equal; NaN exactly where want has NaN; where want is
    infinite, the same infinity or NaN (another order of the same algebra may meet
    inf - inf); finite where want is finite, and no further from `exact` (the reference
    in float64 on the same inputs) than 4x want's own error plus the dtype's tolerance
    of the scale (the larger of the tensor's largest value and `floor`) plus the
    dtype's smallest normal number."""
    assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device), what
    if want.device.type == "meta":
        return
    got, want, exact = got.cpu(), want.cpu(), exact.cpu()
    if not want.is_floating_point():
        assert torch.equal(got, want), f"{what}: {got} != {want}"
        return
    nan, infinite = want.isnan(), want.isinf()
    finite = ~(nan | infinite)
    shown = f"\nbackend: {got}\nreference: {want}\nfloat64: {exact}"
    assert got[nan].isnan().all(), f"{what}: a NaN of the reference hidden{shown}"
    assert got[finite].isfinite().all(), f"{what}: not finite where the reference is{shown}"
    overflowed = got[infinite]
    assert ((overflowed == want[infinite]) | overflowed.isnan()).all(), f"{what}: inf{shown}"
    finite &= exact.isfinite()
    if not finite.any():
        return
    g, w, e = got[finite].double(), want[finite].double(), exact[finite].double()
    scale = max(w.abs().max().item(), floor) or 1.0
    tiny = torch.finfo(want.dtype).tiny  # a denormal result may flush to zero
    error = (g - e).abs()
    allowed = 4 * (w - e).abs() + TOLERANCE[want.dtype] * scale + tiny
    worst = (error - allowed).argmax()
    assert (error <= allowed).all(), (
        f"{what}: off by {error[worst].item()} from float64, the reference by "
        f"{(w - e)[worst].abs().item()} (scale {scale}){shown}"
    )


def _in_float64(args: list) -> list:
    return [
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    ]


def _beyond_a_documented_limit(op: str, backend_name: str, args: list, want) -> bool:
    """The cases the README documents as differing from the reference:
    - cosine_similarities' fused kernels and the CPU conv_block's batch statistics
      square entries in the input dtype (the reference normalizes first, torch's
      batch norm accumulates in double on the CPU): entries beyond sqrt(dtype max)
      may give inf, NaN or 0;
    - the Triton class_prototypes kernel sums by a one-hot GEMM: a non-finite support
      entry makes NaN of the other classes' prototypes (and gradients) of its episode;
    - the CPU conv_block and bn_relu_pool kernels apply batch norm as c * scale + shift:
      where the reference's output overflows to inf, they may give NaN nearby;
    - the CPU conv_block takes its batch statistics from patch moments, which the bias
      does not enter: where the bias swamps the conv output in the dtype, its
      statistics are the exact ones and the reference's (from the rounded output) not
      (and with eps = 0 a constant output's variance is 0 only up to rounding: the
      fuzzer draws conv_block's eps = 1e-5)."""
    tensors = [
        a
        for a in args
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type != "meta"
    ]
    squares = (op == "cosine_similarities" and backend_name != "reference") or (
        op == "conv_block" and backend_name == "cpu"
    )
    if squares and any((a.abs() > math.sqrt(torch.finfo(a.dtype).max)).any() for a in tensors):
        return True
    if (
        op == "conv_block"
        and backend_name == "cpu"
        and all(t.device.type != "meta" for t in args[:3])
    ):
        if _ill_conditioned_moments(*args[:3], args[6]):
            return True
    if op in ("prototypical_cross_entropy", "prototypical_loss") and _logits_round_to_ties(
        op, args
    ):
        return True
    if op in ("class_prototypes", "prototypical_loss") and backend_name == "triton":
        return args[0].device.type != "meta" and not args[0].isfinite().all()
    if (
        op in ("conv_block", "bn_relu_pool")
        and backend_name == "cpu"
        and not isinstance(want, Exception)
    ):
        return bool(want[0][0].isinf().any())
    return False


def _logits_round_to_ties(op: str, args: list) -> bool:
    """Whether the logits' rounding (dtype eps x |tau| ||q|| ||c||, about) reaches 1e-3:
    then another summation order may pick another class or softmax row (1e30 entries)."""
    points = (args[2], args[0]) if op == "prototypical_loss" else (args[0], args[1])
    tau = args[-2]  # before the distance
    if any(t.device.type == "meta" or not t.numel() for t in (*points, tau)):
        return False
    if not all(t.isfinite().all() for t in (*points, tau)):
        return False
    q, c = (t.double().abs().max().item() * t.shape[-1] for t in points)
    return abs(tau.item()) * (q + c) * (q + c) * torch.finfo(tau.dtype).eps > 1e-3


def _ill_conditioned_moments(x, w, bias, eps) -> bool:
    """Whether the CPU conv_block's patch-moment statistics may differ from the batch
    statistics of the rounded output: a bias that swamps the output, or var + eps within
    rounding (about dtype eps x E[p^2] ||w||^2) of zero (a near-constant output)."""
    if not all(t.numel() and t.isfinite().all() for t in (x, w, bias)) or x.dtype != w.dtype:
        return False
    unit = torch.finfo(x.dtype).eps
    c = TF.conv2d(x.double(), w.double(), bias.double(), padding=1)
    var = c.var(dim=(0, 2, 3), unbiased=False)
    moments = x.double().pow(2).mean() * w.double().pow(2).sum((1, 2, 3))
    size = x.double().abs().max() * w.double().abs().max()
    swamped = bias.double().abs() * unit > 1e-3 * (1 + size)
    return bool(swamped.any() or (var + eps < 1e4 * unit * moments).any())


def _tie_broken_like(got, want, softmax):
    """got's predictions, with those that pick a class tied with the reference's choice
    to rounding (softmax within 1e-4 of the row's largest) replaced by the reference's:
    exact ties follow torch.argmax (the first), rounding-level ones may go either way."""
    if got.shape != want.shape or got.device.type == "meta" or not softmax.numel():
        return got
    p = softmax.cpu().double()
    chosen = p.gather(-1, got.cpu().clamp(0, p.shape[-1] - 1)[..., None])[..., 0]
    tied = (chosen >= p.max(-1).values - 1e-4) & ~p.isnan().any(-1)
    return torch.where(tied.to(got.device), want, got)


def check_against_the_reference(op: str, backend_name: str, args: list):
    sample = next(s for s in SAMPLES if s.name == op)
    want = _call(op, "reference", args, sample)
    assume(not _beyond_a_documented_limit(op, backend_name, args, want))
    got = _call(op, backend_name, args, sample)
    if isinstance(want, Exception) or isinstance(got, Exception):
        assert type(got) is type(want) and str(got) == str(want), (
            f"reference: {want!r}\n{backend_name}: {got!r}"
        )
        return
    assert fastmeta.last_backend(sample.declared) in (backend_name, None)
    exact = _call(op, "reference", _in_float64(args), sample)
    if isinstance(exact, Exception):
        exact = want
    (outputs, grads), (expected, expected_grads) = got, want
    assert len(outputs) == len(expected) and len(grads) == len(expected_grads)
    if op in (
        "prototypical_cross_entropy",
        "prototypical_loss",
    ):  # (..., predictions, ..., softmax)
        outputs[1] = _tie_broken_like(outputs[1], expected[1], expected[-1])
    for i, (g, w, e) in enumerate(zip(outputs, expected, exact[0])):
        _assert_close(g, w, e, f"output {i}")
    floor = max(_largest_finite(expected_grads), 1.0)  # a gradient that cancels to ~0
    for i, (g, w, e) in enumerate(zip(grads, expected_grads, exact[1])):
        _assert_close(g, w, e, f"gradient {i}", floor)


def _fuzzed():
    return [
        pytest.param(op, name, device, id=f"{op}-{name}-{device}")
        for op in ARGUMENTS
        for name, device in usable_backend_devices(
            next(s for s in SAMPLES if s.name == op).declared
        )
        if name != "reference"
    ]


def test_every_op_is_fuzzed():
    assert set(ARGUMENTS) == {s.name for s in SAMPLES}


@pytest.mark.parametrize("op,backend_name,device", _fuzzed())
def test_backend_agrees_with_the_reference(op, backend_name, device):
    @settings(settings.get_profile(PROFILE))
    @given(case=cases(op, backend_name, device))
    def run(case):
        args, _ = case
        check_against_the_reference(op, backend_name, args)

    run()


# ---------------------------------------------------------------- what the fuzzer found
# Each case gave a backend an answer other than the reference's (or the reference one
# other than the float64 math's) before its fix; each runs on every usable backend.

INF, NAN = math.inf, math.nan
FOUND = {
    # every backend: no class to predict gave an argmax IndexError (reference) or an
    # empty result (kernels); now a ValueError naming prototypes
    "cross entropy with no class": (
        "prototypical_cross_entropy",
        lambda: [
            torch.zeros(1, 0, 2),
            torch.zeros(1, 0, 2),
            torch.zeros(1, 0).long(),
            torch.tensor(0.3),
        ],
    ),
    # reference: d_tau of no query was 0 * inf (an overflowing ||c||^2) = NaN
    "d_tau of no query": (
        "prototypical_cross_entropy",
        lambda: [
            torch.zeros(1, 0, 1),
            torch.full((1, 1, 1), 1e30),
            torch.zeros(1, 0).long(),
            torch.tensor(0.3),
        ],
    ),
    # cpu: d_gamma was 0 where the reference's sum of 0 * xhat is NaN (rstd = inf)
    "batch norm of a constant channel with eps 0": (
        "bn_relu_pool",
        lambda: [torch.zeros(1, 1, 2, 2), torch.tensor([1.5]), torch.tensor([1.5]), 0.0],
    ),
    # reference: a closed relu unit passed 0 * inf = NaN for an infinite w2
    "gradient_mlp, infinite w2 of a closed unit": (
        "gradient_mlp",
        lambda: [
            torch.tensor([[1.5410, -0.2934]]),
            torch.tensor([[1.5410, -0.2934], [-2.1788, 0.5684]]),
            torch.tensor([1.5410, -0.2934]),
            torch.tensor([0.8033, INF]),
            torch.tensor(1.5410),
            10.0,
        ],
    ),
    # cpu: d_grads blended the two preprocessing branches, 0 * inf of the one not taken
    "gradient_mlp, infinite w1 of the branch not taken": (
        "gradient_mlp",
        lambda: [
            torch.tensor([[1.5410]]),
            torch.tensor([[1.5410, -0.2934], [0.4033, INF]]),
            torch.tensor([1.5410, -0.2934]),
            torch.tensor([1.5410, -0.2934]),
            torch.tensor(1.5410),
            10.0,
        ],
    ),
    # reference: with L = 0 (an empty output) the gradients were 0 * inf = NaN
    "attention_read of no row": (
        "attention_read",
        lambda: [
            torch.tensor([[[INF, -0.2934, -2.1788]]]),
            torch.randn(1, 3, 1, 1),
            torch.zeros(1, 1, 0, 1),
        ],
    ),
    # cpu: a closed unit skipped du += 0 * w1, NaN for an infinite w1 (as torch's matmul)
    "gradient_mlp, -inf w1 of a closed unit": (
        "gradient_mlp",
        lambda: [
            torch.tensor([[1.5410]]),
            torch.tensor([[-INF, -0.2934]]),
            torch.tensor([1.5410]),
            torch.tensor([1.5410]),
            torch.tensor(1.5410),
            10.0,
        ],
    ),
    # reference and triton: a NaN pre-activation blocked the gradient (torch's relu
    # backward passes it)
    "gradient_mlp, NaN pre-activation": (
        "gradient_mlp",
        lambda: [
            torch.tensor([[0.6614]]),
            torch.tensor([[INF, INF]]),
            torch.tensor([1.5410]),
            torch.tensor([1.5410]),
            torch.tensor(1.5410),
            10.0,
        ],
    ),
    # triton: a padded hidden unit of an infinite u0 computed inf * 0 = NaN
    "gradient_mlp, an infinite gradient coordinate": (
        "gradient_mlp",
        lambda: [
            torch.tensor([[INF]]),
            torch.tensor([[-0.8012, 0.4460]] * 3),
            torch.tensor([1.5410, -0.2934, -2.1788]),
            torch.tensor([1.5410, -0.2934, -2.1788]),
            torch.tensor(1.5410),
            10.0,
        ],
    ),
    # cpu: batch norm as c * scale + (beta - mean * scale) cancelled for a channel of 1e30s
    "bn_relu_pool of a constant 1e30 channel": (
        "bn_relu_pool",
        lambda: [
            torch.full((1, 1, 2, 2), 1e30),
            torch.tensor([1.5410]),
            torch.tensor([1.5410]),
            1e-5,
        ],
    ),
    # triton: with L = 0, d_attention was 0 * an infinite fast weight = NaN
    "attention_read of no row, infinite weights": (
        "attention_read",
        lambda: [
            torch.tensor([[[1.5410]]]),
            torch.tensor([[[[INF, -0.2934, -2.1788]]]]),
            torch.zeros(1, 1, 0, 3),
        ],
    ),
    # cpu and reference: d_prototypes of no query was 0 * an infinite prototype = NaN
    "d_prototypes of no query": (
        "prototypical_cross_entropy",
        lambda: [
            torch.zeros(1, 0, 3),
            torch.tensor([[[INF, -0.2934, -2.1788], [0.5684, -1.0845, -1.3986]]]),
            torch.zeros(1, 0).long(),
            torch.tensor(0.3),
        ],
    ),
}


def _found_cases():
    return [
        pytest.param(op, make, name, device, id=f"{label}-{name}-{device}")
        for label, (op, make) in FOUND.items()
        for name, device in usable_backend_devices(
            next(s for s in SAMPLES if s.name == op).declared
        )
    ]


@pytest.mark.parametrize("op,make,backend_name,device", _found_cases())
def test_what_the_fuzzer_found(op, make, backend_name, device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in make()]
    if backend_name == "reference":  # against the float64 math, where it is finite
        sample = next(s for s in SAMPLES if s.name == op)
        want, exact = (
            _call(op, "reference", args, sample),
            _call(op, "reference", _in_float64(args), sample),
        )
        if isinstance(want, Exception):
            assert isinstance(exact, Exception) and str(want) == str(exact)
            assert isinstance(want, ValueError), repr(want)
            return
        for w, e in zip(want[0] + want[1], exact[0] + exact[1]):
            if w.is_floating_point():
                assert torch.equal(w.isnan(), e.isnan().cpu()), (w, e)
        return
    check_against_the_reference(op, backend_name, args)
