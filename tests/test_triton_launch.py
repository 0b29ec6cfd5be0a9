"""Every public Triton wrapper launches on its inputs' device (fastmeta/kernels/launch.py):
a Triton launch otherwise goes to the current CUDA device, the wrong GPU for cuda:1
inputs. Runs where the triton backend does: CPU float32 tensors under the interpreter,
or CUDA tensors. tests/test_gpu_kernels.py runs the wrappers on cuda:1 where a machine
has two GPUs."""

import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastmeta import backend
from fastmeta.kernels import (
    cosine_similarities_triton,
    gradient_lstm_triton,
    inner_update_triton,
    launch,
    metanet_triton,
    protonet_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULES = (
    cosine_similarities_triton,
    gradient_lstm_triton,
    inner_update_triton,
    metanet_triton,
    protonet_triton,
)


def public_wrappers() -> set[str]:
    """module.name of every public Python function defined in the Triton kernel modules."""
    return {
        f"{m.__name__}.{name}"
        for m in MODULES
        for name, fn in vars(m).items()
        if inspect.isfunction(fn) and fn.__module__ == m.__name__ and not name.startswith("_")
    }


def wrapper_calls(device: str) -> dict:
    """Each public wrapper with small float32 arguments on `device`."""

    def randn(*shape):
        return torch.randn(*shape, device=device)

    grads, w1, b1, w2, b2 = randn(3, 5), randn(4, 2), randn(4), randn(4), randn(())
    attention = torch.softmax(randn(1, 2, 3), -1)
    weights, x, d_read = randn(1, 3, 4, 5), randn(1, 2, 2, 5), randn(1, 2, 2, 4)
    support, prototypes, queries = randn(1, 4, 3), randn(1, 2, 3), randn(1, 3, 3)
    support_labels = torch.tensor([[0, 1, 0, 1]], device=device)
    query_labels = torch.tensor([[1, 0, 1]], device=device)
    tau, softmax = torch.tensor(0.5, device=device), torch.softmax(randn(1, 3, 2), -1)
    theta, alpha, g = randn(6), torch.tensor(0.1, device=device), randn(2, 6)
    lstm = (randn(2, 3, 5), randn(8, 2), randn(8, 2), randn(8), randn(2))  # grads, w_ih .. w_out
    calls = {
        gradient_lstm_triton.gradient_lstm_forward: (*lstm, randn(()), 10.0),
        gradient_lstm_triton.gradient_lstm_backward: (randn(2, 5), *lstm, 10.0, True),
        metanet_triton.gradient_mlp_forward: (grads, w1, b1, w2, b2, 10.0),
        metanet_triton.gradient_mlp_backward: (randn(3, 5), grads, w1, b1, w2, 10.0, True),
        metanet_triton.attention_read_forward: (attention, weights, x),
        metanet_triton.attention_read_backward: (d_read, attention, weights, x, True, True, True),
        protonet_triton.class_prototypes_forward: (support, support_labels, 2),
        protonet_triton.class_prototypes_backward: (prototypes, support_labels),
        protonet_triton.squared_distances_forward: (queries, prototypes),
        cosine_similarities_triton.cosine_similarities_forward: (queries, prototypes, 1e-8),
        protonet_triton.prototypical_cross_entropy_forward: (
            queries,
            prototypes,
            query_labels,
            tau,
        ),
        protonet_triton.prototypical_cross_entropy_backward: (
            randn(1, 3),
            queries,
            prototypes,
            query_labels,
            tau,
            softmax,
        ),
        inner_update_triton.inner_update_forward: (theta, alpha, g),
        inner_update_triton.inner_update_backward: (randn(2, 6), alpha, g, True, True),
    }
    return {f"{fn.__module__}.{fn.__name__}": (fn, args) for fn, args in calls.items()}


@pytest.mark.skipif(
    backend.unavailable_reason("triton", DEVICE, torch.float32) is not None,
    reason=f"triton cannot run on {DEVICE} here: "
    f"{backend.unavailable_reason('triton', DEVICE, torch.float32)}",
)
def test_every_triton_wrapper_enters_the_cuda_device_guard_of_its_inputs(monkeypatch):
    seen = []
    guard = launch.on_device

    def recording(tensor):
        seen.append(tensor.device)
        return guard(tensor)

    monkeypatch.setattr(launch, "on_device", recording)
    calls = wrapper_calls(DEVICE)
    assert set(calls) == public_wrappers()
    for name, (fn, args) in calls.items():
        seen.clear()
        fn(*args)
        assert seen == [args[0].device], name


def test_on_device_makes_a_cuda_tensors_device_current():
    """A cuda:1 tensor (fake: no GPU needed) gets a guard for device 1, a CPU tensor a
    guard that does nothing (device index -1)."""
    with FakeTensorMode():
        on_second_gpu = torch.empty(2, device="cuda:1")
    guard = launch.on_device(on_second_gpu)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert launch.on_device(torch.empty(2)).idx == -1
