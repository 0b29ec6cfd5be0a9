"""Backend registry: report, forcing, errors for unavailable backends."""

import os

import pytest
import torch
from conftest import COMPILED

import fastmeta
from fastmeta import backend
from fastmeta.ops import gradient_mlp

needs_extension = pytest.mark.skipif(not COMPILED, reason="needs fastmeta._C (the cpu backend)")


@needs_extension
def test_report_says_what_was_built_and_what_runs():
    report = fastmeta.backends()
    assert report.extension_built, report.extension_error
    if os.environ.get("FASTMETA_CUDA") == "1":  # CI builds with FASTMETA_CUDA=1
        assert report.extension_with_cuda
    assert report.usable["reference"] is None and report.usable["cpu"] is None
    assert report.ops["inner_update"]["cpu"] == "cpu"
    if not torch.cuda.is_available():
        assert report.gpu is None and report.ops["inner_update"]["cuda"] is None
        expected = "no CUDA GPU" if report.extension_with_cuda else "built without CUDA"
        assert expected in report.usable["cuda"]
    text = str(report)
    assert "fastmeta._C" in text and "inner_update" in text


@needs_extension
def test_default_backend_is_recorded():
    fastmeta.inner_update(torch.randn(3), 0.1, torch.randn(2, 3))
    assert fastmeta.last_backend("inner_update") == "cpu"


def test_unknown_backend_is_an_error():
    with pytest.raises(fastmeta.BackendUnavailableError, match="unknown backend 'gpu'"):
        with fastmeta.use_backend("gpu"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@needs_extension
def test_forcing_cuda_without_gpu_is_an_error():
    reason = "no CUDA GPU is visible" if fastmeta.backends().extension_with_cuda else "without CUDA"
    with pytest.raises(fastmeta.BackendUnavailableError, match=reason):
        with fastmeta.use_backend("cuda"):
            pass


def test_forced_backend_that_cannot_take_the_call_is_an_error():
    if backend.unavailable_reason("triton") is not None:
        pytest.skip("triton not usable here")
    theta, g = torch.randn(3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    if torch.cuda.is_available():
        pytest.skip("triton takes float64 on a GPU")
    with fastmeta.use_backend("triton"):
        with pytest.raises(
            fastmeta.BackendUnavailableError, match="float32, float16 and bfloat16 only"
        ):
            fastmeta.inner_update(theta, 0.1, g)


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    fastmeta.inner_update(torch.randn(3), 0.1, torch.randn(2, 3))
    assert fastmeta.last_backend("inner_update") == "reference"
    assert "FASTMETA_BACKEND" in str(fastmeta.backends())
    monkeypatch.setenv(backend.ENV_VAR, "nonsense")
    with pytest.raises(fastmeta.BackendUnavailableError, match="forced by FASTMETA_BACKEND"):
        fastmeta.inner_update(torch.randn(3), 0.1, torch.randn(2, 3))


@needs_extension
def test_context_manager_nests_and_restores():
    with fastmeta.use_backend("reference"):
        with fastmeta.use_backend("cpu"):
            fastmeta.inner_update(torch.randn(3), 0.1, torch.randn(2, 3))
            assert fastmeta.last_backend("inner_update") == "cpu"
        fastmeta.inner_update(torch.randn(3), 0.1, torch.randn(2, 3))
        assert fastmeta.last_backend("inner_update") == "reference"
    assert backend.forced_backend() is None


@needs_extension
def test_large_cpu_outputs_reuse_pooled_buffers():
    fastmeta.empty_cpu_cache()  # an idle buffer of the same size would be handed out first
    theta, g = torch.randn(1_000_003), torch.randn(4, 1_000_003)  # 16 MB output
    with fastmeta.use_backend("cpu"):
        first = fastmeta.inner_update(theta, 0.5, g)
        address = first.data_ptr()
        expected = theta - 0.5 * g
        del first
        second = fastmeta.inner_update(theta, 0.5, g)
    assert second.data_ptr() == address
    assert torch.equal(second, expected)
    del second
    assert fastmeta.empty_cpu_cache() >= 16 * 2**20
    assert fastmeta.empty_cpu_cache() == 0


@needs_extension
def test_report_lists_the_dtypes_that_fall_back_to_the_reference():
    report = fastmeta.backends()
    why = "cpu: its gradient_mlp kernels take float32, float64"
    assert report.fallbacks["gradient_mlp"]["cpu"] == {torch.float16: why, torch.bfloat16: why}
    assert "inner_update" not in report.fallbacks  # its cpu kernels take every dtype
    assert "class_prototypes" not in report.fallbacks  # half runs the float32 kernels
    assert f"  gradient_mlp             cpu float16, bfloat16 ({why})" in str(report)


@needs_extension
def test_a_call_that_falls_back_to_the_reference_is_recorded(monkeypatch):
    monkeypatch.setattr(backend, "_fallbacks_seen", {})
    grads = torch.randn(5, 3, dtype=torch.bfloat16)
    parameters = [torch.randn(shape, dtype=torch.bfloat16) for shape in ((4, 2), (4,), (4,), ())]
    with fastmeta.use_backend("reference"):  # forced: not a fallback
        gradient_mlp(grads, *parameters)
    assert "fallbacks to the reference seen in this process: none" in str(fastmeta.backends())
    gradient_mlp(grads, *parameters)
    assert fastmeta.last_backend("gradient_mlp") == "reference"
    report = fastmeta.backends()
    why = "cpu: its gradient_mlp kernels take float32, float64"
    assert report.fallbacks_seen == {("gradient_mlp", "cpu", torch.bfloat16): why}
    assert (
        f"fallbacks to the reference seen in this process:\n  gradient_mlp cpu bfloat16 "
        f"({why})" in str(report)
    )
