"""Builds fastmeta: the Python package, and fastmeta._C (C++ CPU kernels always, CUDA
kernels when possible) when torch is importable here.

torch is importable in a build without isolation (`pip install --no-build-isolation
.`, `python setup.py build_ext --inplace`, `make`): fastmeta._C is compiled now,
against that torch, and `_C.build.json` beside it records which. Under pip's build
isolation (a plain `pip install .`, `python -m build`) torch is not importable (it is
not a build requirement, so that pip never fetches a second one): the package is
built without fastmeta._C and compiles it on first use against the torch it imports
(fastmeta/_jit.py). Every wheel carries csrc/ (as fastmeta/_sources/csrc) for that.

Flags, sources and the FASTMETA_CUDA / TORCH_CUDA_ARCH_LIST switches: fastmeta/_build.py.
FASTMETA_SANITIZE=1 builds the CPU kernels only, with AddressSanitizer and UBSan
(-O1, frame pointers, debug info), for `make sanitize`, which builds them into
build/sanitize so that the normal build is left alone.
"""

import importlib.util
import json
import os
import shutil
import sys
import sysconfig

import setuptools
from setuptools import setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_fastmeta_build", f"{HERE}/fastmeta/_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

build.settle_cuda_home()  # before torch.utils.cpp_extension is imported
try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ModuleNotFoundError as error:
    if error.name != "torch":
        raise
    torch = None


class build_py(_build_py):
    """Also copies csrc/ into the package (fastmeta/_sources/csrc), for the compile on
    first use; not for an editable install, which compiles from the checkout's csrc/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not os.path.isdir(f"{HERE}/csrc"):
            return
        target = os.path.join(self.build_lib, "fastmeta", "_sources", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(f"{HERE}/csrc", target)


def _build_ext_class():
    base = BuildExtension.with_options(use_ninja=True) if torch else _build_ext

    class build_ext(base):
        """Also writes _C.build.json beside fastmeta._C: the torch it was built against
        (fastmeta/_extension.py does not load it into another torch). An editable
        install compiles in build/temp.* as the other builds do, not in a new temporary
        folder: ninja then recompiles only what changed, and a wheel built after
        `make` (the CI's install matrix) reuses its objects."""

        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                plat = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
                self.build_temp = os.path.join(HERE, "build", f"temp.{plat}")

        def run(self):
            super().run()
            for ext in self.extensions:
                info = {
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "with_cuda": any(m == (build.CUDA_MACRO, None) for m in ext.define_macros),
                }
                path = os.path.join(
                    os.path.dirname(self.get_ext_fullpath(ext.name)), build.BUILD_INFO
                )
                with open(path, "w") as file:
                    json.dump(info, file)

    return build_ext


def _extensions():
    if torch is None:
        print(
            "fastmeta: torch is not importable in this build environment (pip's build "
            "isolation, or no torch): building without fastmeta._C; fastmeta compiles it on "
            "first use against the torch it imports (or install with --no-build-isolation "
            "where torch is installed to compile it now)"
        )
        return []
    sources = build.sources(HERE, with_cuda=False)
    cxx = list(build.CXX_FLAGS)
    common = dict(
        name="fastmeta._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=list(build.LINK_FLAGS),
    )
    if build.switch("FASTMETA_SANITIZE") in build.ON:
        if build.switch("FASTMETA_CUDA") in build.ON:
            raise RuntimeError(
                "FASTMETA_SANITIZE=1 builds the CPU kernels only: unset FASTMETA_CUDA"
            )
        print("fastmeta: building the C++ CPU kernels with AddressSanitizer and UBSan")
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        common["extra_link_args"] += sanitize
        cxx = ["-O1", "-g", "-std=c++20", "-fopenmp", *sanitize]
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)]
    if not build.want_cuda(torch):
        print(f"fastmeta: building the C++ CPU kernels only (torch {torch.__version__})")
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)]
    archs = build.arch_list(torch)
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(
        f"fastmeta: building CPU and CUDA kernels (torch {torch.__version__}, "
        f"CUDA_HOME={os.environ.get('CUDA_HOME')}, archs={archs or 'of the visible GPU'})"
    )
    return [
        CUDAExtension(
            sources=build.sources(HERE, with_cuda=True),
            define_macros=[(build.CUDA_MACRO, None)],
            extra_compile_args={"cxx": cxx, "nvcc": list(build.NVCC_FLAGS)},
            **common,
        )
    ]


def _license():
    """MIT, as an SPDX expression where setuptools takes one (>= 77), else the older field."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "MIT"} if major >= 77 else {"license": "MIT"}


setup(
    **_license(),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext_class(), "build_py": build_py},
)
