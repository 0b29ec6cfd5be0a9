"""Builds fastmeta._C: C++ CPU kernels always, CUDA kernels when possible.

FASTMETA_CUDA=0 builds without CUDA (quick local builds); FASTMETA_CUDA=1 demands
CUDA and fails if torch or the toolkit lacks it; unset builds CUDA when the
installed torch is a CUDA build and a toolkit (nvcc) is found. TORCH_CUDA_ARCH_LIST
picks the GPU architectures; without it and without a visible GPU we compile for
sm_80 and sm_90 (plus PTX for newer cards).

FASTMETA_SANITIZE=1 builds the CPU kernels only, with AddressSanitizer and UBSan
(-O1, frame pointers, debug info), for `make sanitize`, which builds them into
build/sanitize so that the normal build is left alone.
"""

import glob
import os
import shutil

from setuptools import setup


def _find_cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


# torch.utils.cpp_extension reads CUDA_HOME once, at import: settle it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _switch(name):
    return os.environ.get(name, "").strip().lower()


def _want_cuda():
    switch = _switch("FASTMETA_CUDA")
    available = torch.version.cuda is not None and _cuda_home is not None
    if switch in ("0", "off", "false", "no"):
        return False
    if switch in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                f"FASTMETA_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
                f"CUDA_HOME={_cuda_home!r}: need a CUDA build of torch and nvcc"
            )
        return True
    return available


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    common = dict(
        name="fastmeta._C",
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _switch("FASTMETA_SANITIZE") in ("1", "on", "true", "yes"):
        if _switch("FASTMETA_CUDA") in ("1", "on", "true", "yes"):
            raise RuntimeError(
                "FASTMETA_SANITIZE=1 builds the CPU kernels only: unset FASTMETA_CUDA"
            )
        print("fastmeta: building the C++ CPU kernels with AddressSanitizer and UBSan")
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        common["extra_link_args"] += sanitize
        cxx = ["-O1", "-g", "-std=c++20", "-fopenmp", *sanitize]
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)
    if not _want_cuda():
        print("fastmeta: building the C++ CPU kernels only")
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    print(
        f"fastmeta: building CPU and CUDA kernels (CUDA_HOME={_cuda_home}, "
        f"archs={os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')})"
    )
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        sources=sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("FASTMETA_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        **common,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
