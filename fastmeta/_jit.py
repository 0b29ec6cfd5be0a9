"""Compiles fastmeta._C on first use, against the torch that is imported.

A wheel built where torch was not importable (pip's build isolation: a plain `pip
install .`) has no fastmeta._C, and one built for another torch cannot load (a torch
extension loads only into the torch it was compiled against). Then fastmeta compiles
csrc/ (the wheel's copy in fastmeta/_sources, or a checkout's csrc/) with
torch.utils.cpp_extension and ninja, the same sources and flags as setup.py
(fastmeta/_build.py), into a cache folder per torch version, Python, CUDA or not and
hash of the sources and flags:

    $FASTMETA_CACHE_DIR, else $XDG_CACHE_HOME/fastmeta, else ~/.cache/fastmeta
      torch2.13.0+cpu-cpu-py311-<hash>/   plan.json, build.log, _C.so, done.json or failed.json

What the user sees (FASTMETA_JIT):
  unset, background  the first call that would use the compiled kernels prints one line
                     and starts the compile in a detached process; this process runs the
                     reference backend, processes started after it finishes load _C.so
  wait               that first call compiles (one line, then minutes) and loads it
  0, off             never compiles: `python -m fastmeta build` does it when asked
A lock (fastmeta.lock, flock) lets one process compile; `python -m fastmeta build`
waits for a compile in progress. A failed compile is not retried on its own:
failed.json names the log, and `python -m fastmeta build` tries again.

Standard library only at import (torch is passed in): the compiling process runs this
file as a script (`_child`), without importing the fastmeta package.
"""

import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

PACKAGE = os.path.dirname(os.path.abspath(__file__))
MODE_VAR = "FASTMETA_JIT"
CACHE_VAR = "FASTMETA_CACHE_DIR"
LOCK, PLAN, LOG = "fastmeta.lock", "plan.json", "build.log"
DONE, FAILED = "done.json", "failed.json"
LIBRARY = "_C.so"  # torch.utils.cpp_extension.load(name="_C") on Linux
COMMAND = "python -m fastmeta build"


