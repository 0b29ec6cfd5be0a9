"""The C++ kernels' entry guards (csrc/checks.h), the kernels called directly as
torch.ops.fastmeta_C.<kernel>, past every Python check.

For every registered fastmeta_C kernel (a kernel without a case here fails
test_every_kernel_has_a_case): a valid call gives outputs of the expected shapes; each
bad variant (a tensor argument with an extra dimension, another dtype, mixed dtypes,
not contiguous, on another device; sizes that disagree between arguments; a scalar
tensor given as [1]; a bad int argument) raises RuntimeError naming the kernel instead
of reading out of bounds; and zero-size extents (B = 0, an inner extent 0) give outputs
of the right shapes. A crash would kill the pytest process: that counts as a failure.

A CPU kernel cannot be handed a tensor of another device through the dispatcher (a
meta argument routes the call to the missing Meta kernel): the device tests call the
CPU kernel itself (`redispatch` to the CPU key) with a meta argument, whose data
pointer is null, so only the guard stands between it and a null read. On a GPU the
CUDA kernels get one CPU argument.
"""

import dataclasses
from typing import Callable

import pytest
import torch
from conftest import COMPILED

from fastmeta import _extension

pytestmark = pytest.mark.skipif(not COMPILED, reason="fastmeta._C is not built")

B, M, C, D, S = 2, 4, 3, 5, 6  # episodes, queries, classes, embedding size, shots
T, P = 3, 7  # tasks, parameters (neither 1: alpha [1] fits neither [] nor [P])


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def labels(b: int, s: int, c: int) -> torch.Tensor:
    """[b, s] int64, every class of [0, c) present when s >= c."""
    return (torch.arange(s) % max(c, 1)).repeat(b, 1)


@dataclasses.dataclass
class Kernel:
    """make(**sizes) -> valid arguments; shapes(**sizes) -> the outputs' shapes (None:
    not a tensor); bad: label -> (a function of valid args returning bad ones);
    any_dim: positions of tensors of any number of dimensions; empty: size overrides
    that make a zero-size call."""

    make: Callable[..., list]
    shapes: Callable[..., list]
    bad: dict[str, Callable[[list], list]] = dataclasses.field(default_factory=dict)
    any_dim: tuple[int, ...] = ()
    empty: list[dict] = dataclasses.field(default_factory=list)


def put(i: int, value: Callable[[list], object]) -> Callable[[list], list]:
    """A change that replaces argument i by value(args)."""

    def change(args):
        args = list(args)
        args[i] = value(args)
        return args

    return change


# ---------------------------------------------------------------- ProtoNet kernels


def pair(b=B, m=M, c=C, d=D):
    return [randn(b, m, d), randn(b, c, d)]


PAIR_BAD = {
    "prototypes with another B": put(1, lambda a: randn(B + 1, C, D)),
    "prototypes with another D": put(1, lambda a: randn(B, C, D + 1)),
}
PAIR_EMPTY = [dict(b=0), dict(m=0), dict(c=0), dict(d=0)]


def cross_entropy(b=B, m=M, c=C, d=D, distance=0):
    """The forward's arguments; the distance (csrc/protonet.h: 0 squared Euclidean, 1
    Euclidean, 2 cosine) last."""
    return [*pair(b, m, c, d), labels(b, m, c), torch.tensor(0.5), distance]


def cross_entropy_backward(b=B, m=M, c=C, d=D, distance=0):
    args = cross_entropy(b, m, c, d, distance)
    losses, _, softmax = torch.ops.fastmeta_C.prototypical_cross_entropy_forward(*args)
    return [torch.rand_like(losses), *args[:4], softmax, distance]


def ce_shapes(b=B, m=M, c=C, d=D, distance=0):
    return [(b, m), (b, m), (b, m, c)]


def ce_backward_shapes(b=B, m=M, c=C, d=D, distance=0):
    return [(b, m, d), (b, c, d), ()]


