"""Benchmark: the ProtoNet loss, forward + backward, and a whole training step.

fastmeta.functional.prototypical_loss against what users write today, each
computing prototypes (ProtoNets' view(...).mean), distances, cross-entropy and
the gradients w.r.t. support and query embeddings:
  euclidean_dist   the original ProtoNets code: expand, subtract, pow, sum ([M, C, D])
  cdist            torch.cdist(q, c) ** 2
  matmul           ||q||^2 + ||c||^2 - 2 q c^T (batched, as torchmeta-style code has it)
  compile(matmul)  torch.compile of the matmul version (compile time not counted)
  GEMMs only       the three products the loss needs (Q C^T, G C, G^T Q): the floor
Configs: (a) 32 episodes 5-way 1-shot 15 queries/class D=64; (b) 1 episode 60-way
5-shot 5 queries/class D=1600; (c) 1 episode 1000-way 5-shot 10 queries/class D=512.
The other distances (prototypical_loss(distance=...)), each config again:
  euclidean        fastmeta against torch.cdist(q, c) (logits -tau ||q - c||)
  cosine           fastmeta against normalize + bmm (F.normalize rows, then q^ c^T)
                   and F.cosine_similarity (broadcast to [M, C, D])
Then one training step of a conv4 encoder on 28x28 inputs at (b).
Sweeps (SWEEP, `python -m fastmeta.bench sweep --case protonet`): the loss rows over
episodes, ways, shots, queries and dim.
"""

import torch
import torch.nn.functional as TF

import fastmeta
from fastmeta import backend
from fastmeta.bench.harness import Candidate, Sweepable, run_config, skipped
from fastmeta.fused_blocks import fuse_conv_blocks
from fastmeta.models import conv4

CASE = "protonet"
CONFIGS = {  # name: (episodes B, ways C, shots K, queries per class, D)
    "(a) 32x 5w1s D=64": (32, 5, 1, 15, 64),
    "(b) 60w5s D=1600": (1, 60, 5, 5, 1600),
    "(c) 1000w5s D=512": (1, 1000, 5, 10, 512),
}
QUICK = {"(a) 4x 5w1s D=64": (4, 5, 1, 3, 64), "(c) 50w2s D=32": (1, 50, 2, 2, 32)}
EUCLIDEAN_LIMIT_BYTES = 4 << 30  # skip expand-subtract when [M, C, D] exceeds 4 GiB


def euclidean_dist(q, c):
    """The original ProtoNets distance: builds [B, M, C, D]."""
    return (q.unsqueeze(2) - c.unsqueeze(1)).pow(2).sum(3)


def cdist_sq(q, c):
    return torch.cdist(q, c) ** 2


def matmul_dist(q, c):
    return (
        q.pow(2).sum(-1, keepdim=True) + c.pow(2).sum(-1).unsqueeze(1) - 2 * q @ c.transpose(1, 2)
    )


def cosine_normalize_bmm(q, c):
    unit_q, unit_c = TF.normalize(q, dim=-1, eps=1e-8), TF.normalize(c, dim=-1, eps=1e-8)
    return unit_q @ unit_c.transpose(1, 2)


def cosine_similarity(q, c):
    """torch's cosine_similarity, broadcast: builds [B, M, C, D]."""
    return TF.cosine_similarity(q.unsqueeze(2), c.unsqueeze(1), dim=-1, eps=1e-8)


def _plain_loss(distance, sign=-1.0):
    """The loss of logits sign * distance(queries, prototypes) (a similarity: sign 1)."""

    def loss_fn(support, queries, query_labels, B, C, K):
        prototypes = support.view(B, C, K, -1).mean(2)
        logits = sign * distance(queries, prototypes)
        return TF.cross_entropy(logits.flatten(0, 1), query_labels.flatten())

    return loss_fn


# distance -> its plain-torch alternatives (name, loss, whether it builds [B, M, C, D])
ALTERNATIVES = {
    "euclidean": [("torch.cdist", _plain_loss(torch.cdist), False)],
    "cosine": [
        ("normalize + bmm", _plain_loss(cosine_normalize_bmm, 1.0), False),
        ("F.cosine_similarity", _plain_loss(cosine_similarity, 1.0), True),
    ],
}


def episode(B, C, K, Q, D, device):
    support_labels = torch.arange(C, device=device).repeat_interleave(K).expand(B, -1)
    query_labels = torch.arange(C, device=device).repeat_interleave(Q).expand(B, -1)
    support = torch.randn(B, C * K, D, device=device, requires_grad=True)
    queries = torch.randn(B, C * Q, D, device=device, requires_grad=True)
    return support, support_labels.contiguous(), queries, query_labels.contiguous()


