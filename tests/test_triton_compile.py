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

FLOAT_SCALARS = {"eps", "p", "threshold", "e_p"}  # cosine eps, gradient preprocessing
INT64_POINTERS = {"y_ptr", "n_ptr", "pred_ptr"}  # labels, class counts, predictions
DISTANCE = {"squared": 0, "euclidean": 1, "cosine": 2}  # protonet_triton's DISTANCE
TILES = {"BLOCK_M": 64, "BLOCK_C": 64, "BLOCK_D": 32}  # the launches' usual GPU tiles
LSTM = {"BLOCK": 32, "BLOCK_H": 32, "PRECISION": "ieee"}
MIXED = {"BLOCK_L": 16, "PRECISION": "ieee"}
# module: {kernel[variant]: its compile-time constants}; PRECISION "ieee" is what runs at
# torch's default float32 matmul precision, "tf32" where it allows TF32 (tiles.dot_precision)
KERNELS = {
    "inner_update_triton": {
        "_forward_kernel[per-task alpha]": {"ALPHA_KIND": 2, "ACC": "fp32", "BLOCK": 1024},
        "_forward_kernel[scalar alpha]": {"ALPHA_KIND": 0, "ACC": "fp32", "BLOCK": 1024},
        "_backward_kernel": {
            **{"ALPHA_KIND": 1, "NEED_G": True, "NEED_ALPHA": True},
            **{"ACC": "fp32", "BLOCK": 1024},
        },
    },
    "protonet_triton": {
        "_class_prototypes_forward_kernel": {"BLOCK_C": 64, "BLOCK_S": 64, "BLOCK_D": 32},
        "_class_prototypes_backward_kernel": {"BLOCK_S": 64, "BLOCK_D": 32},
        "_squared_distances_kernel[tf32]": {**TILES, "BLOCK_R": 4, "PRECISION": "tf32"},
        **{
            f"_prototypical_cross_entropy_{part}_kernel[{name}]": {
                **TILES,
                **({"BLOCK_R": 4} if part in ("forward", "backward_weights") else {}),
                **{"PRECISION": "ieee", "DISTANCE": DISTANCE[name]},
            }
            for part, name in (
                ("forward", "squared"),
                ("forward", "cosine"),
                ("backward_weights", "euclidean"),
                ("backward_queries", "squared"),
                ("backward_prototypes", "cosine"),
            )
        },
    },
    "cosine_similarities_triton": {
        "_cosine_similarities_kernel": {**TILES, "PRECISION": "ieee"},
    },
    "metanet_triton": {
        "_gradient_mlp_forward_kernel": {"BLOCK": 256, "BLOCK_H": 32},
        "_gradient_mlp_backward_kernel": {"NEED_GRADS": True, "BLOCK": 256, "BLOCK_H": 32},
        "_apply_mixed_kernel[out=O]": {**MIXED, "OUT_IS_O": True, "BLOCK_C": 64, "BLOCK_R": 64},
        "_apply_mixed_kernel[out=K]": {**MIXED, "OUT_IS_O": False, "BLOCK_C": 64, "BLOCK_R": 64},
        "_read_d_attention_kernel": {**MIXED, "BLOCK_O": 64, "BLOCK_K": 64},
        "_read_d_weights_kernel": {
            "BLOCK_R": 16,
            "BLOCK_O": 64,
            "BLOCK_K": 64,
            "PRECISION": "ieee",
        },
    },
    "gradient_lstm_triton": {
        "_gradient_lstm_forward_kernel": LSTM,
        "_gradient_lstm_backward_kernel[need_grads]": {**LSTM, "NEED_GRADS": True},
        "_gradient_lstm_backward_kernel[no_grads]": {**LSTM, "NEED_GRADS": False},
    },
}


def compile_for_hopper(kernel, constexprs: dict[str, object]) -> str:
    """PTX of `kernel` for sm_90: pointers float32 (int64 for INT64_POINTERS), scalars
    float32 (FLOAT_SCALARS) or int32 (sizes, as Triton types an int below 2**31), the
    given constants ("fp32": tl.float32)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {
        name: "constexpr"
        if name in constexprs
        else ("*i64" if name in INT64_POINTERS else "*fp32")
        if name.endswith("_ptr")
        else "fp32"
        if name in FLOAT_SCALARS
        else "i32"
        for name in names
    }
    constants = {
        (names.index(name),): tl.float32 if value == "fp32" else value
        for name, value in constexprs.items()
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def main(module: str) -> None:
    """Compiles every kernel of one KERNELS module (in the child process): each failure
    printed with the kernel's name, exit status 1 if any."""
    import importlib
    import traceback

    kernels = importlib.import_module(f"fastmeta.kernels.{module}")
    failed = []
    for case, constexprs in KERNELS[module].items():
        name = case.split("[")[0]
        try:
            ptx = compile_for_hopper(getattr(kernels, name), constexprs)
            assert f".entry {name}" in ptx, f"no .entry {name} in the PTX"
        except Exception:
            failed.append(case)
            print(f"--- {module}.{case}:\n{traceback.format_exc()[-2500:]}", file=sys.stderr)
    if failed:
        sys.exit(f"did not compile for sm_90: {', '.join(failed)}")


def test_every_triton_kernel_is_listed():
    """A new @triton.jit kernel (a function named *_kernel) needs a KERNELS entry."""
    import importlib
    import pkgutil

    import fastmeta.kernels

    found = set()
    for info in pkgutil.iter_modules(fastmeta.kernels.__path__):
        module = importlib.import_module(f"fastmeta.kernels.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "arg_names"):
                found.add(f"{info.name}.{name}")
    listed = {f"{m}.{case.split('[')[0]}" for m, cases in KERNELS.items() for case in cases}
    assert found == listed


@pytest.mark.parametrize("module", KERNELS)
def test_kernels_compile_for_hopper(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    code = f"import test_triton_compile as t; t.main({module!r})"
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