CE_BAD = {
    "labels float": put(2, lambda a: a[2].float()),
    "labels int32": put(2, lambda a: a[2].int()),
    "labels [B, M + 1]": put(2, lambda a: labels(B, M + 1, C)),
    "labels [B + 1, M]": put(2, lambda a: labels(B + 1, M, C)),
    "tau [1]": put(3, lambda a: a[3].reshape(1)),
    "tau [B]": put(3, lambda a: a[3].expand(B).contiguous()),
    **PAIR_BAD,
}
DISTANCE_BAD = {"distance 3": put(-1, lambda a: 3), "distance -1": put(-1, lambda a: -1)}
CE_EMPTY = [
    *(dict(distance=k) | e for k in range(3) for e in (dict(b=0), dict(m=0), dict(d=0))),
    dict(m=0, c=0),
]


def shifted(bad: dict, by: int) -> dict:
    """The changes of `bad` for arguments that sit `by` places later."""

    def moved(change):
        return lambda args: args[:by] + change(args[by:])

    return {label: moved(change) for label, change in bad.items()}


# ---------------------------------------------------------------- inner update

ALPHAS = {"scalar": lambda t, p: torch.tensor(0.1), "[P]": lambda t, p: randn(p)}
ALPHAS["[T, P]"] = lambda t, p: randn(t, p)


def inner_update(t=T, p=P, alpha="[P]"):
    return [randn(p), ALPHAS[alpha](t, p), randn(t, p)]


def inner_update_backward(t=T, p=P, alpha="[P]", need_g=True, need_alpha=True):
    return [randn(t, p), ALPHAS[alpha](t, p), randn(t, p), need_g, need_alpha]


ALPHA_BAD = {
    "alpha [P + 1]": put(1, lambda a: randn(P + 1)),
    "alpha [1]": put(1, lambda a: randn(1)),
    "alpha [T + 1, P]": put(1, lambda a: randn(T + 1, P)),
    "alpha [1, P]": put(1, lambda a: randn(1, P)),
    "g [T, P + 1]": put(2, lambda a: randn(T, P + 1)),
}
UPDATE_EMPTY = [
    dict(t=0),
    dict(p=0),
    dict(t=0, alpha="scalar"),
    dict(p=0, alpha="scalar"),
    dict(t=0, alpha="[T, P]"),
]


def update_backward_shapes(t=T, p=P, alpha="[P]", need_g=True, need_alpha=True):
    alpha_shape = tuple(ALPHAS[alpha](t, p).shape)
    return [(p,), (t, p) if need_g else (0,), alpha_shape if need_alpha else (0,)]


# ---------------------------------------------------------------- Meta Networks


H = 4  # hidden units of the gradient MLP


def mlp(h=H):
    return [randn(h, 2), randn(h), randn(h), torch.tensor(0.3)]


def gradient_mlp(shape=(3, 5), h=H):
    return [randn(*shape), *mlp(h), 10.0]


def gradient_mlp_backward(shape=(3, 5), h=H, need_grads=True):
    return [randn(*shape), randn(*shape), *mlp(h)[:3], 10.0, need_grads]


def gradient_mlp_backward_shapes(shape=(3, 5), h=H, need_grads=True):
    return [shape if need_grads else (0,), (h, 2), (h,), (h,), ()]


MLP_BAD = {
    "w1 [H, 3]": put(1, lambda a: randn(H, 3)),
    "w1 0-d": put(1, lambda a: torch.tensor(1.0)),
    "b1 [H + 1]": put(2, lambda a: randn(H + 1)),
    "w2 [H + 1]": put(3, lambda a: randn(H + 1)),
}


def lstm(h=H):
    """w_ih [4H, 2], w_hh [4H, H], b [4H], w_out [H], b_out []."""
    return [randn(4 * h, 2), randn(4 * h, h), randn(4 * h), randn(h), torch.tensor(0.3)]


def gradient_lstm(b=2, n=3, q=5, h=H):
    return [randn(b, n, q), *lstm(h), 10.0]


