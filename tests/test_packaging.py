"""Installing fastmeta: metadata, the missing-torch message, the compile on first use
(fastmeta/_jit.py), and the install matrix.

The quick tests run with the suite: they compile a one-file stand-in for csrc/ (a
few seconds) in copies of the package. The install matrix (`make install-matrix`, run
by CI; FASTMETA_INSTALL_TESTS=1) builds the sdist and wheels and installs them into
fresh venvs: the CUDA build of the torch in this venv (the wheel built here, with its
kernels) and an older CPU-only torch (FASTMETA_MATRIX_OLD_TORCH, default 2.13.0: a
plain `pip install .`, then the compile on first use), each followed by a smoke test
and the op tests; plus the missing-torch message after a pip install and the Python
floor. Tens of minutes on 2 cores: measured in the README.
"""

import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import fastmeta

ROOT = Path(__file__).resolve().parents[1]
MIN_TORCH = "2.13"
MIN_PYTHON = "3.11"
PYENV_310 = os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")
OLD_TORCH = os.environ.get("FASTMETA_MATRIX_OLD_TORCH", "2.13.0")
INSTALL_TESTS = os.environ.get("FASTMETA_INSTALL_TESTS") == "1"
matrix = pytest.mark.skipif(
    not INSTALL_TESTS, reason="the install matrix: `make install-matrix` (CI runs it)"
)
# The last line `import fastmeta` prints without torch.
MISSING_TORCH = re.compile(
    r"^ModuleNotFoundError: fastmeta \S+ needs PyTorch \(torch >= 2\.13\), which is not "
    r"installed in this environment: install torch first .*, then run this again$"
)


def run(command, *, check=True, timeout=1800, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command; on an unexpected exit status fails with its output."""
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} exited {done.returncode}\n"
            f"--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}"
        )
    return done


def clean_env(**extra) -> dict:
    """This environment without what ties a child to this venv or checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", **extra)
    return env


def make_venv(path: Path, python: str = sys.executable, pip: bool = True) -> Path:
    """A fresh venv (no system site-packages); returns its python."""
    run([python, "-m", "venv", *([] if pip else ["--without-pip"]), path])
    return path / "bin" / "python"


# ---------------------------------------------------------------- metadata


def test_version_has_one_source():
    from fastmeta import _version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert fastmeta.__version__ == _version.__version__
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "fastmeta._version.__version__"}


def test_metadata_declares_the_ranges_extras_and_no_torch_to_build_with():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["requires-python"] == f">={MIN_PYTHON}"
    assert [d for d in meta["dependencies"] if d.startswith("torch")] == [f"torch>={MIN_TORCH}"]
    assert {"data", "triton", "dev", "test"} <= set(meta["optional-dependencies"])
    assert "license" in meta["dynamic"] and (ROOT / "LICENSE").is_file()
    assert f"Programming Language :: Python :: {MIN_PYTHON}" in meta["classifiers"]
    assert not any(r.startswith("torch") for r in project["build-system"]["requires"])
    readme = (ROOT / "README.md").read_text()
    assert f"torch {MIN_TORCH}" in readme and f"Python {MIN_PYTHON}" in readme


