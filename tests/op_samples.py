"""Every public fastmeta op declared once for the conformance suite (test_conformance.py):
sample inputs of odd sizes, a float64 oracle in plain differentiable PyTorch, the
outputs and arguments that carry gradients, the second-derivative policy, and bad
inputs with the error each must raise.

An OpSample's `make(device, dtype, small)` returns the arguments of
torch.ops.fastmeta.<name> (fresh random values each call); `small` gives sizes that
gradcheck can afford. An op may have several samples (the ProtoNet ops, one per
distance), told apart by their `variant`.
"""

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from fastmeta.ops import declaration
from fastmeta.ops.gradient_lstm import gradient_lstm_forward_reference
from fastmeta.ops.gradient_mlp import gradient_mlp_forward_reference


@dataclasses.dataclass
class BadInput:
    """`change(args)` returns args made wrong; the op must raise `error` matching `match`."""

    label: str
    change: Callable[[list], list]
    error: type
    match: str


@dataclasses.dataclass
class OpSample:
    name: str  # torch.ops.fastmeta.<name>
    make: Callable[[str, torch.dtype, bool], list]
    oracle: Callable  # args (float64) -> the outputs listed in `outputs`, in order
    outputs: tuple[int, ...]  # positions of the op's differentiable outputs (() = a Tensor)
    grad_args: tuple[int, ...]  # positions of the arguments that get gradients
    differentiable: str  # declaration.ANY_ORDER or declaration.ONCE
    bad: list[BadInput]
    backends_of: str = ""  # the declared op whose backends run it (default: name)
    variant: str = ""  # which of the op's samples (e.g. its distance argument)
    # positions of scalar arguments whose gradient sums terms of every output element
    # that cancel (tau: sum(G f) with sum_k G = 0 per row, for random cotangents): its
    # rounding error follows the terms, not the sum, so it is measured against the
    # largest gradient when that is larger than its own
    cancelling: tuple[int, ...] = ()

    @property
    def declared(self) -> str:
        return self.backends_of or self.name

    @property
    def id(self) -> str:
        return f"{self.name}[{self.variant}]" if self.variant else self.name


def _labels(B: int, S: int, C: int, device) -> torch.Tensor:
    """[B, S] int64 labels, each class at least once, shuffled per episode."""
    rows = [
        torch.cat((torch.arange(C), torch.randint(0, C, (S - C,))))[torch.randperm(S)]
        for _ in range(B)
    ]
    return torch.stack(rows).to(device)


