"""Bad input found by probing as an adversarial user: each case gave a crash, garbage
or a silent wrong answer before its fix, and now gives the reference's answer or a
clear error naming the argument."""

import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as TF

import fastmeta
from fastmeta import backend, cpu_pool
from fastmeta import functional as F
from fastmeta.ops import attention_read, gradient_mlp, inner_update
from fastmeta.ops.bn_relu_pool import bn_relu_pool
from fastmeta.ops.conv_block import conv_block


def _episode():
    support, queries = torch.randn(1, 4, 3), torch.randn(1, 3, 3)
    return support, torch.tensor([[0, 1, 0, 1]]), queries, torch.tensor([[0, 1, 1]])


def _mlp(device="cpu"):
    return [
        t.to(device) for t in (torch.randn(4, 2), torch.randn(4), torch.randn(4), torch.randn(()))
    ]


# One argument on the meta device made torch run the op's fake kernel for real: the
# result was uninitialized memory (losses like 7.4e36) or a meta tensor.
MIXED_META = {
    "prototypical_loss, support on meta": lambda: F.prototypical_loss(
        *((t.to("meta") if i == 0 else t) for i, t in enumerate(_episode())), 2
    ),
    "class_prototypes, labels on meta": lambda: F.class_prototypes(
        torch.randn(1, 4, 3), torch.tensor([[0, 1, 0, 1]], device="meta"), 2
    ),
    "gradient_mlp, w1 on meta": lambda: gradient_mlp(
        torch.randn(5), _mlp()[0].to("meta"), *_mlp()[1:]
    ),
    "attention_read, x on meta": lambda: attention_read(
        torch.rand(1, 2, 3), torch.randn(1, 3, 4, 5), torch.randn(1, 2, 1, 5, device="meta")
    ),
    "inner_update, g on meta": lambda: inner_update(
        torch.randn(6), 0.1, torch.randn(2, 6, device="meta")
    ),
}


@pytest.mark.parametrize("case", sorted(MIXED_META))
def test_an_argument_on_meta_among_real_ones_is_an_error(case):
    with pytest.raises(ValueError) as raised:
        MIXED_META[case]()
    message = str(raised.value)  # the op's own device check, or the fake kernels' one
    assert "meta" in message and ("must share a device" in message or " but " in message)


@pytest.mark.op("gradient_mlp")
def test_gradient_mlp_keeps_a_nan_gradient_nan(backend_device):
    """The cpu kernel's relu (s > 0 ? s : 0) and Triton's maximum turned NaN into 0."""
    name, device = backend_device
    grads = torch.tensor([math.nan, 1.0, 1e-9, -3.0], device=device)
    parameters = _mlp(device)
    with fastmeta.use_backend(name):
        out = gradient_mlp(grads, *parameters)
    with fastmeta.use_backend("reference"):
        want = gradient_mlp(grads, *parameters)
    assert out[0].isnan() and torch.isfinite(out[1:]).all()
    torch.testing.assert_close(out[1:], want[1:])


def test_num_classes_beyond_the_support_size_is_an_error_before_any_allocation():
    """num_classes = 10**9 with 4 support rows allocated gigabytes before failing;
    2**63 gave a confusing type error."""
    support, ys, queries, yq = _episode()
    with pytest.raises(ValueError, match="num_classes=1000000000 exceeds the 4 support examples"):
        F.prototypical_loss(support, ys, queries, yq, 10**9)
    with pytest.raises(ValueError, match="num_classes must fit in int64"):
        F.class_prototypes(support, ys, 2**63)


@pytest.mark.parametrize(
    "x_shape, w_shape", [((2, 0, 6, 5), (3, 0, 3, 3)), ((2, 1, 0, 5), (3, 1, 1, 1))]
)
def test_a_convolution_without_input_taps_or_pixels_is_an_error(x_shape, w_shape):
    """Cin = 0 passed the checks and the cpu backward without d_x divided by zero
    (SIGFPE: the process died); H = 0 with padding gave NaN statistics on cpu and an
    error from ATen's convolution on the reference."""
    x, weight = torch.randn(x_shape), torch.randn(w_shape, requires_grad=True)
    with pytest.raises(ValueError, match="need Cin, H, W, KH, KW >= 1"):
        conv_block(x, weight, None, None, None)  # the op's check, before any backend
    if fastmeta.backends().extension_built:  # the kernel's own guard
        with pytest.raises(RuntimeError, match="conv_block_backward: x's Cin, H, W and weight"):
            torch.ops.fastmeta_C.conv_block_backward(
                torch.zeros(2, 3, 3, 2),
                x,
                weight.detach(),
                *torch.zeros(5, 3),
                torch.zeros(2, 3, 3, 2, dtype=torch.uint8),
                torch.zeros(2, 3, 3, 2),
                1,
                1,
                False,
            )