def test_without_torch_import_says_to_install_it_first(tmp_path):
    python = make_venv(tmp_path / "venv", pip=False)
    done = run(
        [python, "-c", "import fastmeta"],
        check=False,
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert MISSING_TORCH.match(lines[-1]), done.stderr
    assert "During handling" not in done.stderr  # one error, not torch's then ours


# ------------------------------------------------- the compile on first use

# A stand-in for csrc/: a module with WITH_CUDA and nothing else; compiles in seconds.
STAND_IN = """#include <Python.h>
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", 0) < 0) return nullptr;
  return module;
}
"""

# Prints what fastmeta.backends() says about fastmeta._C, as JSON.
REPORT = """import json, fastmeta
from fastmeta import _extension
report = fastmeta.backends()
plan = _extension.plan()
print(json.dumps({"built": report.extension_built, "origin": report.extension_origin,
                  "error": report.extension_error, "cpu": report.usable["cpu"],
                  "dir": plan.directory if plan else None}))
"""


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the Python package without fastmeta._C, whose csrc/ (the wheel's
    fastmeta/_sources/csrc) is the stand-in; returns (root, env, write_source)."""
    root = tmp_path / "site"
    shutil.copytree(
        ROOT / "fastmeta",
        root / "fastmeta",
        ignore=shutil.ignore_patterns("*.so", "_C.build.json", "__pycache__", "_sources"),
    )
    csrc = root / "fastmeta" / "_sources" / "csrc"
    csrc.mkdir(parents=True)

    def write_source(text):
        (csrc / "fastmeta.cpp").write_text(text)

    write_source(STAND_IN)
    env = clean_env(
        PYTHONPATH=str(root), FASTMETA_CACHE_DIR=str(tmp_path / "cache"), FASTMETA_CUDA="0"
    )
    env.pop("FASTMETA_JIT", None)
    return root, env, write_source


def report(env, cwd, **extra) -> tuple[dict, str]:
    done = run([sys.executable, "-c", REPORT], env={**env, **extra}, cwd=cwd)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_compiles_on_first_use_in_the_background_once_under_a_lock(package_copy, tmp_path):
    root, env, _ = package_copy
    # FASTMETA_JIT=0: nothing compiles; the reason names the command that would.
    state, stderr = report(env, tmp_path, FASTMETA_JIT="0")
    assert not state["built"] and stderr == ""
    assert "installed without fastmeta._C" in state["cpu"]
    assert "FASTMETA_JIT=0: run `python -m fastmeta build`" in state["cpu"]
    plan_dir = Path(state["dir"])
    assert plan_dir.parent == tmp_path / "cache"
    assert plan_dir.name.startswith(f"torch{torch.__version__}-cpu-py3")
    assert not plan_dir.exists()

    # While another process holds the lock (a compile in progress), a process says so
    # and starts none; `python -m fastmeta build` waits for the lock.
    plan_dir.mkdir(parents=True)
    with open(plan_dir / "fastmeta.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state, stderr = report(env, tmp_path)
        assert not state["built"] and "is being compiled" in state["cpu"]
        assert stderr.count("\n") == 1 and "is being compiled" in stderr
        waiting = subprocess.Popen(
            [sys.executable, "-m", "fastmeta", "build"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        said = waiting.stderr.readline()  # printed before it takes the lock
        assert "waiting for the compile of fastmeta._C (CPU kernels)" in said
        time.sleep(2)
        assert waiting.poll() is None  # blocked on the lock
        assert not (plan_dir / "build.log").exists()
    out, err = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, out + err
    assert "ready (compiled in" in err
    assert (plan_dir / "done.json").is_file() and (plan_dir / "_C.so").is_file()

    # A later process loads the compiled copy, and says so.
    state, stderr = report(env, tmp_path)
    assert state["built"] and state["error"] is None and stderr == ""
    assert state["origin"] == f"compiled on first use: {plan_dir / '_C.so'}"


def test_background_compile_starts_with_one_line_and_later_processes_use_it(package_copy, tmp_path):
    root, env, _ = package_copy
    state, stderr = report(env, tmp_path)  # first use: starts the compile, returns
    assert not state["built"] and "in the background" in state["cpu"]
    line = stderr.strip()
    assert "\n" not in line and line.startswith(
        f"fastmeta: compiling fastmeta._C (CPU kernels) for torch {torch.__version__} "
        "in the background, once"
    )
    assert "reference backend meanwhile" in line and "python -m fastmeta build" in line
    # Waits for it (or finds it done: the stand-in compiles in seconds).
    run([sys.executable, "-m", "fastmeta", "build"], env=env, cwd=tmp_path)
    state, stderr = report(env, tmp_path)
    assert state["built"] and state["origin"].startswith("compiled on first use: ")
    # Already loaded: nothing to do.
    done = run([sys.executable, "-m", "fastmeta", "build"], env=env, cwd=tmp_path)
    assert "nothing to compile" in done.stdout


def test_a_failed_compile_says_why_and_is_not_retried_on_its_own(package_copy, tmp_path):
    root, env, write_source = package_copy
    write_source('#error "broken on purpose"\n')
    state, stderr = report(env, tmp_path, FASTMETA_JIT="wait")
    assert not state["built"]
    assert "broken on purpose" in state["cpu"] and "log: " in state["cpu"]
    assert "fix that and run `python -m fastmeta build` to try again" in state["cpu"]
    log = Path(state["dir"]) / "build.log"
    before = log.stat().st_mtime_ns
    state, stderr = report(env, tmp_path)  # background mode: does not start it again
    assert "broken on purpose" in state["cpu"] and stderr == ""
    assert log.stat().st_mtime_ns == before
    done = run([sys.executable, "-m", "fastmeta", "build"], env=env, cwd=tmp_path, check=False)
    assert done.returncode == 1 and "broken on purpose" in done.stderr
    write_source(STAND_IN)  # fixed: another hash of the sources, another compile
    state, _ = report(env, tmp_path, FASTMETA_JIT="wait")
    assert state["built"]


def test_a_library_built_for_another_torch_is_not_loaded(package_copy, tmp_path):
    root, env, _ = package_copy
    (root / "fastmeta" / "_C.build.json").write_text('{"torch": "2.0.0+cpu"}')
    state, _ = report(env, tmp_path, FASTMETA_JIT="0")
    assert not state["built"]
    assert (
        f"the installed fastmeta._C was built for torch 2.0.0+cpu, and this is torch "
        f"{torch.__version__}" in state["cpu"]
    )


def test_an_install_without_sources_says_how_to_get_them(package_copy, tmp_path):
    root, env, _ = package_copy
    shutil.rmtree(root / "fastmeta" / "_sources")
    state, stderr = report(env, tmp_path)
    assert not state["built"] and state["dir"] is None and stderr == ""
    assert "has no C++ sources to compile: reinstall it" in state["cpu"]


# ------------------------------------------------------------ install matrix

# One op on each backend that runs here (inner_update: every backend has it), each
# against the reference; then what backends() said. Printed as JSON.
SMOKE = """import json, os, torch, fastmeta
report = fastmeta.backends()
theta, g = torch.randn(37), torch.randn(5, 37)
want = theta[None] - 0.4 * g
ran = {}
for name, why in report.usable.items():
    if why is None and name != "cuda":
        with fastmeta.use_backend(name):
            got = fastmeta.inner_update(theta, 0.4, g)
        assert fastmeta.last_backend("inner_update") == name
        ran[name] = float((got - want).abs().max())
print(json.dumps({"torch": torch.__version__, "version": fastmeta.__version__,
                  "built": report.extension_built, "with_cuda": report.extension_with_cuda,
                  "origin": report.extension_origin, "error": report.extension_error,
                  "usable": report.usable, "ran": ran}))
"""
# The op tests each leg runs against the installed package.
OP_TESTS = ["test_conformance.py", "test_inner_update.py", "test_protonet.py"]


def smoke(python, env, cwd) -> dict:
    done = run([python, "-c", SMOKE], env=env, cwd=cwd)
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(err < 1e-5 for err in state["ran"].values()), state
    return state


def op_tests(python, env, tmp: Path, *select):
    """The op tests, from a copy of tests/ outside the checkout (so that they import
    the installed fastmeta)."""
    tests = tmp / "tests"
    if not tests.exists():
        shutil.copytree(ROOT / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    done = run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5", *select]
        + OP_TESTS,
        env=env,
        cwd=tests,
        timeout=3600,
    )
    summary = done.stdout.strip().splitlines()[-1]
    print(f"op tests ({python} {' '.join(select)}): {summary}")
    print("\n".join(done.stdout.strip().splitlines()[-9:-1]))
    assert " passed" in summary and "failed" not in summary


def pip_install(python, *args, cwd=None) -> str:
    done = run([python, "-m", "pip", "install", *args], env=clean_env(), cwd=cwd)
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """`python -m build` (isolated: no torch in it): the sdist and the wheel built from it."""
    out = tmp_path_factory.mktemp("dist")
    tool = make_venv(out / "tool")  # `build` itself, outside the venv under test
    pip_install(tool, "build")
    run([tool, "-m", "build", "--outdir", out, ROOT], env=clean_env())
    sdist, wheel = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdist) == 1 and len(wheel) == 1, list(out.iterdir())
    return sdist[0], wheel[0]


@pytest.fixture(scope="module")
def old_torch(tmp_path_factory):
    """A fresh venv with the older CPU-only torch, then a plain `pip install .` from
    the checkout (build isolation: the wheel has no fastmeta._C), then the first use,
    which starts the compile in the background while the other tests run. Returns
    (python, env, tmp, what the first use printed, pip's output)."""
    tmp = tmp_path_factory.mktemp("old-torch")
    python = make_venv(tmp / "venv")
    pip_install(python, f"torch=={OLD_TORCH}", "pytest", "hypothesis")
    before = run([python, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    pip_output = pip_install(python, ".", cwd=ROOT)  # what users type
    env = clean_env(FASTMETA_CACHE_DIR=str(tmp / "cache"), FASTMETA_CUDA="0")
    env.pop("FASTMETA_JIT", None)
    first = run([python, "-c", REPORT], env=env, cwd=tmp)
    after = run([python, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    assert before == after, f"pip replaced torch {before} with {after}"
    return python, env, tmp, first, pip_output


@matrix
def test_sdist_and_wheel_hold_the_sources_and_metadata(dist):
    sdist, wheel = dist
    assert wheel.name == f"fastmeta-{fastmeta.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(f"fastmeta-{fastmeta.__version__}.dist-info/METADATA").decode()
    assert "fastmeta/_sources/csrc/fastmeta.cpp" in names
    assert any(n.startswith("fastmeta/_sources/csrc/cuda/") for n in names)
    assert not any(n.endswith((".so", "_C.build.json")) for n in names)
    for line in (
        f"Requires-Python: >={MIN_PYTHON}",
        f"Requires-Dist: torch>={MIN_TORCH}",
        "License-Expression: MIT",
        "Provides-Extra: data",
        "Provides-Extra: triton",
        "Provides-Extra: dev",
    ):
        assert line in meta.splitlines(), line
    listing = run(["tar", "tzf", sdist]).stdout.splitlines()
    top = f"fastmeta-{fastmeta.__version__}/"
    for name in ("csrc/fastmeta.cpp", "csrc/cpu/inner_update_cpu.cpp", "LICENSE", "setup.py"):
        assert top + name in listing, name
    assert not any(n.endswith(".so") or "/_sources/" in n for n in listing)


@matrix
def test_pip_install_without_torch_then_import_says_to_install_torch(dist, tmp_path):
    _, wheel = dist
    python = make_venv(tmp_path / "venv")
    pip_install(python, "--no-deps", wheel)
    done = run([python, "-c", "import fastmeta"], check=False, env=clean_env(), cwd=tmp_path)
    assert done.returncode == 1 and MISSING_TORCH.match(done.stderr.strip().splitlines()[-1])


@matrix
def test_pip_refuses_a_python_below_the_floor(dist, tmp_path):
    candidates = [shutil.which("python3.10"), *glob.glob(PYENV_310)]
    working = [c for c in candidates if c and run([c, "--version"], check=False).returncode == 0]
    if not working:
        pytest.skip("no python3.10 here")
    below = working[0]
    _, wheel = dist
    python = make_venv(tmp_path / "venv", python=below)
    done = run([python, "-m", "pip", "install", "--no-deps", wheel], check=False, env=clean_env())
    assert done.returncode != 0 and "requires a different Python" in done.stderr


@matrix
def test_plain_pip_install_with_old_cpu_torch_starts_the_compile_on_first_use(old_torch):
    python, env, tmp, first, pip_output = old_torch
    assert re.search(r"Requirement already satisfied: torch>=2\.13", pip_output), pip_output
    assert not re.search(r"(Collecting|Downloading) torch\b", pip_output)
    state = json.loads(first.stdout.strip().splitlines()[-1])
    assert not state["built"] and "installed without fastmeta._C" in state["cpu"]
    assert "in the background" in state["cpu"]
    assert first.stderr.strip().startswith(
        f"fastmeta: compiling fastmeta._C (CPU kernels) for torch {OLD_TORCH}"
    )


@matrix
def test_cuda_torch_from_the_wheel_built_here(tmp_path):
    """The wheel built with --no-build-isolation in this venv (its torch, CUDA kernels
    when this torch and nvcc allow; the objects of `make`'s build are reused), in a
    fresh venv with the same torch."""
    out = tmp_path / "wheel"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", out, ROOT]
    )
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = json.loads(archive.read("fastmeta/_C.build.json"))
    assert any(re.fullmatch(r"fastmeta/_C\.cpython-.*\.so", n) for n in names)
    assert info["torch"] == torch.__version__
    with_cuda = info["with_cuda"]
    if os.environ.get("FASTMETA_CUDA") == "1":
        assert with_cuda
    python = make_venv(tmp_path / "venv")
    try:
        cuda_leg(python, wheel, with_cuda, tmp_path)
    finally:
        shutil.rmtree(tmp_path / "venv")  # 5 GB


def cuda_leg(python, wheel, with_cuda, tmp_path):
    version = torch.__version__.split("+")[0]
    pip_install(python, f"torch=={version}", "pytest", "hypothesis")
    output = pip_install(python, wheel)
    assert not re.search(r"(Collecting|Downloading) torch\b", output)
    env = clean_env(TRITON_INTERPRET="1", FASTMETA_JIT="0")  # triton too, interpreted
    state = smoke(python, env, tmp_path)
    assert state["torch"] == torch.__version__ and state["built"], state
    assert state["with_cuda"] == with_cuda
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    assert state["origin"].startswith(f"built by setup.py: {site.stdout.strip()}/fastmeta/_C")
    assert {"reference", "cpu"} <= set(state["ran"]), state
    # The backends of the library in the wheel (`make test` ran torch.compile and Triton's
    # interpreter over the same Python code and torch just now: not again).
    op_tests(python, {**env, "TRITON_INTERPRET": "0"}, tmp_path, "-k", "not compile")


@matrix
def test_old_cpu_torch_runs_the_compiled_kernels_after_the_compile(old_torch):
    python, env, tmp, _, _ = old_torch
    # Waits for the compile the first use started (or finds it done: it ran meanwhile).
    run([python, "-m", "fastmeta", "build"], env=env, cwd=tmp, timeout=3600)
    state = smoke(python, env, tmp)
    assert state["torch"].startswith(OLD_TORCH) and state["built"] and not state["with_cuda"]
    assert state["origin"].startswith(f"compiled on first use: {tmp / 'cache'}")
    assert set(state["ran"]) == {"reference", "cpu"}, state
    op_tests(python, env, tmp)