def _fastmeta_backends(device):
    op = "prototypical_cross_entropy"
    names = [
        b
        for b in backend.DEFAULT_PREFERENCE[device]
        if backend.op_unavailable_reason(op, b, device, torch.float32) is None
    ]
    triton_runs = backend.op_unavailable_reason(op, "triton", device, torch.float32) is None
    if device == "cuda" and triton_runs:
        names += [] if "triton" in names else ["triton"]
    return names


def _fastmeta_candidates(device, args, distance="squared_euclidean") -> list[Candidate]:
    """fastmeta's loss and gradients on each backend (on a GPU also the per-shape race,
    the row the ratios refer to) for the episode args (support, ys, queries, yq, C)."""
    support, ys, queries, yq, C = args

    def fastmeta_loss():
        loss, _ = fastmeta.functional.prototypical_loss(
            support, ys, queries, yq, C, distance=distance
        )
        return torch.autograd.grad(loss, (support, queries))

    def fastmeta_fn(name):
        def run():
            with fastmeta.use_backend(name):
                return fastmeta_loss()

        return run

    # On a GPU the default races cuda against triton per shape (fastmeta/race.py): its
    # row is what users get; the forced rows show both contenders.
    auto = device == "cuda"
    rows = [Candidate("fastmeta (per-shape race)", fastmeta_loss, is_fastmeta=True)] if auto else []
    return rows + [
        Candidate(f"fastmeta[{b}]", fastmeta_fn(b), is_fastmeta=(i == 0 and not auto))
        for i, b in enumerate(_fastmeta_backends(device))
    ]


def _broadcast_skip(B, C, Q, D, memory_limit=None) -> str | None:
    """Why a row that builds [B, M, C, D] float32 (M = C * Q queries) is not run, or
    None: the tensor over EUCLIDEAN_LIMIT_BYTES, or the three such tensors its backward
    holds over memory_limit bytes."""
    size = B * C * Q * C * D * 4
    if size > EUCLIDEAN_LIMIT_BYTES:
        return f"[B, M, C, D] is {size / 2**30:.1f} GiB > {EUCLIDEAN_LIMIT_BYTES / 2**30:.0f} GiB"
    if memory_limit is not None and 3 * size > memory_limit:
        return f"3 x [B, M, C, D] = {3 * size / 2**30:.1f} GiB > {memory_limit / 2**30:.1f} GiB"
    return None


def distance_candidates(device, distance, B, C, K, Q, D) -> list[Candidate]:
    """fastmeta's loss with `distance` against its plain-torch alternatives."""
    support, ys, queries, yq = episode(B, C, K, Q, D, device)
    rows = _fastmeta_candidates(device, (support, ys, queries, yq, C), distance)
    for name, loss_fn, broadcast in ALTERNATIVES[distance]:
        reason = _broadcast_skip(B, C, Q, D) if broadcast else None
        if reason is not None:
            rows.append(skipped(name, reason))
            continue

        def run(loss_fn=loss_fn):
            loss = loss_fn(support, queries, yq, B, C, K)
            return torch.autograd.grad(loss, (support, queries))

        rows.append(Candidate(name, run))
    return rows


def loss_candidates(device, B, C, K, Q, D, memory_limit=None) -> list[Candidate]:
    """fastmeta's squared-Euclidean loss against the alternatives of the docstring; the
    [B, M, C, D] one is skipped past _broadcast_skip's limits."""
    support, ys, queries, yq = episode(B, C, K, Q, D, device)
    inputs = (support, queries)

    def plain_fn(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(support, queries, yq, B, C, K), inputs)

    rows = _fastmeta_candidates(device, (support, ys, queries, yq, C))
    reason = _broadcast_skip(B, C, Q, D, memory_limit)
    euclidean = "euclidean_dist (ProtoNets)"
    rows.append(
        skipped(euclidean, reason)
        if reason is not None
        else Candidate(euclidean, plain_fn(_plain_loss(euclidean_dist)))
    )
    rows.append(Candidate("cdist ** 2", plain_fn(_plain_loss(cdist_sq))))
    rows.append(Candidate("matmul", plain_fn(_plain_loss(matmul_dist))))
    compiled = torch.compile(_plain_loss(matmul_dist), dynamic=False)
    rows.append(Candidate("torch.compile(matmul)", plain_fn(compiled)))

    q, c = queries.detach(), support.detach()[:, :C]
    g = torch.randn(B, C * Q, C, device=device)

    def gemms():
        return torch.bmm(q, c.transpose(1, 2)), torch.bmm(g, c), torch.bmm(g.transpose(1, 2), q)

    rows.append(Candidate("GEMMs only (floor)", gemms, comparable=False))
    return rows