@pytest.mark.parametrize("eps", [-1.0, math.nan, math.inf])
def test_a_batch_norm_eps_must_be_a_finite_number_at_least_zero(eps):
    c, gamma, beta = torch.randn(2, 4, 6, 6), torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="fastmeta.bn_relu_pool: eps must be a finite number"):
        torch.ops.fastmeta.bn_relu_pool(c, gamma, beta, eps)
    x, weight, bias = torch.randn(2, 1, 6, 6), torch.randn(4, 1, 3, 3), torch.zeros(4)
    with pytest.raises(ValueError, match="fastmeta.conv_block: eps must be a finite number"):
        torch.ops.fastmeta.conv_block(x, weight, bias, gamma, beta, [1, 1], eps)
    bn_relu_pool(c, gamma, beta, eps=0.0)  # 0 is allowed (torch's batch norm takes it)
    conv_block(x, weight, bias, gamma, beta, padding=(1, 1), eps=0.0)


@pytest.mark.parametrize(
    "lr, error, message",
    [
        ("0.4", TypeError, "MAML: lr must be a number, got str '0.4'"),
        (True, TypeError, "MAML: lr must be a number, got bool"),
        (math.nan, ValueError, "MAML: lr must be finite, got nan"),
        ([0.4, math.inf], ValueError, r"MAML: lr\[1\] must be finite, got inf"),
        ([], ValueError, "MAML: lr must hold one rate per inner step, got an empty sequence"),
    ],
)
def test_maml_rejects_a_learning_rate_it_cannot_use(lr, error, message):
    """lr="0.4" adapted silently with lr 0.0 (the string was read as per-step rates)."""
    with pytest.raises(error, match=message):
        fastmeta.MAML(torch.nn.Linear(3, 2), lr=lr)


def test_maml_takes_a_one_element_tensor_learning_rate():
    """lr=torch.tensor(0.4) failed with "len() of a 0-d tensor"."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    xs, ys = torch.randn(2, 4, 3), torch.randint(0, 2, (2, 4))
    outputs = [
        fastmeta.MAML(model, lr=lr).adapt_batch(xs, ys, TF.cross_entropy)(xs)
        for lr in (torch.tensor(0.4), 0.4)
    ]
    torch.testing.assert_close(*outputs)
    with pytest.raises(TypeError, match="MetaSGD: lr must be a number"):
        fastmeta.MetaSGD(model, lr="0.4")


@pytest.mark.parametrize("empty", ["episodes", "queries"])
def test_the_mean_loss_of_no_query_is_an_error_not_nan(empty):
    support, ys, queries, yq = _episode()
    if empty == "episodes":
        support, ys, queries, yq = (t[:0] for t in (support, ys, queries, yq))
    else:
        queries, yq = queries[:, :0], yq[:, :0]
    with pytest.raises(ValueError, match="reduction='mean' over no query"):
        F.prototypical_loss(support, ys, queries, yq, 2)
    losses, _ = F.prototypical_loss(support, ys, queries, yq, 2, reduction="none")
    assert losses.numel() == 0


def test_use_backend_blocks_of_two_threads_leave_each_other_s_choice_in_place():
    """A block's exit popped whatever was on top: thread A leaving removed thread B's
    choice, and B's calls then ran on the default backend."""
    entered, a_left, b_checked = (threading.Event() for _ in range(3))
    seen = {}

    def thread_a():
        with fastmeta.use_backend("cpu"):
            entered.wait()
        a_left.set()

    def thread_b():
        with fastmeta.use_backend("reference"):
            entered.set()
            a_left.wait()
            seen["forced"] = backend.forced_backend()
        b_checked.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    threads[0].start()
    while not backend._forced_stack:  # A's block is open
        time.sleep(0.001)
    threads[1].start()
    for t in threads:
        t.join(timeout=10)
    assert seen["forced"] == ("reference", "fastmeta.use_backend")
    assert backend.forced_backend() is None or backend.forced_backend()[1] != "fastmeta.use_backend"


