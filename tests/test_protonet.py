"""ProtoNet ops (class_prototypes, squared_distances, prototypical cross-entropy)
on every usable backend against independent float64 computations."""

import pytest
import torch
from conftest import COMPILED, rel_err

import fastmeta
from fastmeta import backend
from fastmeta import functional as F

# (episodes B, ways C, embedding size D): ways 1, 5, 20, 60 and >= 1000; D in {1, 63, 1600}
EPISODES = [(3, 1, 1), (2, 5, 63), (1, 20, 1600), (2, 60, 63), (1, 1001, 63)]
TOL = 1e-4  # float32 kernels (GEMMs over D up to 1600) against float64


def make_episodes(B, C, D, dtype=torch.float32, max_shots=4, max_queries=3):
    """Uneven shots per class, labels shuffled; at least one query per episode."""
    shots = torch.randint(1, max_shots + 1, (C,))
    support_labels = torch.repeat_interleave(torch.arange(C), shots)
    support_labels = torch.stack(
        [support_labels[torch.randperm(len(support_labels))] for _ in range(B)]
    )
    M = max(1, int(torch.randint(0, max_queries + 1, ()).item()) * C)
    query_labels = torch.randint(0, C, (B, M))
    support = torch.randn(B, support_labels.shape[1], D, dtype=dtype)
    queries = torch.randn(B, M, D, dtype=dtype)
    return support, support_labels, queries, query_labels


def prototypes_float64(support, labels, C):
    support = support.detach().double()
    out = torch.zeros(support.shape[0], C, support.shape[2], dtype=torch.float64)
    for b in range(support.shape[0]):
        for k in range(C):
            out[b, k] = support[b][labels[b] == k].mean(0)
    return out


