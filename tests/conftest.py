"""Test setup: Triton's interpreter on GPU-less machines, backend parametrization.

TRITON_INTERPRET must be set before any Triton kernel is defined, so this file sets
it before fastmeta is imported. Op tests take the `backend_device` fixture, which
runs them once per (backend, device) pair usable on this machine for the op named
by the test's `@pytest.mark.op(name)` marker (or its module's OP).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastmeta  # noqa: E402
from fastmeta import backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
COMPILED = fastmeta.backends().extension_built  # fastmeta._C loaded: the cpu backend runs
CPU_KERNEL = "cpu" if COMPILED else None  # what a fused CPU path records, built or not


def usable_backend_devices(op: str):
    """(backend, device) pairs that can run `op` here (float32)."""
    pairs = []
    for device in DEVICES:
        for name in backend.op_backends(op):
            if backend.op_unavailable_reason(op, name, device, torch.float32) is None:
                pairs.append((name, device))
    return pairs


def pytest_configure(config):
    config.addinivalue_line("markers", "op(name): the op a backend_device test runs")


def pytest_generate_tests(metafunc):
    if "backend_device" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("op")
        op = marker.args[0] if marker else metafunc.module.OP
        pairs = usable_backend_devices(op)
        metafunc.parametrize("backend_device", pairs, ids=[f"{b}-{d}" for b, d in pairs])


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """torch.empty (in Python or C++) fills new tensors with NaN: unwritten outputs show."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def racing(monkeypatch):
    """Backend races allowed: deterministic algorithms off (the fixture above turns them
    on, and they stop races), FASTMETA_RACE unset, no race remembered before or after."""
    from fastmeta import race

    monkeypatch.delenv(race.ENV_VAR, raising=False)
    torch.use_deterministic_algorithms(False)
    race.clear()
    yield
    race.clear()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN never passes)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    return float("inf") if torch.isnan(err) else float(err)


__all__ = ["COMPILED", "CPU_KERNEL", "fastmeta", "rel_err"]