@pytest.mark.parametrize("value", ["-5", "abc", str(2**44), "1.5", ""])
def test_a_bad_cpu_pool_setting_is_an_error(value, monkeypatch):
    """The C++ pool read these silently as 1024 MiB (2**44 would overflow its bytes)."""
    monkeypatch.setenv("FASTMETA_CPU_POOL_MB", value)
    with pytest.raises(ValueError, match="FASTMETA_CPU_POOL_MB must be a whole number of MiB"):
        cpu_pool.check_pool_setting()
    monkeypatch.setenv("FASTMETA_CPU_POOL_MB", "0")
    cpu_pool.check_pool_setting()


def test_fastmeta_checks_the_cpu_pool_setting_at_import():
    env = {**os.environ, "FASTMETA_CPU_POOL_MB": "abc"}
    done = subprocess.run(
        [sys.executable, "-c", "import fastmeta"], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "got 'abc'" in done.stderr


def test_maml_without_a_task_or_a_parameter_to_adapt_says_so():
    """Both failed deep inside (torch.stack / torch.cat on empty lists)."""
    xs, ys = torch.randn(0, 4, 3), torch.zeros(0, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"no task to adapt: support_x \[0, 4, 3\] \(T = 0\)"):
        fastmeta.MAML(torch.nn.Linear(3, 2), lr=0.1).adapt_batch(xs, ys, TF.cross_entropy)
    frozen = torch.nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="MAML: no parameter to adapt"):
        fastmeta.MAML(frozen, lr=0.1)
    with pytest.raises(ValueError, match="MetaSGD: no parameter to adapt"):
        fastmeta.MetaSGD(torch.nn.Linear(3, 2), adapt=lambda name, p: False)


def test_metanetwork_bad_ways_empty_episodes_and_int32_labels():
    """ways=0 and B = 0 failed deep inside; int32 labels failed in cross_entropy."""
    with pytest.raises(ValueError, match="ways must be an int >= 1, got 0"):
        fastmeta.MetaNetwork(ways=0)
    torch.manual_seed(0)
    model = fastmeta.MetaNetwork(ways=3)
    xs, xq = torch.randn(1, 3, 1, 28, 28), torch.randn(1, 2, 1, 28, 28)
    ys, yq = torch.arange(3)[None], torch.tensor([[2, 0]])
    with pytest.raises(ValueError, match=r"needs at least one episode \(B\)"):
        model.loss(xs[:0], ys[:0], xq[:0], yq[:0])
    int64 = model.loss(xs, ys, xq, yq)
    int32 = model.loss(xs, ys.int(), xq, yq.int())
    for a, b in zip(int64, int32):
        torch.testing.assert_close(a, b)


@pytest.mark.op("prototypical_cross_entropy")
@pytest.mark.parametrize("classes", [3, 20])  # the cpu kernel has a path for C <= 16
def test_a_nan_logit_is_the_prediction_as_in_torch_argmax(backend_device, classes):
    """Found by fuzzing: with an inf support value (a NaN logit for some queries) the cpu
    kernel predicted the largest finite logit (accuracy 1.0) where torch.argmax, and so
    the reference, picks the first NaN (accuracy 0.0)."""
    name, device = backend_device
    torch.manual_seed(0)
    queries, prototypes = torch.randn(2, 5, 4), torch.randn(2, classes, 4)
    prototypes[0, 2, 1] = math.nan  # every query's logit for class 2 is NaN
    prototypes[1, classes - 1, 0] = math.nan
    labels = torch.zeros(2, 5, dtype=torch.long)
    args = (queries, prototypes, labels, torch.tensor(1.0))
    with fastmeta.use_backend(name):
        _, predictions, _ = torch.ops.fastmeta.prototypical_cross_entropy(
            *(t.to(device) for t in args)
        )
    assert predictions[0].tolist() == [2] * 5
    assert predictions[1].tolist() == [classes - 1] * 5
