"""Triton kernels compiled ahead of time for a Hopper GPU (sm_90) on a machine without
one: the interpreter that runs them on the CPU accepts code that the compiler refuses
(a kernel reading a plain Python global, for one), so this is the check that they build
for the card before any GPU runs them. The compile runs in a child process without
TRITON_INTERPRET (under it, @triton.jit gives interpreted functions)."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton.backends.nvidia")
if torch.cuda.is_available():
    pytest.skip("a GPU runs the kernels themselves", allow_module_level=True)

FLOAT_SCALARS = {"p", "threshold", "e_p"}  # gradient preprocessing
SIZES = {"BLOCK": 32, "BLOCK_H": 32, "PRECISION": "ieee"}
KERNELS = {  # module.kernel: its compile-time constants
    "gradient_lstm_triton._gradient_lstm_forward_kernel": SIZES,
    "gradient_lstm_triton._gradient_lstm_backward_kernel[need_grads]": {
        **SIZES,
        "NEED_GRADS": True,
    },
    "gradient_lstm_triton._gradient_lstm_backward_kernel[no_grads]": {
        **SIZES,
        "NEED_GRADS": False,
    },
}


def compile_for_hopper(kernel, constexprs: dict[str, object]) -> str:
    """PTX of `kernel` for sm_90 with float32 pointers (arguments named *_ptr), float32
    scalars (FLOAT_SCALARS), int64 sizes (the rest) and the given constants."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {
        name: "constexpr"
        if name in constexprs
        else "*fp32"
        if name.endswith("_ptr")
        else "fp32"
        if name in FLOAT_SCALARS
        else "i64"
        for name in names
    }
    constants = {(names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def main(case: str) -> None:
    """Compiles one KERNELS entry (in the child process) and checks its PTX entry."""
    import importlib

    module, kernel = case.split("[")[0].split(".")
    fn = getattr(importlib.import_module(f"fastmeta.kernels.{module}"), kernel)
    assert f".entry {kernel}" in compile_for_hopper(fn, KERNELS[case])


@pytest.mark.parametrize("case", KERNELS)
def test_kernel_compiles_for_hopper(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    code = f"import test_triton_compile as t; t.main({case!r})"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(__file__),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__":
    main(sys.argv[1])
