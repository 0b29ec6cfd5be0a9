"""fastmeta.compat.torchmeta against torchmeta's math in plain torch (expand-subtract
distances [B, C, M, D], then F.cross_entropy), forward + backward w.r.t. the
prototypes and query embeddings; also get_prototypes + prototypical_loss from the
support embeddings. Default: a typical episode batch, 16 tasks 20-way 5-shot 15
queries per class, D = 1600. Rounds interleave the candidates after warm-up; the
table gives each one's median and its time as a multiple of the compat one.

    python benchmarks/compat_torchmeta.py [--tasks 16] [--ways 20] [--shots 5]
        [--queries 15] [--dim 1600] [--repeats 20] [--threads N] [--device cpu|cuda]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as TF

from fastmeta.compat.torchmeta.utils.prototype import get_prototypes, prototypical_loss


def plain_get_prototypes(embeddings, targets, num_classes):
    """torchmeta's math: per-class sums over counts clamped to >= 1."""
    B, S, D = embeddings.shape
    counts = embeddings.new_zeros(B, num_classes)
    counts.scatter_add_(1, targets, torch.ones_like(targets, dtype=embeddings.dtype))
    sums = embeddings.new_zeros(B, num_classes, D)
    sums.scatter_add_(1, targets[..., None].expand(B, S, D), embeddings)
    return sums / counts.clamp_min(1)[..., None]


def plain_prototypical_loss(prototypes, embeddings, targets, **kwargs):
    """torchmeta's math: expand-subtract squared distances [B, C, M], cross-entropy."""
    distances = ((prototypes[:, :, None, :] - embeddings[:, None, :, :]) ** 2).sum(-1)
    return TF.cross_entropy(-distances, targets, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--dim", type=int, default=1600)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    B, C, D = args.tasks, args.ways, args.dim
    g = torch.Generator().manual_seed(0)
    support_targets = torch.arange(C).repeat(args.shots).expand(B, -1).contiguous().to(device)
    query_targets = torch.randint(0, C, (B, C * args.queries), generator=g).to(device)
    support = torch.randn(B, C * args.shots, D, generator=g).to(device).requires_grad_()
    queries = torch.randn(B, C * args.queries, D, generator=g).to(device).requires_grad_()
    prototypes = plain_get_prototypes(support, support_targets, C).detach().requires_grad_()

    def loss_step(loss_fn, **kwargs):
        def run():
            loss = loss_fn(prototypes, queries, query_targets, **kwargs)
            torch.autograd.grad(loss, (prototypes, queries))

        return run

    def episode_step(get, loss_fn):
        def run():
            loss = loss_fn(get(support, support_targets, C), queries, query_targets)
            torch.autograd.grad(loss, (support, queries))

        return run

    rows = {  # name: (candidate, the compat row it is compared with)
        "prototypical_loss   torchmeta math": (loss_step(plain_prototypical_loss), "loss"),
        "prototypical_loss   compat": (loss_step(prototypical_loss), "loss"),
        "  label_smoothing   torchmeta math": (
            loss_step(plain_prototypical_loss, label_smoothing=0.1),
            "smooth",
        ),
        "  label_smoothing   compat": (loss_step(prototypical_loss, label_smoothing=0.1), "smooth"),
        "get_prototypes+loss torchmeta math": (
            episode_step(plain_get_prototypes, plain_prototypical_loss),
            "episode",
        ),
        "get_prototypes+loss compat": (episode_step(get_prototypes, prototypical_loss), "episode"),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(3 + args.repeats):  # 3 warm-up rounds
        for name, (run, _) in rows.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if round_ >= 3:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    compat = {group: medians[name] for name, (_, group) in rows.items() if "compat" in name}
    print(
        f"B={B} {C}-way {args.shots}-shot {args.queries} queries/class D={D} on {device} "
        f"({torch.get_num_threads()} threads), forward + backward, median of {args.repeats}"
    )
    for name, (_, group) in rows.items():
        print(f"{name:38s} {medians[name]:9.2f} ms   {medians[name] / compat[group]:6.2f}x compat")


if __name__ == "__main__":
    main()