def distances_float64(queries, prototypes):
    q, c = queries.detach().double(), prototypes.detach().double()
    return ((q[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)


DISTANCES = ("squared_euclidean", "euclidean", "cosine")


def logits_float64(queries, prototypes, tau, distance="squared_euclidean"):
    """Plain ProtoNet logits of each distance, written directly (differentiable to any
    order; at a zero distance the euclidean distance's subgradient 0, as torch's vector
    norm has it, whose second derivative there is NaN)."""
    if distance == "euclidean":
        squared = ((queries[:, :, None, :] - prototypes[:, None, :, :]) ** 2).sum(-1)
        positive = squared > 0
        return -tau * torch.where(positive, torch.where(positive, squared, 1).sqrt(), 0)
    if distance == "cosine":
        return tau * torch.nn.functional.cosine_similarity(
            queries[:, :, None, :], prototypes[:, None, :, :], dim=-1, eps=1e-8
        )
    return -tau * ((queries[:, :, None, :] - prototypes[:, None, :, :]) ** 2).sum(-1)


def cross_entropy_float64(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), reduction="none"
    ).view(labels.shape)


def loss_float64(
    support, support_labels, queries, query_labels, C, tau, distance="squared_euclidean"
):
    """Plain float64 ProtoNet loss, differentiable (for reference gradients)."""
    protos = torch.stack(
        [
            torch.stack([support[b][support_labels[b] == k].mean(0) for k in range(C)])
            for b in range(support.shape[0])
        ]
    )
    logits = logits_float64(queries, protos, tau, distance)
    return cross_entropy_float64(logits, query_labels), logits


@pytest.mark.op("class_prototypes")
@pytest.mark.parametrize("B,C,D", EPISODES)
def test_class_prototypes_matches_float64(backend_device, B, C, D):
    name, device = backend_device
    support, labels, _, _ = make_episodes(B, C, D)
    support = support.to(device).requires_grad_()
    grad = torch.randn(B, C, D, device=device)
    with fastmeta.use_backend(name):
        protos = F.class_prototypes(support, labels.to(device), C)
        protos.backward(grad)
        assert fastmeta.last_backend("class_prototypes") == name
    assert rel_err(protos, prototypes_float64(support.cpu(), labels, C)) < TOL
    counts = torch.zeros(B, C).scatter_add_(1, labels, torch.ones(B, labels.shape[1]))
    expected = (
        grad.cpu().gather(1, labels[..., None].expand(-1, -1, D))
        / counts.gather(1, labels)[..., None]
    )
    assert rel_err(support.grad, expected) < TOL


@pytest.mark.parametrize("name", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_prototypes_divide_bitwise_as_torch(name, dtype):
    """The backends that sum in support order give torchmeta's mean bit for bit (sums by
    scatter_add, then a division by the counts: 1 / n times the sum is up to 1 ulp off),
    and the backward divides likewise. Counts 3, 5, 7 and 6: not powers of two."""
    if name == "cpu" and not COMPILED:
        pytest.skip("fastmeta._C not built")
    shots = torch.tensor([3, 5, 7, 6])
    labels = torch.repeat_interleave(torch.arange(4), shots)[torch.randperm(21)].expand(2, 21)
    support = torch.randn(2, 21, 37, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 4, 37, dtype=dtype)
    counts = torch.zeros(2, 4, dtype=dtype).scatter_add_(
        1, labels, torch.ones_like(support[..., 0])
    )
    sums = torch.zeros(2, 4, 37, dtype=dtype).scatter_add_(
        1, labels[..., None].expand(-1, -1, 37), support.detach()
    )
    with fastmeta.use_backend(name):
        protos = F.class_prototypes(support, labels, 4)
        protos.backward(grad)
    assert torch.equal(protos, sums / counts[..., None])
    want_grad = (
        grad.gather(1, labels[..., None].expand(-1, -1, 37)) / counts.gather(1, labels)[..., None]
    )
    assert torch.equal(support.grad, want_grad)


@pytest.mark.op("squared_distances")
@pytest.mark.parametrize("B,C,D", EPISODES)
def test_squared_distances_matches_float64(backend_device, B, C, D):
    name, device = backend_device
    _, _, queries, _ = make_episodes(B, C, D)
    queries = queries.to(device).requires_grad_()
    prototypes = torch.randn(B, C, D, device=device, requires_grad=True)
    grad = torch.randn(B, queries.shape[1], C, device=device)
    with fastmeta.use_backend(name):
        dist = F.squared_distances(queries, prototypes)
        dist.backward(grad)
    q64 = queries.detach().cpu().double().requires_grad_()
    c64 = prototypes.detach().cpu().double().requires_grad_()
    expected = ((q64[:, :, None] - c64[:, None]) ** 2).sum(-1)
    expected.backward(grad.cpu().double())
    assert rel_err(dist, expected) < TOL
    assert rel_err(queries.grad, q64.grad) < TOL and rel_err(prototypes.grad, c64.grad) < TOL


@pytest.mark.op("squared_distances")
def test_identical_points_are_exactly_zero_with_finite_gradients(backend_device):
    """Queries 0-6 are copies of the prototypes, 7-13 copies moved by 1e-3 (where the
    GEMM form cancels: the kernels must recompute those entries), 14-17 random."""
    name, device = backend_device
    prototypes = (torch.randn(2, 7, 63, device=device) * 30).requires_grad_()
    near = prototypes.detach() + 1e-3 * torch.randn(2, 7, 63, device=device)
    queries = torch.cat([prototypes.detach(), near, torch.randn(2, 4, 63, device=device)], 1)
    queries.requires_grad_()
    with fastmeta.use_backend(name):
        dist = F.squared_distances(queries, prototypes)
        dist.sum().backward()
    idx = torch.arange(7)
    exact, close = dist[:, idx, idx], dist[:, idx + 7, idx]
    assert torch.equal(exact, torch.zeros_like(exact))
    assert (dist >= 0).all()
    want = distances_float64(queries, prototypes)
    assert rel_err(dist, want) < TOL
    # each near-identical entry to float32 accuracy (~1e-4 of its own size)
    assert (
        (close.double().cpu() - want[:, idx + 7, idx]).abs() <= 1e-3 * want[:, idx + 7, idx]
    ).all()
    assert torch.isfinite(queries.grad).all() and torch.isfinite(prototypes.grad).all()


@pytest.mark.op("prototypical_cross_entropy")
@pytest.mark.parametrize("B,C,D", EPISODES)
def test_prototypical_loss_matches_float64(backend_device, B, C, D):
    name, device = backend_device
    support, support_labels, queries, query_labels = make_episodes(B, C, D)
    support = support.to(device).requires_grad_()
    queries = queries.to(device).requires_grad_()
    tau = torch.tensor(0.37, device=device, requires_grad=True)
    with fastmeta.use_backend(name):
        losses, _ = F.prototypical_loss(
            support,
            support_labels.to(device),
            queries,
            query_labels.to(device),
            C,
            tau=tau,
            reduction="none",
        )
        loss, accuracy = F.prototypical_loss(
            support, support_labels.to(device), queries, query_labels.to(device), C, tau=tau
        )
        grads = torch.autograd.grad(loss, (support, queries, tau))
        assert fastmeta.last_backend("prototypical_cross_entropy") == name
        assert fastmeta.last_backend("class_prototypes") == name
    s64, q64, t64 = (x.detach().cpu().double().requires_grad_() for x in (support, queries, tau))
    want_losses, logits = loss_float64(s64, support_labels, q64, query_labels, C, t64)
    want_grads = torch.autograd.grad(want_losses.mean(), (s64, q64, t64), retain_graph=True)
    assert losses.shape == (B, queries.shape[1])
    # A confident query's loss log(1 + sum_k exp(z_k - z_y)) and its gradient (p - y) are
    # far smaller than the logits z they come from (|z| ~ 1e3 at D = 1600), and float32
    # resolves them only to ~eps32 * |z| (a loss under ~1e-6 comes out 0). So each error is
    # measured against the larger of the true value and 1e-2 of the size it would have
    # with O(1) probabilities: |z| for the losses, the gradient of the logits themselves
    # (random signs, mean over queries) for the gradients.
    logit_scale = logits.detach().abs().amax(-1)
    signs = torch.randint(0, 2, logits.shape, dtype=torch.float64) * 2 - 1
    grad_scales = torch.autograd.grad((logits * signs).mean(-1).mean(), (s64, q64, t64))
    assert close_at_scale(losses, want_losses, logit_scale.norm())
    assert close_at_scale(loss, want_losses.mean(), logit_scale.mean())
    want_accuracy = (logits.argmax(-1) == query_labels).double().mean()
    assert abs(float(accuracy) - float(want_accuracy)) <= 1.0 / query_labels.numel() + 1e-12
    # d_tau = 2 sum q . (G C) - sum colsum(G) ||c||^2: two sums that cancel to a small
    # fraction of their size, so float32 inputs leave it ~1e-4 off at D = 1600
    for got, want, scale, tol in zip(grads, want_grads, grad_scales, (TOL, TOL, 5 * TOL)):
        assert close_at_scale(got, want, scale.norm(), tol)


def close_at_scale(got, want, scale, tol=TOL):
    """||got - want|| < tol * max(||want||, 1e-2 * scale), in float64."""
    error = (got.detach().double().cpu() - want.detach()).norm()
    return float(error) < tol * max(float(want.detach().norm()), 1e-2 * float(scale))


@pytest.mark.op("prototypical_cross_entropy")
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("B,M,C,D", [(2, 9, 5, 33), (1, 70, 23, 9), (3, 2, 1, 1)])
def test_each_distance_matches_float64_with_zero_distances_and_zero_rows(
    backend_device, distance, B, M, C, D
):
    """The fused cross-entropy of each distance against its plain float64 formula
    (torch's vector norm, cosine_similarity), losses, softmax, predictions and the
    gradients of queries, prototypes and tau, on episodes holding a query equal to a
    prototype (euclidean: distance exactly 0, the subgradient 0), a zero prototype and
    a zero query (cosine: similarity 0, finite gradients)."""
    name, device = backend_device
    queries, prototypes = torch.randn(B, M, D), torch.randn(B, C, D)
    queries[0, 0] = prototypes[0, C - 1]  # zero distance
    queries[-1, -1] = 0  # zero query row
    if C > 2:
        prototypes[0, 1] = 0  # zero prototype row
    labels = torch.randint(0, C, (B, M))
    args = [x.to(device).requires_grad_() for x in (queries, prototypes, torch.tensor(0.8))]
    with fastmeta.use_backend(name):
        losses, predictions, softmax = torch.ops.fastmeta.prototypical_cross_entropy(
            args[0], args[1], labels.to(device), args[2], distance
        )
        cotangent = torch.randn(B, M, device=device)
        grads = torch.autograd.grad(losses, args, cotangent)
    assert fastmeta.last_backend("prototypical_cross_entropy") == name
    for t in (losses, softmax, *grads):
        assert torch.isfinite(t).all()
    q64, c64, t64 = (x.detach().cpu().double().requires_grad_() for x in args)
    logits = logits_float64(q64, c64, t64, distance)
    want = cross_entropy_float64(logits, labels)
    want_grads = torch.autograd.grad(want, (q64, c64, t64), cotangent.cpu().double())
    assert rel_err(losses, want) < TOL
    assert rel_err(softmax, logits.softmax(-1)) < TOL
    chosen = logits.gather(-1, predictions.cpu()[..., None])[..., 0]
    assert (chosen >= logits.max(-1).values - 1e-5).all()  # the largest, up to rounding
    for got, expected in zip(grads, want_grads):
        assert rel_err(got, expected) < TOL
    if distance == "euclidean":  # the zero distance: exactly the largest logit, 0
        with fastmeta.use_backend(name):
            zero = torch.ops.fastmeta.prototypical_cross_entropy(
                args[0][:1, :1].detach(),
                args[1][:1].detach(),
                labels[:1, :1].to(device),
                torch.tensor(1e4, device=device),
                distance,
            )[2]
        assert float(zero[0, 0, C - 1]) == 1.0  # every other class e^-1e4 d behind


@pytest.mark.op("prototypical_cross_entropy")
@pytest.mark.parametrize("distance", DISTANCES[1:])
def test_functional_distance_and_empty_classes_zero(backend_device, distance):
    """F.prototypical_loss with a distance (and empty_classes="zero": an absent class
    gets a zero prototype, which the cosine scores 0) against plain float64."""
    name, device = backend_device
    support, ys, queries, yq = make_episodes(2, 5, 17)
    ys = torch.where(ys == 4, 3, ys)  # class 4 has no support example
    s, q, t = (x.to(device).requires_grad_() for x in (support, queries, torch.tensor(0.6)))
    with fastmeta.use_backend(name):
        loss, accuracy = F.prototypical_loss(
            s, ys.to(device), q, yq.to(device), 5, tau=t, distance=distance, empty_classes="zero"
        )
        grads = torch.autograd.grad(loss, (s, q, t))
    s64, q64, t64 = (x.detach().cpu().double().requires_grad_() for x in (s, q, t))
    onehot = torch.nn.functional.one_hot(ys, 5).double()
    protos = onehot.transpose(1, 2) @ s64 / onehot.sum(1).clamp_min(1)[..., None]
    logits = logits_float64(q64, protos, t64, distance)
    want = cross_entropy_float64(logits, yq).mean()
    assert rel_err(loss, want) < TOL
    for got, expected in zip(grads, torch.autograd.grad(want, (s64, q64, t64))):
        assert rel_err(got, expected) < TOL
    want_accuracy = (logits.argmax(-1) == yq).double().mean()
    assert abs(float(accuracy) - float(want_accuracy)) <= 1.0 / yq.numel() + 1e-12


def test_an_unknown_distance_is_refused_by_name():
    support, ys, queries, yq = make_episodes(1, 3, 4)
    choices = r"\('squared_euclidean', 'euclidean', 'cosine'\)"
    with pytest.raises(ValueError, match=rf"prototypical_loss: distance must be one of {choices}"):
        F.prototypical_loss(support, ys, queries, yq, 3, distance="manhattan")
    with pytest.raises(TypeError, match="prototypical_cross_entropy: distance must be a str"):
        F.prototypical_cross_entropy(support[:, :3], queries, yq, distance=None)
    with pytest.raises(ValueError, match=rf"ProtoNet: distance must be one of {choices}, got 'l1'"):
        fastmeta.ProtoNet(torch.nn.Identity(), distance="l1")
    with pytest.raises(TypeError, match="ProtoNet: distance must be a str, .* got int"):
        fastmeta.ProtoNet(torch.nn.Identity(), distance=1)


@pytest.mark.op("prototypical_cross_entropy")
@pytest.mark.parametrize("C", [3, 16, 17, 40])  # the CPU kernel has a path for C <= 16
def test_predictions_are_the_first_nearest_prototype(backend_device, C):
    """Small integer embeddings make every logit exact in float32, so duplicated
    prototypes and equidistant queries tie exactly: the prediction is the first
    nearest class, as torch.argmax picks, and the softmax splits the mass evenly."""
    name, device = backend_device
    base = torch.randint(-3, 4, (1, C // 2 + 1, 8)).float()
    prototypes = torch.cat([base, base], 1)[:, :C]  # class k + C // 2 + 1 repeats class k
    queries = torch.randint(-3, 4, (1, 70, 8)).float()
    labels = (torch.arange(70) % C)[None]
    with fastmeta.use_backend(name):
        losses, predictions, softmax = torch.ops.fastmeta.prototypical_cross_entropy(
            queries.to(device),
            prototypes.to(device),
            labels.to(device),
            torch.tensor(1.0, device=device),
        )
    logits = -(queries.double()[:, :, None] - prototypes.double()[:, None]).pow(2).sum(-1)
    assert torch.equal(predictions.cpu(), logits.argmax(-1))
    assert (predictions < C // 2 + 1).all()  # never the repeated copy
    assert rel_err(softmax, logits.softmax(-1)) < TOL
    want = -logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    assert rel_err(losses, want) < TOL


@pytest.mark.skipif(not fastmeta.backends().extension_built, reason="needs fastmeta._C")
@pytest.mark.parametrize("C,step", [(16, 0.5), (131, 1 / 16)])  # both CPU softmax paths
def test_cpu_softmax_is_accurate_to_a_few_ulp(C, step):
    """The CPU kernel's own vectorized exp (csrc/cpu/vector_exp.h): with prototypes
    c_k = k * step on a line and the query at 0 every logit -c_k^2 is exact in float32
    and spans [0, -66], so each softmax entry must be within a few ulp of float64."""
    prototypes = (torch.arange(C, dtype=torch.float32) * step).reshape(1, C, 1)
    prototypes = prototypes[:, torch.randperm(C)]
    queries, labels = torch.zeros(1, 3, 1), torch.tensor([[0, C // 2, C - 1]])
    with fastmeta.use_backend("cpu"):
        losses, _, softmax = torch.ops.fastmeta.prototypical_cross_entropy(
            queries, prototypes, labels, torch.tensor(1.0)
        )
    logits = -(prototypes.double()[:, None, :, 0] ** 2) + 0 * queries.double()
    want = logits.softmax(-1)
    assert ((softmax.double() - want).abs() / want).max() < 1e-6
    want_losses = -logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    assert ((losses.double() - want_losses).abs() / want_losses.abs().clamp_min(1)).max() < 1e-6


@pytest.mark.skipif(not fastmeta.backends().extension_built, reason="needs fastmeta._C")
@pytest.mark.parametrize("distance", DISTANCES)
def test_cpu_backward_in_row_chunks_matches_the_reference(distance):
    """G [M, C] over 8 MiB is built and multiplied a chunk of rows at a time (here
    1100 x 1001 float64 in two chunks, two episodes): every gradient as the reference."""
    support, ys, _, _ = make_episodes(2, 1001, 7, dtype=torch.float64, max_shots=1)
    queries = torch.randn(2, 1100, 7, dtype=torch.float64, requires_grad=True)
    yq = torch.randint(0, 1001, (2, 1100))
    support.requires_grad_()
    tau = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    grads = {}
    for name in ("cpu", "reference"):
        with fastmeta.use_backend(name):
            loss, _ = F.prototypical_loss(
                support, ys, queries, yq, 1001, tau=tau, reduction="sum", distance=distance
            )
            grads[name] = torch.autograd.grad(loss, (support, queries, tau))
    assert queries.shape[1] * 1001 * 8 > 8 << 20
    for got, want in zip(grads["cpu"], grads["reference"]):
        assert rel_err(got, want) < 1e-12


@pytest.mark.op("prototypical_cross_entropy")
def test_reductions_and_unbatched_input(backend_device):
    name, device = backend_device
    support, ys, queries, yq = (x[0].to(device) for x in make_episodes(1, 5, 16))
    with fastmeta.use_backend(name):
        none, _ = F.prototypical_loss(support, ys, queries, yq, 5, reduction="none")
        total, _ = F.prototypical_loss(support, ys, queries, yq, 5, reduction="sum")
        mean, _ = F.prototypical_loss(support, ys, queries, yq, 5)
        protos = F.get_prototypes(support, ys, 5)
        torchmeta_style = F.prototypical_cross_entropy(protos, queries, yq)
    assert none.shape == yq.shape and protos.shape == (5, 16)
    assert torch.allclose(total, none.sum()) and torch.allclose(mean, none.mean())
    assert torch.allclose(torchmeta_style, mean)


def _float64_ok(op, name, device):
    return fastmeta.backend.op_unavailable_reason(op, name, device, torch.float64) is None


@pytest.mark.op("prototypical_cross_entropy")
@pytest.mark.parametrize("distance", DISTANCES)
def test_second_order_through_a_protonet_head(backend_device, distance):
    """MAML-style inner step on an encoder through the ProtoNet loss (create_graph),
    then the meta-gradient: matches the plain float64 computation."""
    name, device = backend_device
    support_x, ys, query_x, yq = make_episodes(1, 5, 12)
    W0 = torch.randn(12, 8) * 0.3

    def meta_grad(loss_fn, dtype):
        W = W0.to(dtype).requires_grad_()
        sx, qx = support_x.to(dtype)[0], query_x.to(dtype)[0]
        inner, _ = loss_fn(torch.tanh(sx @ W), ys[0], torch.tanh(sx @ W), ys[0])
        (g,) = torch.autograd.grad(inner, W, create_graph=True)
        W_fast = W - 0.5 * g
        outer, _ = loss_fn(torch.tanh(sx @ W_fast), ys[0], torch.tanh(qx @ W_fast), yq[0])
        return torch.autograd.grad(outer, W)[0]

    def fused(s, ys_, q, yq_):
        return F.prototypical_loss(s, ys_, q, yq_, 5, distance=distance)

    def plain(s, ys_, q, yq_):
        losses, _ = loss_float64(s[None], ys_[None], q[None], yq_[None], 5, 1.0, distance)
        return losses.mean(), None

    with fastmeta.use_backend(name):
        got = meta_grad(fused, torch.float32)
    assert rel_err(got, meta_grad(plain, torch.float64)) < TOL


@pytest.mark.op("prototypical_cross_entropy")
@pytest.mark.parametrize("distance", DISTANCES)
def test_opcheck_backward_ops(backend_device, distance):
    """The backward ops (the forward ops are in the conformance suite)."""
    name, device = backend_device
    support, ys, queries, yq = (x.to(device) for x in make_episodes(2, 4, 9))
    prototypes = F.class_prototypes(support, ys, 4)
    tau = torch.tensor(0.5, device=device)
    ops = torch.ops.fastmeta
    with fastmeta.use_backend(name):
        losses, _, softmax = ops.prototypical_cross_entropy(queries, prototypes, yq, tau, distance)
        torch.library.opcheck(
            ops.prototypical_cross_entropy_backward.default,
            (torch.randn_like(losses), queries, prototypes, yq, tau, softmax, distance),
        )
        if backend_supports(name, "class_prototypes", device):
            torch.library.opcheck(
                ops.class_prototypes_backward.default, (torch.randn_like(prototypes), ys)
            )
            losses, _, fused_prototypes, softmax = ops.prototypical_loss(
                support, ys, queries, yq, 4, tau, distance
            )
            assert rel_err(fused_prototypes, prototypes) < TOL
            torch.library.opcheck(
                ops.prototypical_loss_backward.default,
                (
                    torch.randn_like(losses),
                    *(ys, queries, yq, tau, fused_prototypes, softmax, distance),
                ),
            )


def backend_supports(name, op, device):
    return fastmeta.backend.op_unavailable_reason(op, name, device, torch.float32) is None


@pytest.mark.op("prototypical_cross_entropy")
def test_torch_compile_fullgraph(backend_device):
    name, device = backend_device
    torch._dynamo.reset()
    support, ys, queries, yq = (x.to(device) for x in make_episodes(2, 5, 32))

    def step(s, q, t):
        loss, accuracy = F.prototypical_loss(s, ys, q, yq, 5, tau=t)
        return loss * 2, accuracy

    compiled = torch.compile(step, fullgraph=True)
    args = [
        support.requires_grad_(),
        queries.requires_grad_(),
        torch.tensor(0.9, device=device, requires_grad=True),
    ]
    with fastmeta.use_backend(name):
        loss, accuracy = compiled(*args)
        grads = torch.autograd.grad(loss, args)
    with fastmeta.use_backend("reference"):
        loss_ref, accuracy_ref = step(*args)
        grads_ref = torch.autograd.grad(loss_ref, args)
    assert rel_err(loss, loss_ref) < TOL and torch.equal(accuracy, accuracy_ref)
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < TOL


def test_protonet_module_batched_and_unbatched():
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8))
    model = fastmeta.ProtoNet(encoder, tau=0.5, learn_tau=True)
    support_x, ys = torch.randn(3, 10, 4, 4), torch.arange(5).repeat(2).expand(3, 10)
    query_x, yq = torch.randn(3, 7, 4, 4), torch.randint(0, 5, (3, 7))
    logits = model(support_x, ys, query_x)
    assert logits.shape == (3, 7, 5)
    embed = lambda x: encoder(x.flatten(0, 1)).view(*x.shape[:2], -1)  # noqa: E731
    protos = prototypes_float64(embed(support_x), ys, 5)
    assert rel_err(logits, -0.5 * distances_float64(embed(query_x), protos)) < TOL
    loss, accuracy = model.loss(support_x, ys, query_x, yq)
    loss.backward()
    assert model.tau.grad is not None and encoder[1].weight.grad is not None
    assert 0.0 <= float(accuracy) <= 1.0
    single = model(support_x[0], ys[0], query_x[0])
    assert single.shape == (7, 5) and rel_err(single, logits[0]) < TOL


@pytest.mark.parametrize("distance", DISTANCES[1:])
def test_protonet_module_with_a_distance(distance):
    """ProtoNet(distance=...): forward gives the distance's logits (plain float64), and
    loss() the cross-entropy of those logits, with the gradients of the encoder and the
    learned tau of that plain computation."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8))
    model = fastmeta.ProtoNet(encoder, tau=2.5, learn_tau=True, distance=distance)
    support_x, ys = torch.randn(2, 10, 4, 4), torch.arange(5).repeat(2).expand(2, 10)
    query_x, yq = torch.randn(2, 7, 4, 4), torch.randint(0, 5, (2, 7))
    logits = model(support_x, ys, query_x)
    loss, accuracy = model.loss(support_x, ys, query_x, yq)
    params = [model.tau, *encoder.parameters()]
    grads = torch.autograd.grad(loss, params)
    double = encoder.double()
    embed = lambda x: double(x.double().flatten(0, 1)).view(*x.shape[:2], -1)  # noqa: E731
    tau64 = model.tau.detach().double().requires_grad_()
    want_logits = logits_float64(
        embed(query_x), prototypes_float64(embed(support_x), ys, 5), tau64, distance
    )
    want_logits64 = logits_float64(
        embed(query_x),
        torch.stack([embed(support_x)[b].view(2, 5, -1).mean(0) for b in range(2)]),
        tau64,
        distance,
    )
    want = cross_entropy_float64(want_logits64, yq).mean()
    want_grads = torch.autograd.grad(want, [tau64, *double.parameters()])
    encoder.float()
    assert torch.isfinite(logits).all() and rel_err(logits, want_logits) < TOL
    assert rel_err(loss, want) < TOL
    # the euclidean distance does not see the linear layer's bias (a shift of every
    # embedding): its gradient is 0 up to rounding, measured against the largest one
    scale = max(float(g.norm()) for g in want_grads)
    for got, expected in zip(grads, want_grads):
        error = float((got.double() - expected).norm())
        assert error < TOL * max(float(expected.norm()), 1e-2 * scale)
    assert abs(float(accuracy) - float((want_logits.argmax(-1) == yq).double().mean())) < 1e-6


def test_protonet_fused_encoder_equals_plain_and_is_differentiable_once():
    """fuse=True: a conv4 encoder's blocks run as conv_block / bn_relu_pool with the
    same loss and gradients as the plain encoder (float64); create_graph through it
    raises instead of giving a wrong second derivative."""
    from fastmeta.models import conv4

    torch.manual_seed(0)
    encoder = conv4().double()
    support_x, ys = (
        torch.rand(2, 10, 1, 28, 28, dtype=torch.float64),
        torch.arange(5).repeat(2).expand(2, 10),
    )
    query_x, yq = torch.rand(2, 7, 1, 28, 28, dtype=torch.float64), torch.randint(0, 5, (2, 7))
    results = []
    for fuse in (True, False):
        fastmeta.backend.forget_last_backends(("conv_block", "bn_relu_pool"))
        model = fastmeta.ProtoNet(encoder, fuse=fuse)
        loss, _ = model.loss(support_x, ys, query_x, yq)
        results.append((loss, torch.autograd.grad(loss, list(encoder.parameters()))))
        for op in ("conv_block", "bn_relu_pool"):
            ran = fastmeta.last_backend(op) is not None
            assert ran == (fuse and COMPILED)
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert rel_err(fused_loss, plain_loss) < 1e-12
    for got, want in zip(fused_grads, plain_grads):
        assert float((got - want).abs().max()) <= 1e-9 * float(want.abs().max()) + 1e-12
    assert len(list(fastmeta.ProtoNet(encoder, fuse=True).parameters())) == len(
        list(encoder.parameters())
    )
    if COMPILED:  # the fused encoder ran: a second derivative through it raises
        model = fastmeta.ProtoNet(encoder, fuse=True)
        loss, _ = model.loss(support_x, ys, query_x, yq)
        (g,) = torch.autograd.grad(loss, [encoder[0].weight], create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            g.sum().backward()


BAD = [
    (
        "label >= num_classes",
        dict(support_labels=[[0, 1, 2, 5]]),
        ValueError,
        ["support_labels", "5", "num_classes=3"],
    ),
    ("negative label", dict(query_labels=[[0, -1]]), ValueError, ["query_labels", "-1"]),
    (
        "class with no support",
        dict(support_labels=[[0, 1, 1, 0]]),
        ValueError,
        ["class 2", "episode 0", "no support example"],
    ),
    ("D mismatch", dict(queries=torch.randn(1, 2, 7)), ValueError, ["[1, 2, 7]", "[1, 4, 6]", "D"]),
    (
        "B mismatch",
        dict(queries=torch.randn(2, 2, 6), query_labels=[[0, 1], [0, 1]]),
        ValueError,
        ["[1, 4, 6]", "[2, 2, 6]", "B"],
    ),
    (
        "integer support",
        dict(support=torch.ones(1, 4, 6, dtype=torch.int64)),
        TypeError,
        ["support", "floating", "int64"],
    ),
    (
        "float labels",
        dict(support_labels=torch.tensor([[0.0, 1.0, 2.0, 0.0]])),
        TypeError,
        ["support_labels", "integer", "float32"],
    ),
    (
        "label shape",
        dict(query_labels=[[0, 1, 2]]),
        ValueError,
        ["query_labels", "[1, 2]", "[1, 3]"],
    ),
    (
        "dtype mismatch",
        dict(queries=torch.randn(1, 2, 6, dtype=torch.float64)),
        TypeError,
        ["queries", "float64", "support", "float32"],
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument_and_shapes(case):
    _, overrides, error, words = case
    args = dict(
        support=torch.randn(1, 4, 6),
        support_labels=[[0, 1, 2, 0]],
        queries=torch.randn(1, 2, 6),
        query_labels=[[0, 1]],
    )
    args.update(overrides)
    args = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in args.items()}
    with pytest.raises(error) as info:
        F.prototypical_loss(
            args["support"], args["support_labels"], args["queries"], args["query_labels"], 3
        )
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.skipif(not COMPILED, reason="fastmeta._C is not built")
def test_kernels_refuse_bad_labels_even_when_called_directly():
    """The private C++ kernels never index out of bounds, whatever the op layer let by."""
    support, ys = torch.randn(1, 4, 3), torch.tensor([[0, 1, 1, 0]])
    q, c, tau = torch.randn(1, 2, 3), torch.randn(1, 3, 3), torch.tensor(1.0)
    kernels = torch.ops.fastmeta_C
    with pytest.raises(RuntimeError, match="class 2 of episode 0 has no support example"):
        kernels.class_prototypes_forward(support, ys, 3)
    with pytest.raises(RuntimeError, match="query label 7 is outside"):
        kernels.prototypical_cross_entropy_forward(q, c, torch.tensor([[0, 7]]), tau)
    losses, _, softmax = kernels.prototypical_cross_entropy_forward(
        q, c, torch.tensor([[0, 1]]), tau
    )
    for bad in (5, -3, 10**11):
        with pytest.raises(RuntimeError, match="is outside"):
            kernels.prototypical_cross_entropy_backward(
                torch.ones_like(losses), q, c, torch.tensor([[0, bad]]), tau, softmax
            )


@pytest.mark.op("prototypical_cross_entropy")
def test_ops_give_the_same_clear_error_on_every_backend(backend_device):
    name, device = backend_device
    support, ys = torch.randn(1, 4, 3, device=device), torch.tensor([[0, 1, 1, 0]], device=device)
    q, c = torch.randn(1, 2, 3, device=device), torch.randn(1, 3, 3, device=device)
    with fastmeta.use_backend(name):
        with pytest.raises(
            ValueError,
            match=r"class 2 of episode 0 has no support example"
            r".*shape \[1, 4\]",
        ):
            F.class_prototypes(support, ys, 3)
        with pytest.raises(ValueError, match=r"query_labels holds 7 at index \[0, 1\]"):
            F.prototypical_cross_entropy(c, q, torch.tensor([[0, 7]], device=device))


@pytest.mark.op("prototypical_cross_entropy")
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_runs_in_float32_math(backend_device, dtype, tolerance):
    """Half inputs are computed in float32 on every backend: an offset that makes
    ||q||^2 + ||c||^2 - 2 q.c cancel, and fp16 norms past 65504."""
    name, device = backend_device
    if backend.op_unavailable_reason("prototypical_cross_entropy", name, device, dtype):
        pytest.skip(f"{name} does not run {dtype} on {device} here")
    support, ys, queries, yq = make_episodes(2, 5, 512)
    support, queries = support + 12, queries + 12  # ||c||^2 ~ 74000: overflows float16
    s, q = (x.to(device, dtype).requires_grad_() for x in (support, queries))
    with fastmeta.use_backend(name):
        loss, _ = F.prototypical_loss(s, ys.to(device), q, yq.to(device), 5, tau=0.01)
        grads = torch.autograd.grad(loss, (s, q))
    assert fastmeta.last_backend("prototypical_cross_entropy") == name
    s64, q64 = (x.detach().cpu().double().requires_grad_() for x in (s, q))
    want, _ = loss_float64(s64, ys, q64, yq, 5, 0.01)
    want_grads = torch.autograd.grad(want.mean(), (s64, q64))
    assert rel_err(loss, want.mean()) < tolerance
    for got, ref in zip(grads, want_grads):
        assert got.dtype == dtype and rel_err(got, ref) < 10 * tolerance
    with fastmeta.use_backend(name):
        dist = F.squared_distances(q, F.class_prototypes(s, ys.to(device), 5)).cpu()
    assert torch.isfinite(dist).all()
    want_dist = distances_float64(q.cpu(), prototypes_float64(s.cpu(), ys, 5))
    assert rel_err(dist, want_dist) < tolerance