def _load_by_path(name: str):
    spec = importlib.util.spec_from_file_location(f"_fastmeta{name}", f"{PACKAGE}/{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_build = _load_by_path("_build")


def mode() -> str:
    """background, wait or off (FASTMETA_JIT)."""
    value = os.environ.get(MODE_VAR, "").strip().lower()
    if value in _build.OFF or value == "never":
        return "off"
    if value in ("wait", "block", "foreground"):
        return "wait"
    return "background"


def source_root() -> str | None:
    """The folder holding csrc/: the wheel's copy, else a checkout's; None if neither."""
    for root in (os.path.join(PACKAGE, "_sources"), os.path.dirname(PACKAGE)):
        if os.path.isfile(os.path.join(root, "csrc", "fastmeta.cpp")):
            return root
    return None


def cache_root() -> str:
    if os.environ.get(CACHE_VAR):
        return os.path.abspath(os.environ[CACHE_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastmeta")


def _tool_path() -> str:
    """PATH with this interpreter's scripts folder first: pip's ninja lives there, and
    torch runs `ninja` from PATH (a venv used without activating it lacks it)."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@dataclasses.dataclass
class Plan:
    """One compile: where, what and how (written to plan.json for the compiling process)."""

    directory: str
    root: str
    sources: list[str]  # absolute
    with_cuda: bool
    archs: str | None
    cxx_flags: list[str]
    nvcc_flags: list[str]
    link_flags: list[str]
    torch: str
    cuda: str | None

    @property
    def what(self) -> str:
        kernels = "CPU and CUDA kernels" if self.with_cuda else "CPU kernels"
        return f"fastmeta._C ({kernels}) for torch {self.torch}"

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


def make_plan(torch) -> Plan:
    """The compile for the imported torch. Raises RuntimeError when there is nothing
    to compile from, or FASTMETA_CUDA=1 cannot be met."""
    root = source_root()
    if root is None:
        raise RuntimeError(
            "this install of fastmeta has no C++ sources to compile: reinstall it from a "
            "wheel or sdist of fastmeta >= 0.1.0, or from its source tree"
        )
    with_cuda = _build.want_cuda(torch)
    archs = _build.arch_list(torch) if with_cuda else None
    macro = [f"-D{_build.CUDA_MACRO}"] if with_cuda else []
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(os.path.join(root, "csrc"))):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as file:
                digest.update(file.read() + b"\0")
    with open(os.path.join(PACKAGE, "_build.py"), "rb") as file:
        digest.update(file.read())
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    digest.update(repr((with_cuda, archs, abi, os.environ.get("CXX"), sys.version)).encode())
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    flavour = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    key = f"torch{torch.__version__}-{flavour}-{python}-{digest.hexdigest()[:12]}"
    return Plan(
        directory=os.path.join(cache_root(), key),
        root=root,
        sources=[os.path.join(root, s) for s in _build.sources(root, with_cuda)],
        with_cuda=with_cuda,
        archs=archs,
        cxx_flags=_build.CXX_FLAGS + macro,
        nvcc_flags=_build.NVCC_FLAGS + macro,
        link_flags=list(_build.LINK_FLAGS),
        torch=torch.__version__,
        cuda=torch.version.cuda,
    )


def missing_tools(plan: Plan) -> str | None:
    """What this machine lacks to compile (None: nothing), and what to install."""
    if fcntl is None:
        return "compiling on first use needs a POSIX system (Linux)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH: install one (e.g. g++), or set CXX"
    if shutil.which("ninja", path=_tool_path()) is None:
        return "ninja is not installed: pip install ninja"
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "the Python headers (Python.h) are missing: install python3-dev or the like"
    return None


def _read(path: str) -> dict | None:
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _write(path: str, data: dict) -> None:
    with open(path + ".part", "w") as file:
        json.dump(data, file, indent=1)
    os.replace(path + ".part", path)


def compiled(plan: Plan) -> dict | None:
    """done.json of a finished compile whose library is there (None: not compiled)."""
    done = _read(plan.path(DONE))
    return done if done is not None and os.path.isfile(plan.path(LIBRARY)) else None


def failed(plan: Plan) -> dict | None:
    return _read(plan.path(FAILED))


def compiling(plan: Plan) -> bool:
    """Whether a process holds the lock (is compiling this plan now)."""
    if fcntl is None or not os.path.exists(plan.path(LOCK)):
        return False
    with open(plan.path(LOCK), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def load_library(path: str):
    """Imports the library at `path` as fastmeta._C (raises ImportError or OSError)."""
    spec = importlib.util.spec_from_file_location("fastmeta._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["fastmeta._C"] = module
    if "fastmeta" in sys.modules:  # as an import would: fastmeta._C is the module
        sys.modules["fastmeta"]._C = module  # type: ignore[attr-defined]
    return module


def load(plan: Plan):
    """Imports the library compiled for `plan` as fastmeta._C."""
    return load_library(plan.path(LIBRARY))


def installed_library() -> str | None:
    """The library installed in the package folder (fastmeta/_C.<abi>.so), if any."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(PACKAGE, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def start(plan: Plan, background: bool, force: bool = False) -> int:
    """Runs the compiling process: detached (returns at once, 0) or waited for (its
    exit status). force: forget an earlier failure or result first."""
    os.makedirs(plan.directory, exist_ok=True)
    _write(plan.path(PLAN), dataclasses.asdict(plan))
    if force and not compiling(plan):
        for name in (DONE, FAILED):
            if os.path.exists(plan.path(name)):
                os.remove(plan.path(name))
    # this file as a script, without importing the fastmeta package
    runner = "import runpy, sys; del sys.argv[0]; runpy.run_path(sys.argv[0], None, '__main__')"
    command = [sys.executable, "-c", runner, os.path.abspath(__file__), plan.directory]
    env = dict(os.environ, PATH=_tool_path())
    if background:
        command.append("--background")
    quiet = subprocess.DEVNULL if background else None
    return subprocess.run(
        command, stdin=subprocess.DEVNULL, stdout=quiet, stderr=quiet, env=env, check=False
    ).returncode


def first_error(path: str) -> str | None:
    """The first compiler error line of a log (None: none found)."""
    try:
        with open(path, errors="replace") as file:
            for line in file:
                if "error:" in line or "Error" in line:
                    return line.strip()[:300]
    except OSError:
        pass
    return None


def _child(directory: str, background: bool) -> int:
    """The compiling process: takes the lock, compiles, writes done.json or failed.json."""
    assert fcntl is not None
    if background and os.fork() > 0:
        return 0  # detached: the caller waits for this parent only
    if background:
        os.setsid()
    with open(os.path.join(directory, PLAN)) as file:
        plan = Plan(**json.load(file))
    lock = open(plan.path(LOCK), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if background:
            return 0  # another process compiles it
        fcntl.flock(lock, fcntl.LOCK_EX)
    if compiled(plan):
        return 0
    if os.path.exists(plan.path(FAILED)) and background:
        return 0  # failed before: `python -m fastmeta build` retries
    log = open(plan.path(LOG), "w")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    if background:
        os.nice(10)
    # torch's own lock in the build folder: only a compile killed midway leaves one,
    # and it would block every later compile; ours is held, so it is stale.
    if os.path.exists(plan.path("lock")):
        os.remove(plan.path("lock"))
    begin = time.time()
    print(f"fastmeta: compiling {plan.what} in {plan.directory}", flush=True)
    try:
        _build.settle_cuda_home()
        if plan.archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = plan.archs
        from torch.utils import cpp_extension

        module = cpp_extension.load(
            name="_C",
            sources=plan.sources,
            extra_cflags=plan.cxx_flags,
            extra_cuda_cflags=plan.nvcc_flags,
            extra_ldflags=plan.link_flags,
            extra_include_paths=[os.path.join(plan.root, "csrc")],
            build_directory=plan.directory,
            with_cuda=plan.with_cuda,
            verbose=True,
        )
        if bool(module.WITH_CUDA) != plan.with_cuda:
            raise RuntimeError(f"built WITH_CUDA={module.WITH_CUDA}, planned {plan.with_cuda}")
    except KeyboardInterrupt:  # not a failure: the next first use starts it again
        print("fastmeta: compile interrupted", flush=True)
        return 130
    except BaseException as error:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        why = first_error(plan.path(LOG)) or f"{type(error).__name__}: {error}"
        _write(plan.path(FAILED), {"error": why, "when": time.ctime(), "log": plan.path(LOG)})
        return 1
    seconds = round(time.time() - begin, 1)
    print(f"fastmeta: compiled in {seconds} s", flush=True)
    _write(plan.path(DONE), {"torch": plan.torch, "with_cuda": plan.with_cuda, "seconds": seconds})
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], "--background" in sys.argv[2:]))
