"""MAML / Meta-SGD meta_step in bounded memory (fastmeta/maml/meta_step.py): chunked and
checkpointed meta-gradients equal the single backward's in float64; chunk sizing from a
memory budget; clear errors; the CLI's flags; 2 ranks that chunk their shares."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_distributed import TINY as DIST_TINY
from test_distributed import torchrun_train
from test_maml import conv_bn_net, episodes, rel
from torch import nn

import fastmeta
from fastmeta.cli.main import main
from fastmeta.data import SinusoidTasks
from fastmeta.maml import meta_step as meta_step_module
from fastmeta.maml.meta_step import SIZING, graph_bytes

FACTOR, RESERVE = SIZING[False]  # without checkpoint

STEPS = 3


def make_meta(algorithm, first_order=False, dtype=torch.float64, **options):
    torch.manual_seed(0)
    model = conv_bn_net(dtype=dtype)
    if algorithm == "maml":
        return fastmeta.MAML(model, lr=0.3, first_order=first_order, steps=STEPS, **options)
    if algorithm == "maml-per-step":
        return fastmeta.MAML(model, lr=[0.3, 0.2, 0.1], first_order=first_order, steps=STEPS)
    if algorithm == "anil":  # the head adapts; the body is shared; one tensor frozen
        model[0].bias.requires_grad_(False)
        return fastmeta.MAML(
            model, lr=0.3, first_order=first_order, steps=STEPS, adapt=["7.weight", "7.bias"]
        )
    per_step = algorithm == "metasgd-per-step"
    return fastmeta.MetaSGD(
        model, lr=0.3, first_order=first_order, steps=STEPS, per_step=per_step, **options
    )


def single_backward(meta, data, strategy="loop"):
    """The path meta_step must reproduce: adapt_batch, mean query loss, one backward."""
    xs, ys, xq, yq = data
    meta.zero_grad(set_to_none=True)
    learner = meta.adapt_batch(xs, ys, F.cross_entropy, strategy=strategy)
    logits = learner(xq)
    loss = F.cross_entropy(logits.flatten(0, 1), yq.flatten())
    loss.backward()
    accuracy = (logits.argmax(-1) == yq).to(loss.dtype).mean()
    return loss.detach(), accuracy, grads(meta)


def grads(meta):
    return [p.grad.clone() if p.grad is not None else None for p in meta.parameters()]


def bounded(meta, data, **options):
    meta.zero_grad(set_to_none=True)
    result = meta.meta_step(*data, F.cross_entropy, **options)
    return result, grads(meta)


def assert_same(expected, got, tolerance=1e-12):
    assert [g is None for g in expected] == [g is None for g in got]
    expected = [g for g in expected if g is not None]
    got = [g for g in got if g is not None]
    assert rel(expected, got) < tolerance


MODES = {
    "chunks of 2": dict(chunk_size=2),
    "checkpoint": dict(checkpoint=True),
    "checkpoint, chunks of 3": dict(checkpoint=True, chunk_size=3),
    "max_memory": "budget",  # 2 tasks (+ 1 for the backward): chunks of 1 (measured), 2, 2
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize(
    "algorithm", ["maml", "maml-per-step", "anil", "metasgd", "metasgd-per-step"]
)
def test_equals_the_single_backward_in_float64(algorithm, first_order, mode):
    meta = make_meta(algorithm, first_order)
    data = episodes(T=5, dtype=torch.float64)
    loss, accuracy, expected = single_backward(meta, data)
    options = MODES[mode]
    if options == "budget":
        one = bounded(meta, data, max_memory=10**9)[0].task_bytes
        meta_step_module._TASK_BYTES.clear()  # measure again, as a first call does
        options = dict(max_memory=(2 + RESERVE) * math.ceil(one * FACTOR) + 1)
    result, got = bounded(meta, data, **options)
    assert_same(expected, got)
    torch.testing.assert_close(result.loss, loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(result.accuracy, accuracy, rtol=1e-13, atol=0)
    expected_chunks = {
        "chunks of 2": (2, 2, 1),
        "checkpoint": (5,),
        "checkpoint, chunks of 3": (3, 2),
        "max_memory": (1, 2, 2),
    }[mode]
    assert result.chunks == expected_chunks
    if algorithm.startswith("metasgd"):
        assert any(lr.grad.abs().sum() > 0 for lr in meta.lrs)
    if algorithm == "anil":
        assert meta.module[0].bias.grad is None and meta.module[4].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options",
    [dict(chunk_size=2), dict(checkpoint=True, chunk_size=2), dict(max_memory=10**9)],
    ids=["chunks", "checkpoint", "max_memory"],
)
@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_vmap_strategy_chunks_alike(algorithm, options):
    """The strategy that batches the tasks (the GPU default) chunks the same way; its
    graphs are measured too (torch.func refuses saved-tensor hooks, not the walk)."""
    meta = make_meta(algorithm)
    data = episodes(T=5, dtype=torch.float64)
    _, _, expected = single_backward(meta, data, strategy="vmap")
    result, got = bounded(meta, data, strategy="vmap", **options)
    assert_same(expected, got)
    assert result.chunks == ((1, 4) if "max_memory" in options else (2, 2, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_vmap_chunks_and_budget():
    meta = make_meta("metasgd").cuda()
    data = tuple(x.cuda() for x in episodes(T=6, dtype=torch.float64))
    _, _, expected = single_backward(meta, data, strategy="vmap")
    for options in (dict(chunk_size=4), dict(checkpoint=True, max_memory=0.5)):
        result, got = bounded(meta, data, **options)
        assert_same(expected, got)
        assert sum(result.chunks) == 6


def test_second_order_independent_float64_with_long_inner_loop():
    """steps=8 of a tanh MLP, checkpointed and chunked, against the batched path, and
    the first-order result differs (the second-order terms are there)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    meta = fastmeta.MAML(model, lr=0.2, steps=8)
    xs, xq = torch.randn(4, 9, 6, dtype=torch.double), torch.randn(4, 6, 6, dtype=torch.double)
    data = (xs, torch.randint(0, 3, (4, 9)), xq, torch.randint(0, 3, (4, 6)))
    _, _, expected = single_backward(meta, data)
    _, got = bounded(meta, data, checkpoint=True, chunk_size=3)
    assert_same(expected, got)
    _, first = bounded(meta, data, checkpoint=True, first_order=True)
    assert rel(expected, first) > 1e-6


