"""How fastmeta._C is compiled: sources, flags, CUDA or not. One definition for both
builds: setup.py (at install, loads this file by path: it cannot import the package)
and the compile on first use (fastmeta/_jit.py). Standard library only at import;
the functions that need torch take it as an argument.

FASTMETA_CUDA=0 builds without CUDA; FASTMETA_CUDA=1 demands CUDA and fails if torch
or the toolkit lacks it; unset builds CUDA when torch is a CUDA build and nvcc is
found. TORCH_CUDA_ARCH_LIST picks the GPU architectures; without it and without a
visible GPU, sm_80 and sm_90 (plus PTX for newer cards).
"""

import glob
import os
import shutil

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
LINK_FLAGS = ["-fopenmp"]
CUDA_MACRO = "FASTMETA_WITH_CUDA"
DEFAULT_ARCHS = "8.0;9.0+PTX"  # no TORCH_CUDA_ARCH_LIST and no visible GPU
BUILD_INFO = "_C.build.json"  # beside fastmeta/_C*.so: the torch it was built against
ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")


def switch(name: str) -> str:
    """An environment switch, stripped and lower-cased ("" when unset)."""
    return os.environ.get(name, "").strip().lower()


def find_cuda_home() -> str | None:
    """CUDA_HOME, CUDA_PATH, /usr/local/cuda or the nvcc on PATH: the first with nvcc."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def settle_cuda_home() -> str | None:
    """Sets CUDA_HOME for torch.utils.cpp_extension, which reads it once, at import:
    call before importing it."""
    home = find_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
    return home


def want_cuda(torch) -> bool:
    """Whether to compile the CUDA kernels (FASTMETA_CUDA, else: can we?)."""
    value = switch("FASTMETA_CUDA")
    cuda_home = find_cuda_home()
    available = torch.version.cuda is not None and cuda_home is not None
    if value in OFF:
        return False
    if value in ON:
        if not available:
            raise RuntimeError(
                f"FASTMETA_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
                f"CUDA_HOME={cuda_home!r}: install a CUDA build of torch and the CUDA "
                "toolkit (nvcc), or unset FASTMETA_CUDA to build the CPU kernels only"
            )
        return True
    return available


def arch_list(torch) -> str | None:
    """TORCH_CUDA_ARCH_LIST to compile for (None: the visible GPU's, torch's default)."""
    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    return None if torch.cuda.is_available() else DEFAULT_ARCHS


def sources(root: str, with_cuda: bool) -> list[str]:
    """The files compiled, relative to root (the folder holding csrc/), sorted."""
    found = sorted(
        glob.glob("csrc/*.cpp", root_dir=root) + glob.glob("csrc/cpu/*.cpp", root_dir=root)
    )
    if with_cuda:
        found += sorted(glob.glob("csrc/cuda/*.cu", root_dir=root))
    return found