def _randn(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


# ---------------------------------------------------------------- ProtoNet ops


def _squared_distances(q, c):
    return ((q[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)


def _prototypes(support, labels, C):
    onehot = F.one_hot(labels, C).to(support.dtype)  # [B, S, C]
    return onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]


DISTANCES = ("squared_euclidean", "euclidean", "cosine")


def _logits(queries, prototypes, tau, distance="squared_euclidean"):
    """The ProtoNet logits of each distance, written directly."""
    if distance == "euclidean":
        return -tau * (queries[:, :, None] - prototypes[:, None]).norm(dim=-1)
    if distance == "cosine":
        return tau * F.cosine_similarity(queries[:, :, None], prototypes[:, None], dim=-1, eps=1e-8)
    return -tau * _squared_distances(queries, prototypes)


def _cross_entropy(queries, prototypes, labels, tau, distance="squared_euclidean"):
    log_probs = torch.log_softmax(_logits(queries, prototypes, tau, distance), -1)
    return -log_probs.gather(-1, labels[..., None]).squeeze(-1)


def make_squared_distances(device, dtype, small):
    B, M, C, D = (2, 3, 2, 4) if small else (3, 13, 5, 33)
    return [
        _randn(B, M, D, device=device, dtype=dtype),
        _randn(B, C, D, device=device, dtype=dtype),
    ]


def _cosine_similarities(q, c, eps):
    q_hat = q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
    c_hat = c / c.norm(dim=-1, keepdim=True).clamp_min(eps)
    return q_hat @ c_hat.transpose(1, 2)


def make_cosine_similarities(device, dtype, small):
    return [*make_squared_distances(device, dtype, small), 1e-8]


def make_class_prototypes(device, dtype, small):
    B, S, C, D = (2, 5, 3, 4) if small else (3, 17, 5, 33)
    return [_randn(B, S, D, device=device, dtype=dtype), _labels(B, S, C, device), C]


def make_prototypical_cross_entropy(device, dtype, small):
    B, M, C, D = (2, 3, 2, 4) if small else (3, 13, 5, 33)
    return [
        _randn(B, M, D, device=device, dtype=dtype),
        _randn(B, C, D, device=device, dtype=dtype),
        torch.randint(0, C, (B, M), device=device),
        torch.tensor(0.3, device=device, dtype=dtype),
    ]


def make_prototypical_loss(device, dtype, small):
    B, S, M, C, D = (2, 5, 3, 3, 4) if small else (3, 17, 13, 5, 33)
    return [
        _randn(B, S, D, device=device, dtype=dtype),
        _labels(B, S, C, device),
        _randn(B, M, D, device=device, dtype=dtype),
        torch.randint(0, C, (B, M), device=device),
        C,
        torch.tensor(0.3, device=device, dtype=dtype),
    ]


def _with_distance(make, distance):
    """make, with the distance argument appended."""
    return lambda device, dtype, small: [*make(device, dtype, small), distance]


DISTANCE_BAD = [  # the distance argument appended to the op's valid arguments
    BadInput(
        "unknown distance",
        lambda a: [*a, "manhattan"],
        ValueError,
        r"distance must be one of \('squared_euclidean', 'euclidean', 'cosine'\), got 'manhattan'",
    ),
    BadInput(  # the op's schema refuses it (the Python entries: a TypeError)
        "distance not a str",
        lambda a: [*a, 2],
        RuntimeError,
        "Expected a value of type 'str' for argument 'distance'",
    ),
]


def _with_labels(args, position, value):
    args[position] = torch.full_like(args[position], value)
    return args


EPISODE_PAIR_BAD = [
    BadInput(
        "different D", lambda a: [a[0], a[1][..., :-1], *a[2:]], ValueError, "embedding sizes D"
    ),
    BadInput(
        "integer queries",
        lambda a: [a[0].long(), *a[1:]],
        TypeError,
        "queries must be a floating-point tensor",
    ),
    BadInput(
        "2-D prototypes",
        lambda a: [a[0], a[1][0], *a[2:]],
        ValueError,
        r"prototypes must be \[B, N, D\]",
    ),
]

# ---------------------------------------------------------------- MAML / Meta Networks ops


def make_inner_update(device, dtype, small):
    T, P = (2, 5) if small else (3, 1001)
    return [
        _randn(P, device=device, dtype=dtype),
        torch.rand(P, device=device, dtype=dtype) * 0.5 + 0.05,
        _randn(T, P, device=device, dtype=dtype),
    ]


def make_gradient_mlp(device, dtype, small):
    shape, H = ((2, 3), 4) if small else ((3, 101), 7)
    magnitude = 10 ** torch.empty(shape).uniform_(-3, 1)  # away from the e^-p kink
    grads = (torch.randn(shape).sign() * magnitude).to(device=device, dtype=dtype)
    return [
        grads,
        _randn(H, 2, device=device, dtype=dtype),
        _randn(H, device=device, dtype=dtype),
        _randn(H, device=device, dtype=dtype),
        _randn((), device=device, dtype=dtype),
        10.0,
    ]


def make_gradient_lstm(device, dtype, small):
    (B, N, Q), H = ((2, 2, 3), 2) if small else ((3, 5, 37), 7)
    magnitude = 10 ** torch.empty(B, N, Q).uniform_(-3, 1)  # away from the e^-p kink
    grads = (torch.randn(B, N, Q).sign() * magnitude).to(device=device, dtype=dtype)
    return [
        grads,
        _randn(4 * H, 2, device=device, dtype=dtype),
        _randn(4 * H, H, device=device, dtype=dtype) / H**0.5,
        _randn(4 * H, device=device, dtype=dtype),
        _randn(H, device=device, dtype=dtype),
        _randn((), device=device, dtype=dtype),
        10.0,
    ]


def make_attention_read(device, dtype, small):
    B, M, N, O, K, L = (1, 2, 3, 2, 3, 2) if small else (2, 5, 7, 9, 11, 3)
    return [
        torch.softmax(_randn(B, M, N, device=device, dtype=dtype), -1),
        _randn(B, N, O, K, device=device, dtype=dtype),
        _randn(B, M, L, K, device=device, dtype=dtype),
    ]


def _bn_relu_pool(c, gamma, beta, eps):
    y = F.batch_norm(c, None, None, gamma, beta, training=True, eps=eps)
    return F.max_pool2d(torch.relu(y), 2)


def make_conv_block(device, dtype, small):
    N, Cin, H, W, C = (2, 1, 4, 5, 2) if small else (3, 2, 11, 9, 5)
    return [
        _randn(N, Cin, H, W, device=device, dtype=dtype),
        _randn(C, Cin, 3, 3, device=device, dtype=dtype),
        *(_randn(C, device=device, dtype=dtype) for _ in range(3)),
        [1, 1],
        1e-5,
    ]


def make_bn_relu_pool(device, dtype, small):
    N, C, H, W = (2, 2, 4, 5) if small else (3, 5, 11, 9)
    return [
        _randn(N, C, H, W, device=device, dtype=dtype),
        *(_randn(C, device=device, dtype=dtype) for _ in range(2)),
        1e-5,
    ]


SAMPLES = [
    OpSample(
        "squared_distances",
        make_squared_distances,
        _squared_distances,
        (),
        (0, 1),
        declaration.ANY_ORDER,
        EPISODE_PAIR_BAD,
    ),
    OpSample(
        "cosine_similarities",
        make_cosine_similarities,
        _cosine_similarities,
        (),
        (0, 1),
        declaration.ANY_ORDER,
        EPISODE_PAIR_BAD
        + [
            BadInput(
                "eps", lambda a: [a[0], a[1], 0.0], ValueError, "eps must be a positive number"
            ),
        ],
    ),
    OpSample(
        "class_prototypes",
        make_class_prototypes,
        lambda s, y, C: _prototypes(s, y, C),
        (),
        (0,),
        declaration.ANY_ORDER,
        [
            BadInput(
                "label out of range",
                lambda a: _with_labels(a, 1, a[2]),
                ValueError,
                r"labels holds 5 .* outside \[0, num_classes=5\)",
            ),
            BadInput(
                "empty class",
                lambda a: _with_labels(a, 1, 0),
                ValueError,
                "class 1 of episode 0 has no support example in labels",
            ),
            BadInput(
                "float labels",
                lambda a: [a[0], a[1].double(), a[2]],
                TypeError,
                "labels must be an integer tensor",
            ),
            BadInput(
                "labels shape",
                lambda a: [a[0], a[1][:, :-1], a[2]],
                ValueError,
                r"labels must have shape \[3, 17\]",
            ),
        ],
    ),
    OpSample(
        "prototypical_cross_entropy",
        make_prototypical_cross_entropy,
        lambda q, c, y, t: _cross_entropy(q, c, y, t),
        (0,),
        (0, 1, 3),
        declaration.ANY_ORDER,
        EPISODE_PAIR_BAD
        + DISTANCE_BAD
        + [
            BadInput(
                "label out of range",
                lambda a: _with_labels(a, 2, -1),
                ValueError,
                "query_labels holds -1",
            ),
            BadInput(
                "tau not a scalar",
                lambda a: [*a[:3], a[3].expand(2)],
                ValueError,
                "tau must be a scalar",
            ),
        ],
        cancelling=(3,),
    ),
    OpSample(
        "prototypical_loss",
        make_prototypical_loss,
        lambda s, ys, q, yq, C, t: _cross_entropy(q, _prototypes(s, ys, C), yq, t),
        (0,),
        (0, 2, 5),
        declaration.ANY_ORDER,
        DISTANCE_BAD
        + [
            BadInput(
                "empty class",
                lambda a: _with_labels(a, 1, 2),
                ValueError,
                "has no support example in support_labels",
            ),
            BadInput(
                "query label out of range",
                lambda a: _with_labels(a, 3, 5),
                ValueError,
                "query_labels holds 5",
            ),
            BadInput(
                "different D",
                lambda a: [a[0], a[1], a[2][..., :-1], *a[3:]],
                ValueError,
                "embedding sizes D",
            ),
        ],
        backends_of="prototypical_cross_entropy",
        cancelling=(5,),
    ),
    *(
        OpSample(
            "prototypical_cross_entropy",
            _with_distance(make_prototypical_cross_entropy, distance),
            lambda q, c, y, t, distance: _cross_entropy(q, c, y, t, distance),
            (0,),
            (0, 1, 3),
            declaration.ANY_ORDER,
            [],
            variant=distance,
            cancelling=(3,),
        )
        for distance in DISTANCES[1:]
    ),
    *(
        OpSample(
            "prototypical_loss",
            _with_distance(make_prototypical_loss, distance),
            lambda s, ys, q, yq, C, t, distance: _cross_entropy(
                q, _prototypes(s, ys, C), yq, t, distance
            ),
            (0,),
            (0, 2, 5),
            declaration.ANY_ORDER,
            [],
            backends_of="prototypical_cross_entropy",
            variant=distance,
            cancelling=(5,),
        )
        for distance in DISTANCES[1:]
    ),
    OpSample(
        "inner_update",
        make_inner_update,
        lambda th, a, g: th - a * g,
        (),
        (0, 1, 2),
        declaration.ANY_ORDER,
        [
            BadInput(
                "theta shape",
                lambda a: [a[0][:-1], *a[1:]],
                ValueError,
                r"theta must be \[P\] = \[1001\]",
            ),
            BadInput(
                "alpha shape",
                lambda a: [a[0], a[1][:-1], a[2]],
                ValueError,
                "alpha must be a scalar",
            ),
            BadInput(
                "g dtype",
                lambda a: [*a[:2], a[2].double()],
                TypeError,
                "has dtype torch.float32 but g has torch.float64",
            ),
        ],
    ),
    OpSample(
        "gradient_mlp",
        make_gradient_mlp,
        lambda g, w1, b1, w2, b2, p: gradient_mlp_forward_reference(g, w1, b1, w2, b2, p),
        (),
        (0, 1, 2, 3, 4),
        declaration.ONCE,
        [
            BadInput(
                "w1 shape",
                lambda a: [a[0], a[1][:, :1], *a[2:]],
                ValueError,
                r"w1 must be \[H, 2\]",
            ),
            BadInput("p", lambda a: [*a[:5], -1.0], ValueError, "p must be a positive number"),
        ],
    ),
    OpSample(
        "gradient_lstm",
        make_gradient_lstm,
        gradient_lstm_forward_reference,
        (),
        (0, 1, 2, 3, 4, 5),
        declaration.ONCE,
        [
            BadInput(
                "w_hh shape",
                lambda a: [a[0], a[1], a[2][:, :1], *a[3:]],
                ValueError,
                r"w_hh must be \[4H, H\] with H >= 1",
            ),
            BadInput(
                "grads 1-D",
                lambda a: [a[0][0, 0], *a[1:]],
                ValueError,
                r"grads must be \[B, N, \.\.\.\]",
            ),
            BadInput("p", lambda a: [*a[:6], 0.0], ValueError, "p must be a positive number"),
        ],
    ),
    OpSample(
        "attention_read",
        make_attention_read,
        lambda a, w, x: x @ torch.einsum("bmn,bnok->bmok", a, w).transpose(-1, -2),
        (),
        (0, 1, 2),
        declaration.ONCE,
        [
            BadInput(
                "K disagrees",
                lambda a: [a[0], a[1], a[2][..., :-1]],
                ValueError,
                "B, M, N and K disagree",
            ),
            BadInput(
                "3-D fast_weights",
                lambda a: [a[0], a[1][0], a[2]],
                ValueError,
                r"fast_weights \[B, N, O, K\]",
            ),
        ],
    ),
    OpSample(
        "conv_block",
        make_conv_block,
        lambda x, w, b, g, be, pad, eps: _bn_relu_pool(
            F.conv2d(x, w, b, padding=tuple(pad)), g, be, eps
        ),
        (0,),
        (0, 1, 2, 3, 4),
        declaration.ONCE,
        [
            BadInput(
                "Cin disagrees", lambda a: [a[0][:, :1], *a[1:]], ValueError, "with the same Cin"
            ),
            BadInput(
                "gamma shape",
                lambda a: [*a[:3], a[3][:-1], *a[4:]],
                ValueError,
                r"gamma must be \[C\] = \[5\]",
            ),
            BadInput(
                "too small for the pool",
                lambda a: [a[0][:, :, :2, :2], *a[1:5], [0, 0], a[6]],
                ValueError,
                "the 2x2 pool needs at least 2x2",
            ),
        ],
    ),
    OpSample(
        "bn_relu_pool",
        make_bn_relu_pool,
        _bn_relu_pool,
        (0,),
        (0, 1, 2),
        declaration.ONCE,
        [
            BadInput(
                "1x1 image",
                lambda a: [a[0][:, :, :1, :1], *a[1:]],
                ValueError,
                "H, W >= 2 for the 2x2 pool",
            ),
            BadInput(
                "beta dtype",
                lambda a: [a[0], a[1], a[2].double(), a[3]],
                TypeError,
                "beta has dtype torch.float64",
            ),
        ],
    ),
]