def test_checkpointed_memory_does_not_grow_with_steps():
    """The estimated bytes of one task's graph: without checkpointing they grow with
    every inner step; checkpointed only by a row of fast weights per step."""
    data = episodes(T=2, dtype=torch.float64)
    held = {}
    for steps in (2, 8):
        for checkpoint in (False, True):
            meta = make_meta("maml")
            result = meta.meta_step(
                *data, F.cross_entropy, steps=steps, checkpoint=checkpoint, max_memory=10**9
            )
            held[steps, checkpoint] = result.task_bytes
    assert held[8, False] > 3 * held[2, False]
    row = meta.layout.numel * 8  # one task's fast weights, float64
    assert held[8, True] - held[2, True] <= 6 * row + 1
    assert held[8, True] < held[8, False] / 3


def test_graph_bytes_counts_what_saved_tensor_hooks_see():
    """The graph walk that sizes chunks (it also works under torch.func, where hooks are
    refused) counts the bytes saved-tensor hooks see, each storage once."""
    meta = make_meta("maml", dtype=torch.float32)
    xs, ys, xq, yq = data = episodes(T=2)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner = meta.adapt_batch(xs, ys, F.cross_entropy, strategy="loop")
        loss = F.cross_entropy(learner(xq).flatten(0, 1), yq.flatten())
    outside = [*meta.parameters(), *meta.buffers(), *data]
    excluded = {t.untyped_storage().data_ptr() for t in outside}
    expected = sum(n for ptr, n in saved.items() if ptr not in excluded)
    assert graph_bytes([loss], excluded) == pytest.approx(expected, rel=1e-3)


def test_budget_sizes_chunks_and_is_remembered():
    meta = make_meta("maml")
    data = episodes(T=7, dtype=torch.float64)
    first, _ = bounded(meta, data, max_memory=10**9)
    assert first.chunks == (1, 6)  # one task measured, then the rest at once
    per_task = first.task_bytes * FACTOR
    budget = int((3 + RESERVE + 0.5) * per_task)  # 3 tasks' graphs, the backward's reserve
    again, _ = bounded(meta, data, max_memory=budget)
    assert again.chunks == (3, 3, 1) and again.task_bytes == first.task_bytes
    smaller = episodes(T=7, shots=1, dtype=torch.float64)  # other shapes: measured anew
    assert bounded(meta, smaller, max_memory=budget)[0].chunks[0] == 1
    checkpointed, _ = bounded(meta, data, max_memory=budget, checkpoint=True)
    factor, reserve = SIZING[True]  # its own graph, its own sizing
    fitting = budget // math.ceil(checkpointed.task_bytes * factor) - reserve
    assert checkpointed.task_bytes < first.task_bytes and fitting >= 1
    assert checkpointed.chunks == (1, *[min(fitting, 6 - i) for i in range(0, 6, fitting)])


def test_fraction_of_free_memory(monkeypatch):
    meta = make_meta("maml")
    data = episodes(T=4, dtype=torch.float64)
    task_bytes = bounded(meta, data, max_memory=10**9)[0].task_bytes
    free = 4 * (2 + RESERVE) * math.ceil(task_bytes * FACTOR) + 12
    monkeypatch.setattr(meta_step_module, "free_memory", lambda device: free)
    assert bounded(meta, data, max_memory=0.25)[0].chunks == (2, 2)


def test_budget_too_small_for_one_task_names_the_argument():
    meta = make_meta("maml")
    data = episodes(T=3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"max_memory=1000 \(0\.0 MiB\) is too small for one task"):
        bounded(meta, data, max_memory=1000)
    assert all(p.grad is None for p in meta.parameters())  # nothing accumulated
    with pytest.raises(ValueError, match="or checkpoint=True"):
        bounded(meta, data, max_memory=1000)  # the remembered estimate: the same error


