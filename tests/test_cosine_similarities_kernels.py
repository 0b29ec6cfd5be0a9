"""The cosine_similarities forward kernels, called directly (not through an op):
torch.ops.fastmeta_C.cosine_similarities_forward (csrc/cpu, csrc/cuda) and
fastmeta.kernels.cosine_similarities_triton (compiled on CUDA, or CPU float32 under the
Triton interpreter), each where it can run here, against a float64 reference:

    s[b, m, k] = (q_bm . c_bk) / (max(||q_bm||, eps) max(||c_bk||, eps))

Inputs are fresh random rows with norms spread over six decades, on odd sizes (D = 1,
C = 1, and M or C = 129 queries or classes with D = 257: partial tiles, several tiles
and D steps on a GPU and under the interpreter), rows of norm 0 and below eps, and
empty extents. conftest.py fills torch.empty with NaN, so an entry a
kernel leaves unwritten fails rel_err.
"""

import pytest
import torch
from conftest import COMPILED, rel_err

from fastmeta import _extension
from fastmeta.kernels.interpreter import triton_interpreter, triton_version

EPS = 1e-8
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative, in the Frobenius norm
# (B, M, C, D)
SHAPES = [(3, 7, 5, 33), (2, 4, 3, 1), (2, 6, 1, 17), (2, 129, 65, 257), (1, 65, 129, 257)]
EMPTY_SHAPES = [(0, 4, 3, 5), (2, 0, 3, 5), (2, 4, 0, 5), (2, 4, 3, 0)]


def extension_forward(queries, prototypes, eps):
    return torch.ops.fastmeta_C.cosine_similarities_forward(queries, prototypes, eps)


def triton_forward(queries, prototypes, eps):
    from fastmeta.kernels.cosine_similarities_triton import cosine_similarities_forward

    return cosine_similarities_forward(queries, prototypes, eps)


def unavailable_reason(kernel: str, device: str) -> str | None:
    """Why `kernel` ("extension" or "triton") cannot run on `device` here, or None."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        return "no CUDA GPU is visible"
    if kernel == "extension":
        if not COMPILED:
            return f"fastmeta._C is not built ({_extension.LOAD_ERROR})"
        if device == "cuda" and not _extension.WITH_CUDA:
            return "fastmeta._C was built without its CUDA kernels"
        return None
    if triton_version() is None:
        return "triton is not installed"
    if device == "cpu" and not triton_interpreter():
        return "triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    return None


def kernel_cases():
    """(forward, device, dtype) for every kernel and device, skipped where unusable;
    the Triton kernel takes float32 only."""
    cases = []
    for kernel, forward, dtypes in (
        ("extension", extension_forward, (torch.float32, torch.float64)),
        ("triton", triton_forward, (torch.float32,)),
    ):
        for device in ("cpu", "cuda"):
            reason = unavailable_reason(kernel, device)
            cases += [
                pytest.param(
                    forward,
                    device,
                    dtype,
                    id=f"{kernel}-{device}-{str(dtype).removeprefix('torch.')}",
                    marks=pytest.mark.skipif(reason is not None, reason=reason or ""),
                )
                for dtype in dtypes
            ]
    return cases


CASES = kernel_cases()


def cosine_float64(queries, prototypes, eps):
    """Rows normalized by their norms clamped to eps, then a bmm, all in float64 on CPU."""
    q, c = queries.detach().cpu().double(), prototypes.detach().cpu().double()
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
    c = c / c.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.bmm(q, c.transpose(1, 2))


def random_rows(*shape):
    """float64 [..., N, D] Gaussian rows scaled by 10^u, u uniform in [-3, 3)."""
    return torch.randn(*shape, dtype=torch.float64) * 10 ** (6 * torch.rand(*shape[:-1], 1) - 3)


def run(forward, queries, prototypes, eps, device, dtype):
    """forward on (queries, prototypes) cast to dtype on device; checks the output's
    shape, dtype and device and returns it with the float64 reference of the cast inputs."""
    queries, prototypes = queries.to(device, dtype), prototypes.to(device, dtype)
    sim = forward(queries, prototypes, eps)
    B, M, C = queries.shape[0], queries.shape[1], prototypes.shape[1]
    assert sim.shape == (B, M, C) and sim.dtype == dtype and sim.device.type == device
    return sim, cosine_float64(queries, prototypes, eps)


@pytest.mark.parametrize("forward,device,dtype", CASES)
@pytest.mark.parametrize("B,M,C,D", SHAPES)
def test_matches_float64(forward, device, dtype, B, M, C, D):
    sim, expected = run(forward, random_rows(B, M, D), random_rows(B, C, D), EPS, device, dtype)
    assert rel_err(sim, expected) < TOL[dtype]


@pytest.mark.parametrize("forward,device,dtype", CASES)
def test_rows_of_norm_zero_and_below_eps(forward, device, dtype):
    """Zero rows give exactly 0 (not NaN); rows of norm eps/4 and eps/2 are divided by
    eps, not by their norms (the norm is clamped, not its square)."""
    queries, prototypes = random_rows(3, 7, 33), random_rows(3, 5, 33)
    queries[0, 0] = 0
    prototypes[1, 2] = 0
    queries[2, 3] *= EPS / 4 / queries[2, 3].norm()
    prototypes[2, 4] *= EPS / 2 / prototypes[2, 4].norm()
    sim, expected = run(forward, queries, prototypes, EPS, device, dtype)
    assert torch.equal(sim[0, 0].cpu(), torch.zeros(5, dtype=dtype))
    assert torch.equal(sim[1, :, 2].cpu(), torch.zeros(7, dtype=dtype))
    assert rel_err(sim, expected) < TOL[dtype]
    # the clamped rows' entries, on their own (both clamped where they meet)
    assert rel_err(sim[2, 3], expected[2, 3]) < TOL[dtype]
    assert rel_err(sim[2, :, 4], expected[2, :, 4]) < TOL[dtype]


@pytest.mark.parametrize("forward,device,dtype", CASES)
def test_eps_is_the_callers(forward, device, dtype):
    """eps = 0.5 with row norms spread over about [0.1, 1.2]: some clamped, some not."""
    queries = torch.randn(2, 9, 33, dtype=torch.float64) * (0.02 + 0.18 * torch.rand(2, 9, 1))
    prototypes = torch.randn(2, 6, 33, dtype=torch.float64) * (0.02 + 0.18 * torch.rand(2, 6, 1))
    sim, expected = run(forward, queries, prototypes, 0.5, device, dtype)
    assert rel_err(sim, expected) < TOL[dtype]


@pytest.mark.parametrize("forward,device,dtype", CASES)
@pytest.mark.parametrize("B,M,C,D", EMPTY_SHAPES)
def test_empty_extents(forward, device, dtype, B, M, C, D):
    """An empty output is returned as is; D = 0 gives zeros (0 / eps^2)."""
    sim, expected = run(forward, torch.randn(B, M, D), torch.randn(B, C, D), EPS, device, dtype)
    assert torch.equal(sim.cpu(), expected.to(dtype))


@pytest.mark.skipif(not COMPILED, reason="fastmeta._C is not built")
def test_extension_rejects_mismatched_arguments():
    q = torch.randn(2, 3, 4)
    for prototypes in (
        torch.randn(2, 5, 3),
        torch.randn(1, 5, 4),
        torch.randn(2, 4, 5).mT,
        torch.randn(2, 5, 4, dtype=torch.float64),
    ):
        with pytest.raises(RuntimeError, match="cosine_similarities"):
            extension_forward(q, prototypes, EPS)