def _sizes(point: dict[str, int]) -> tuple[int, int, int, int, int]:
    """(B, C, K, Q, D), as in CONFIGS, of a sweep point."""
    B, C, K, Q, D = (point[axis] for axis in ("episodes", "ways", "shots", "queries", "dim"))
    return B, C, K, Q, D


def _sweep_footprint(point: dict[str, int]) -> int:
    """float32 bytes: the embeddings and a few copies (their gradients), and about
    eight [B, M, C] tensors (distances, logits, softmax, their gradients)."""
    B, C, K, Q, D = _sizes(point)
    return 4 * (4 * B * C * (K + Q) * D + 8 * B * C * Q * C)


SWEEP = Sweepable(
    axes={"episodes": 1, "ways": 5, "shots": 5, "queries": 5, "dim": 64},
    about="episodes B, ways C, shots K and queries Q per class, embedding dim D",
    candidates=lambda device, point, memory: loss_candidates(device, *_sizes(point), memory),
    footprint=_sweep_footprint,
)


def training_step_candidates(device, C, K, Q, best_alternative) -> list[Candidate]:
    """One conv4 training step (embed 28x28 support and queries, loss, backward):
    fastmeta's loss with the encoder as is, and with its conv blocks fused
    (ProtoNet(fuse=True)'s view: conv_block, bn_relu_pool; CPU only)."""
    encoder = conv4().to(device)
    fused_encoder = fuse_conv_blocks(encoder, bn_relu_pool=True)
    support_x = torch.randn(C * K, 1, 28, 28, device=device)
    query_x = torch.randn(C * Q, 1, 28, 28, device=device)
    ys = torch.arange(C, device=device).repeat_interleave(K)
    yq = torch.arange(C, device=device).repeat_interleave(Q)
    params = list(encoder.parameters())
    name, loss_fn = best_alternative

    def fastmeta_step(net=encoder):
        z = net(torch.cat([support_x, query_x]))
        loss, _ = fastmeta.functional.prototypical_loss(z[: C * K], ys, z[C * K :], yq, C)
        return torch.autograd.grad(loss, params)

    def plain_step():
        z = encoder(torch.cat([support_x, query_x]))
        loss = loss_fn(z[None, : C * K], z[None, C * K :], yq[None], 1, C, K)
        return torch.autograd.grad(loss, params)

    fused = device == "cpu"  # the fused blocks are CPU ops; the ratios refer to this row
    rows = [
        Candidate("fastmeta + conv4", fastmeta_step, is_fastmeta=not fused),
        Candidate(f"{name} + conv4", plain_step),
    ]
    if fused:
        rows.insert(
            0,
            Candidate(
                "fastmeta + conv4 fused (ProtoNet(fuse=True))",
                lambda: fastmeta_step(fused_encoder),
                is_fastmeta=True,
            ),
        )
    return rows


def run(device: str, quick: bool = False, **timing):
    results = []
    for config, (B, C, K, Q, D) in (QUICK if quick else CONFIGS).items():
        results += run_config(
            CASE, config, device, loss_candidates(device, B, C, K, Q, D), memory=True, **timing
        )
    for distance in ALTERNATIVES:
        for config, (B, C, K, Q, D) in (QUICK if quick else CONFIGS).items():
            candidates = distance_candidates(device, distance, B, C, K, Q, D)
            results += run_config(
                CASE, f"{config} {distance}", device, candidates, memory=True, **timing
            )
    B, C, K, Q, D = (1, 5, 1, 2, 64) if quick else CONFIGS["(b) 60w5s D=1600"]
    step_results = [r for r in results if r.config.startswith("(b)" if not quick else "(a)")]
    alternatives = {
        "matmul": _plain_loss(matmul_dist),
        "cdist ** 2": _plain_loss(cdist_sq),
        "euclidean_dist (ProtoNets)": _plain_loss(euclidean_dist),
        "torch.compile(matmul)": torch.compile(_plain_loss(matmul_dist), dynamic=False),
    }
    best = min((r for r in step_results if r.name in alternatives), key=lambda r: r.median_ms)
    config = f"train step conv4 28x28 {C}w{K}s{Q}q"
    results += run_config(
        CASE,
        config,
        device,
        training_step_candidates(device, C, K, Q, (best.name, alternatives[best.name])),
        **timing,
    )
    return results