def gradient_lstm_backward(b=2, n=3, q=5, h=H, need_grads=True):
    return [randn(b, q), randn(b, n, q), *lstm(h)[:4], 10.0, need_grads]


def gradient_lstm_backward_shapes(b=2, n=3, q=5, h=H, need_grads=True):
    return [(b, n, q) if need_grads else (0,), (4 * h, 2), (4 * h, h), (4 * h,), (h,), ()]


LSTM_BAD = {
    "grads [5]": put(0, lambda a: randn(5)),
    "w_ih [4H, 3]": put(1, lambda a: randn(4 * H, 3)),
    "w_ih [4H + 1, 2]": put(1, lambda a: randn(4 * H + 1, 2)),
    "w_hh [4H, H + 1]": put(2, lambda a: randn(4 * H, H + 1)),
    "w_hh [4H + 1, H]": put(2, lambda a: randn(4 * H + 1, H)),
    "b [4H + 1]": put(3, lambda a: randn(4 * H + 1)),
    "w_out [H + 1]": put(4, lambda a: randn(H + 1)),
}
LSTM_EMPTY = [dict(b=0), dict(n=0), dict(q=0), dict(h=0)]


def attention(b=2, m=3, n=4, o=5, k=6, l=2):
    return [torch.rand(b, m, n), randn(b, n, o, k), randn(b, m, l, k)]


def attention_backward(b=2, m=3, n=4, o=5, k=6, l=2):
    return [randn(b, m, l, o), *attention(b, m, n, o, k, l), True, True, True]


ATTENTION_BAD = {
    "w with another B": put(1, lambda a: randn(3, 4, 5, 6)),
    "w with another N": put(1, lambda a: randn(2, 5, 5, 6)),
    "x with another B": put(2, lambda a: randn(3, 3, 2, 6)),
    "x with another M": put(2, lambda a: randn(2, 4, 2, 6)),
    "x with another K": put(2, lambda a: randn(2, 3, 2, 7)),
}
ATTENTION_EMPTY = [dict(b=0), dict(m=0), dict(n=0), dict(o=0), dict(k=0), dict(l=0)]


# ---------------------------------------------------------------- conv4 blocks


def bn_relu_pool(n=2, c=3, h=6, w=5):
    return [randn(n, c, h, w), randn(c), randn(c), 1e-5]


def bn_relu_pool_backward(n=2, c=3, h=6, w=5):
    args = bn_relu_pool(n, c, h, w)
    out, mean, rstd, window = torch.ops.fastmeta_C.bn_relu_pool_forward(*args)
    return [torch.randn_like(out), *args[:3], mean, rstd, window]


def conv_block(n=2, cin=2, c=3, h=6, w=5, kh=3, kw=3, pad=1):
    x, weight = randn(n, cin, h, w), randn(c, cin, kh, kw)
    return [x, weight, randn(c), randn(c), randn(c), pad, pad, 1e-5]


def conv_block_backward(need_x=True, **sizes):
    args = conv_block(**sizes)
    out, mean, rstd, window, c_max = torch.ops.fastmeta_C.conv_block_forward(*args)
    return [torch.randn_like(out), *args[:5], mean, rstd, window, c_max, *args[5:7], need_x]