def test_bad_options_name_the_argument():
    meta = make_meta("maml")
    data = episodes(T=3, dtype=torch.float64)
    cases = [
        (dict(chunk_size=2, max_memory=10**9), "chunk_size or max_memory, not both"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
        (dict(max_memory=0), "max_memory must be >= 1 byte"),
        (dict(max_memory=1.5), r"fraction of the free memory in \(0, 1\], got 1.5"),
        (dict(max_memory="4GiB"), "max_memory must be bytes"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(steps=0), "steps must be an integer >= 1"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            meta.meta_step(*data, F.cross_entropy, **options)
    xs, ys, xq, yq = data
    with pytest.raises(ValueError, match=r"query_x must be a tensor \[T = 3, \.\.\.\]"):
        meta.meta_step(xs, ys, xq[:2], yq, F.cross_entropy)


def test_grad_accumulates_once_per_step_and_scales():
    """.grad is accumulated once per meta-step whatever the chunks (so post-accumulate
    hooks, as GradientReducer's, fire once with the total), onto what was there."""
    meta = make_meta("metasgd")
    data = episodes(T=3, dtype=torch.float64)
    _, _, expected = single_backward(meta, data)
    calls = {}

    def count(p):
        calls[id(p)] = calls.get(id(p), 0) + 1

    for p in meta.parameters():
        p.register_post_accumulate_grad_hook(count)
    meta.zero_grad(set_to_none=True)
    calls.clear()
    for options in (dict(chunk_size=1), dict(chunk_size=1, checkpoint=True, scale=2.0)):
        meta.meta_step(*data, F.cross_entropy, **options)
    assert set(calls.values()) == {2} and len(calls) == len(list(meta.parameters()))
    assert_same([3 * g for g in expected], grads(meta))


def test_running_statistics_untouched():
    meta = make_meta("maml")
    bn = meta.module[1]
    before = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    meta.meta_step(*episodes(T=3, dtype=torch.float64), F.cross_entropy, chunk_size=2)
    meta.meta_step(*episodes(T=3, dtype=torch.float64), F.cross_entropy, checkpoint=True)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and bn.track_running_stats


def test_regression_loss_has_no_accuracy():
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    meta = fastmeta.MAML(model, lr=0.01)
    xs, ys, xq, yq = SinusoidTasks(shots=5, queries=5, tasks=4, seed=0).sample()
    result = meta.meta_step(xs, ys, xq, yq, F.mse_loss, chunk_size=3)
    assert result.accuracy is None and result.chunks == (3, 1)
    torch.testing.assert_close(
        result.loss, F.mse_loss(meta.adapt_batch(xs, ys, F.mse_loss)(xq), yq).detach()
    )


# --- the CLI ---------------------------------------------------------------------------

CLI = [
    "--device",
    "cpu",
    "--steps",
    "3",
    "--val-every",
    "3",
    "--val-episodes",
    "4",
    "--test-episodes",
    "4",
    "--tasks",
    "3",
    "--queries",
    "3",
    "--inner-steps",
    "2",
]


def cli_model(out, *options, algorithm="maml"):
    assert main(["train", algorithm, *CLI, "--out", str(out), *options]) == 0
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_cli_bounded_memory_trains_the_same_model(tmp_path, algorithm):
    plain = cli_model(tmp_path / "plain", algorithm=algorithm)
    for i, options in enumerate(
        (["--max-memory", "64MiB"], ["--chunk-size", "2", "--checkpoint-inner"])
    ):
        got = cli_model(tmp_path / str(i), *options, algorithm=algorithm)
        for name in plain:
            torch.testing.assert_close(got[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options,message",
    [
        (["--max-memory", "1.5"], "--max-memory: must be bytes"),
        (["--max-memory", "1GiB", "--chunk-size", "2"], "not allowed with argument"),
        (["--chunk-size", "0"], "--chunk-size: must be an integer >= 1"),
        (["--max-memory", "1KiB"], "max_memory=1024 (0.0 MiB) is too small for one task"),
    ],
)
def test_cli_bad_memory_options_are_one_line_and_exit_2(tmp_path, capsys, options, message):
    assert main(["train", "maml", *CLI, "--out", str(tmp_path), *options]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fastmeta train: error: ") and message in last, last


def test_two_ranks_chunking_their_shares_take_the_steps_of_one_process(tmp_path):
    """3 tasks on 2 ranks (shares of 1 and 2), each rank in chunks of 1 with the inner
    loop checkpointed: the steps of one process on all 3 tasks at once."""
    options = ["--inner-steps", "2"]
    torchrun_train(
        "maml",
        *DIST_TINY,
        *options,
        "--chunk-size",
        "1",
        "--checkpoint-inner",
        "--out",
        str(tmp_path / "two"),
        timeout=300,
    )
    assert main(["train", "maml", *DIST_TINY, *options, "--out", str(tmp_path / "one")]) == 0
    two, one = (
        torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("two", "one")
    )
    for name in one["model"]:
        torch.testing.assert_close(two["model"][name], one["model"][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        two["run"]["history"]["loss"], one["run"]["history"]["loss"], rtol=1e-5, atol=0
    )