def conv_shapes(n=2, cin=2, c=3, h=6, w=5, kh=3, kw=3, pad=1):
    pooled = (n, c, (h + 2 * pad - kh + 1) // 2, (w + 2 * pad - kw + 1) // 2)
    return [pooled, (c,), (c,), pooled, pooled]


def conv_backward_shapes(need_x=True, **sizes):
    s = dict(n=2, cin=2, c=3, h=6, w=5, kh=3, kw=3) | sizes
    x = (s["n"], s["cin"], s["h"], s["w"])
    return [x if need_x else (0,), (s["c"], s["cin"], s["kh"], s["kw"]), *[(s["c"],)] * 3]


CONV_EMPTY = [dict(n=0), dict(c=0)]


def bad_window(args):
    """A window position of 4 in the last window: it read (and could write) the row past
    the last plane of c (and d_c), out of bounds (ASan: heap-buffer-overflow)."""
    args = list(args)
    args[6] = args[6].clone()
    args[6][-1, -1, -1, -1] = 4
    return args


# ---------------------------------------------------------------- the table

KERNELS = {
    "squared_distances_forward": Kernel(
        pair, lambda b=B, m=M, c=C, d=D: [(b, m, c)], PAIR_BAD, empty=PAIR_EMPTY
    ),
    "cosine_similarities_forward": Kernel(
        lambda **s: [*pair(**s), 1e-8],
        lambda b=B, m=M, c=C, d=D: [(b, m, c)],
        PAIR_BAD,
        empty=PAIR_EMPTY,
    ),
    "class_prototypes_forward": Kernel(
        lambda b=B, s=S, c=C, d=D: [randn(b, s, d), labels(b, s, c), c],
        lambda b=B, s=S, c=C, d=D: [(b, c, d)],
        {
            "labels float": put(1, lambda a: a[1].float()),
            "labels [B, S + 1]": put(1, lambda a: labels(B, S + 1, C)),
            "labels [B + 1, S]": put(1, lambda a: labels(B + 1, S, C)),
            "num_classes -1": put(2, lambda a: -1),
            "num_classes > S": put(2, lambda a: S + 1),
            "num_classes 2**62": put(2, lambda a: 2**62),
        },
        empty=[dict(b=0), dict(d=0), dict(s=0, c=0), dict(b=0, s=0)],
    ),
    "class_prototypes_backward": Kernel(
        lambda b=B, s=S, c=C, d=D: [randn(b, c, d), labels(b, s, c)],
        lambda b=B, s=S, c=C, d=D: [(b, s, d)],
        {
            "labels float": put(1, lambda a: a[1].float()),
            "labels [B + 1, S]": put(1, lambda a: labels(B + 1, S, C)),
            "C > S": put(0, lambda a: randn(B, S + 1, D)),
            "labels 1-d": put(1, lambda a: a[1][0]),
        },
        empty=[dict(b=0), dict(d=0), dict(s=0, c=0)],
    ),
    "prototypical_cross_entropy_forward": Kernel(
        cross_entropy,
        ce_shapes,
        {**CE_BAD, **DISTANCE_BAD},
        empty=CE_EMPTY,
    ),
    "prototypical_cross_entropy_backward": Kernel(
        cross_entropy_backward,
        ce_backward_shapes,
        {
            **shifted(CE_BAD, 1),
            **DISTANCE_BAD,
            "grad_losses [B, M + 1]": put(0, lambda a: randn(B, M + 1)),
            "softmax [B, M, C + 1]": put(5, lambda a: randn(B, M, C + 1)),
            "softmax [B, M + 1, C]": put(5, lambda a: randn(B, M + 1, C)),
        },
        empty=CE_EMPTY,
    ),
    "inner_update_forward": Kernel(
        inner_update,
        lambda t=T, p=P, alpha="[P]": [(t, p)],
        {**ALPHA_BAD, "theta [P + 1]": put(0, lambda a: randn(P + 1))},
        empty=UPDATE_EMPTY,
    ),
    "inner_update_backward": Kernel(
        inner_update_backward,
        update_backward_shapes,
        {**ALPHA_BAD, "grad_out [T, P + 1]": put(0, lambda a: randn(T, P + 1))},
        empty=[
            *UPDATE_EMPTY,
            dict(p=0, alpha="scalar", need_g=False),
            dict(t=0, need_alpha=False),
        ],
    ),
    "gradient_mlp_forward": Kernel(
        gradient_mlp,
        lambda shape=(3, 5), h=H: [shape],
        {
            **MLP_BAD,
            "b2 [1]": put(4, lambda a: a[4].reshape(1)),
            "p 0": put(5, lambda a: 0.0),
            "p nan": put(5, lambda a: float("nan")),
        },
        any_dim=(0,),  # grads
        empty=[dict(shape=(0,)), dict(shape=(3, 0)), dict(h=0)],
    ),
    "gradient_mlp_backward": Kernel(
        gradient_mlp_backward,
        gradient_mlp_backward_shapes,
        {
            **shifted(MLP_BAD, 1),
            "grad_out [3, 6]": put(0, lambda a: randn(3, 6)),
            "grad_out [15]": put(0, lambda a: randn(15)),
        },
        empty=[dict(shape=(0,)), dict(shape=(3, 0), need_grads=False), dict(h=0)],
    ),
    "gradient_lstm_forward": Kernel(
        gradient_lstm,
        lambda b=2, n=3, q=5, h=H: [(b, q)],
        {
            **LSTM_BAD,
            "b_out [1]": put(5, lambda a: a[5].reshape(1)),
            "p 0": put(6, lambda a: 0.0),
            "p nan": put(6, lambda a: float("nan")),
        },
        any_dim=(0,),  # grads
        empty=LSTM_EMPTY,
    ),
    "gradient_lstm_backward": Kernel(
        gradient_lstm_backward,
        gradient_lstm_backward_shapes,
        {
            **shifted(LSTM_BAD, 1),
            "grad_out [2, 6]": put(0, lambda a: randn(2, 6)),
            "grad_out [2, 3, 5]": put(0, lambda a: randn(2, 3, 5)),
        },
        any_dim=(0, 1),  # grad_out, grads
        empty=[*LSTM_EMPTY, dict(q=0, need_grads=False)],
    ),
    "attention_read_forward": Kernel(
        attention,
        lambda b=2, m=3, n=4, o=5, k=6, l=2: [(b, m, l, o)],
        ATTENTION_BAD,
        empty=ATTENTION_EMPTY,
    ),
    "attention_read_backward": Kernel(
        attention_backward,
        lambda b=2, m=3, n=4, o=5, k=6, l=2: [(b, m, n), (b, n, o, k), (b, m, l, k)],
        {**shifted(ATTENTION_BAD, 1), "grad_out [2, 3, 2, 6]": put(0, lambda a: randn(2, 3, 2, 6))},
        empty=ATTENTION_EMPTY,
    ),
    "bn_relu_pool_forward": Kernel(
        bn_relu_pool,
        lambda n=2, c=3, h=6, w=5: [(n, c, h // 2, w // 2), (c,), (c,), (n, c, h // 2, w // 2)],
        {
            "c [2, 3, 1, 5]": put(0, lambda a: randn(2, 3, 1, 5)),
            "gamma [C + 1]": put(1, lambda a: randn(4)),
            "beta [C + 1]": put(2, lambda a: randn(4)),
        },
        empty=[dict(n=0), dict(c=0), dict(n=0, c=0)],
    ),
    "bn_relu_pool_backward": Kernel(
        bn_relu_pool_backward,
        lambda n=2, c=3, h=6, w=5: [(n, c, h, w), (c,), (c,)],
        {
            "grad_out [2, 3, 3, 3]": put(0, lambda a: randn(2, 3, 3, 3)),
            "mean [C + 1]": put(4, lambda a: randn(4)),
            "rstd [C + 1]": put(5, lambda a: randn(4)),
            "window [2, 3, 3, 3]": put(6, lambda a: torch.zeros(2, 3, 3, 3, dtype=torch.uint8)),
            "a window value of 4": bad_window,
        },
        empty=[dict(n=0), dict(c=0)],
    ),
    "conv_block_forward": Kernel(
        conv_block,
        conv_shapes,
        {
            "weight with another Cin": put(1, lambda a: randn(3, 3, 3, 3)),
            "bias [C + 1]": put(2, lambda a: randn(4)),
            "gamma [C + 1]": put(3, lambda a: randn(4)),
            "beta [C + 1]": put(4, lambda a: randn(4)),
            "pad_h -1": put(5, lambda a: -1),
            "pad_w 2**62": put(6, lambda a: 2**62),
            "a 1x1 convolution output": lambda a: conv_block(h=2, w=2, pad=0),
            "x with H = 0": lambda a: conv_block(h=0),
            "x with Cin = 0": lambda a: conv_block(cin=0),
            "weight with KW = 0": lambda a: conv_block(kw=0),
        },
        empty=CONV_EMPTY,
    ),
    "conv_block_backward": Kernel(
        conv_block_backward,
        conv_backward_shapes,
        {
            "grad_out [2, 3, 3, 3]": put(0, lambda a: randn(2, 3, 3, 3)),
            "weight with another Cin": put(2, lambda a: randn(3, 3, 3, 3)),
            "mean [C + 1]": put(6, lambda a: randn(4)),
            "rstd [C + 1]": put(7, lambda a: randn(4)),
            "window [2, 3, 3, 3]": put(8, lambda a: torch.zeros(2, 3, 3, 3, dtype=torch.uint8)),
            "c_max [2, 3, 3, 3]": put(9, lambda a: randn(2, 3, 3, 3)),
            "pad_h 0": put(10, lambda a: 0),
        },
        empty=[
            *CONV_EMPTY,
            *(dict(need_x=False) | e for e in CONV_EMPTY),
        ],
    ),
    "empty_cpu_pool": Kernel(lambda: [], lambda: [None]),
}


def registered_kernels() -> list[str]:
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::")[1] for n in names if n.startswith("fastmeta_C::"))


def kernel(name: str):
    return getattr(torch.ops.fastmeta_C, name).default


def as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_shapes(out, shapes: list) -> None:
    got = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in as_list(out)]
    assert got == [None if s is None else tuple(s) for s in shapes]


def tensor_positions(args: list) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def run_bad(name: str, args: list, match: str | None = None) -> None:
    """The kernel raises a RuntimeError that names it (and matches `match`)."""
    with pytest.raises(RuntimeError, match=match) as raised:
        kernel(name)(*args)
    assert str(raised.value).startswith(f"{name}: "), str(raised.value)


def positions(which: Callable = lambda name, i, t: True) -> list:
    """(name, i) for the tensor arguments args[i] of every kernel for which
    which(name, i, args[i]) holds (none when fastmeta._C is not built)."""
    if not COMPILED:
        return []
    out = []
    for name in sorted(KERNELS):
        args = KERNELS[name].make()
        for i in tensor_positions(args):
            if which(name, i, args[i]):
                out.append(pytest.param(name, i, id=f"{name}-{i}"))
    return out


def test_every_kernel_has_a_case():
    assert registered_kernels() == sorted(KERNELS)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_valid_call_succeeds(name):
    spec = KERNELS[name]
    assert_shapes(kernel(name)(*spec.make()), spec.shapes())


@pytest.mark.parametrize(
    "name,label", [(n, label) for n in sorted(KERNELS) for label in KERNELS[n].bad]
)
def test_bad_sizes_and_scalars_are_refused(name, label):
    args = KERNELS[name].bad[label](KERNELS[name].make())
    run_bad(name, args)


@pytest.mark.parametrize("name,i", positions(lambda name, i, t: i not in KERNELS[name].any_dim))
def test_a_tensor_with_an_extra_dimension_is_refused(name, i):
    args = put(i, lambda a: a[i].unsqueeze(0))(KERNELS[name].make())
    run_bad(name, args, match=r"must be a contiguous|must be \[")


@pytest.mark.parametrize("name,i", positions())
def test_a_tensor_of_another_dtype_is_refused(name, i):
    """Floating tensors as int32, int64 labels as float, the uint8 window as float."""
    args = KERNELS[name].make()
    other = torch.int32 if args[i].is_floating_point() else torch.float32
    run_bad(name, put(i, lambda a: a[i].to(other))(args), match="must be a contiguous")


def floating_among_others(name: str, i: int, t: torch.Tensor) -> bool:
    floating = [a for a in KERNELS[name].make() if isinstance(a, torch.Tensor)]
    return t.is_floating_point() and sum(a.is_floating_point() for a in floating) > 1


@pytest.mark.parametrize("name,i", positions(floating_among_others))
def test_mixed_floating_dtypes_are_refused(name, i):
    """One floating argument in float64, the others in float32."""
    args = put(i, lambda a: a[i].double())(KERNELS[name].make())
    run_bad(name, args, match="must have the dtype of")


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t's values and shape in memory that is not contiguous (transposed where it can)."""
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("name,i", positions(lambda name, i, t: t.numel() > 1))
def test_a_non_contiguous_tensor_is_refused(name, i):
    args = put(i, lambda a: non_contiguous(a[i]))(KERNELS[name].make())
    assert not args[i].is_contiguous()
    run_bad(name, args, match="non-contiguous")


def cpu_kernel(name: str, args: list):
    """The CPU kernel itself, whatever the arguments' devices."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return kernel(name).redispatch(keys, *args)


@pytest.mark.parametrize("name,i", positions())
def test_an_argument_on_another_device_is_refused(name, i):
    args = put(i, lambda a: a[i].to("meta"))(KERNELS[name].make())
    with pytest.raises(RuntimeError):  # the dispatcher: no Meta kernel
        kernel(name)(*args)
    with pytest.raises(RuntimeError, match=rf"{name}: .*(must be on the device|runs on cpu)"):
        cpu_kernel(name, args)


@pytest.mark.parametrize("name", sorted(set(p.values[0] for p in positions())))
def test_a_cpu_kernel_refuses_meta_tensors(name):
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in KERNELS[name].make()]
    if name.startswith("attention_read"):  # device-generic (ATen ops): runs on meta
        assert_shapes(cpu_kernel(name, args), KERNELS[name].shapes())
        return
    with pytest.raises(RuntimeError, match=rf"{name}: this kernel runs on cpu tensors"):
        cpu_kernel(name, args)


def has_cuda_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmeta_C::{name}", "CUDA")


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.WITH_CUDA), reason="needs the CUDA kernels"
)
@pytest.mark.parametrize("name,i", positions())
def test_a_cuda_kernel_refuses_a_cpu_argument(name, i):
    if not has_cuda_kernel(name):
        pytest.skip("no CUDA kernel")
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in KERNELS[name].make()]
    assert_shapes(kernel(name)(*args), KERNELS[name].shapes())
    args[i] = args[i].cpu()
    with pytest.raises(RuntimeError, match=rf"{name}: .*(must be on the device|runs on cuda)"):
        kernel(name)(*args)
    torch.cuda.synchronize()


@pytest.mark.parametrize(
    "name,sizes",
    [
        pytest.param(n, s, id=f"{n}-{'-'.join(f'{k}={v}' for k, v in s.items())}")
        for n in sorted(KERNELS)
        for s in KERNELS[n].empty
    ],
)
def test_zero_size_extents_give_outputs_of_the_right_shapes(name, sizes):
    spec = KERNELS[name]
    out = kernel(name)(*spec.make(**sizes))
    assert_shapes(out, spec.shapes(**sizes))
    for t in as_list(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0:
            # what is left is a sum over nothing (zero) or statistics of nothing (NaN)
            assert torch.isfinite(t).all() or torch.isnan(t).all(), name


@pytest.mark.parametrize("distance", [1, 2])
def test_the_other_distances_give_outputs_of_the_right_shapes(distance):
    """The euclidean (1) and cosine (2) distances of the cross-entropy kernels (the table
    calls them with the default, 0)."""
    for name, shapes in (
        ("prototypical_cross_entropy_forward", ce_shapes),
        ("prototypical_cross_entropy_backward", ce_backward_shapes),
    ):
        out = kernel(name)(*KERNELS[name].make(distance=distance))
        assert_shapes(out, shapes())
        assert all(torch.isfinite(t).all() for t in out)
