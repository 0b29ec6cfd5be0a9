"""Loads the compiled kernels (fastmeta._C); never raises.

Where from, in order: the library installed with the package (built by setup.py
where torch was importable: `pip install --no-build-isolation`, `make`), unless
_C.build.json beside it names another torch; else a copy compiled on first use for
this torch (fastmeta/_jit.py). When neither loads, the first call that would use the
compiled kernels (`ensure`) starts that compile (FASTMETA_JIT) and the ops run the
reference backend meanwhile.

LOADED: the library imported and registered the `torch.ops.fastmeta_C` kernels.
WITH_CUDA: it was compiled with the CUDA kernels.
ORIGIN: where it came from, when LOADED ("built by setup.py: PATH" or "compiled on
first use: PATH").
LOAD_ERROR: why it is not loaded, and what happens or what to do (None when it is).
"""

import json
import os
import sys

import torch

from fastmeta import _jit

LOADED = False
WITH_CUDA = False
ORIGIN: str | None = None
LOAD_ERROR: str | None = None

_plan: _jit.Plan | None = None
_absent: str = ""  # why the installed library is not used
_started = False


def _loaded(module, origin: str) -> None:
    global LOADED, WITH_CUDA, ORIGIN, LOAD_ERROR
    LOADED, WITH_CUDA, ORIGIN, LOAD_ERROR = True, bool(module.WITH_CUDA), origin, None


def _installed_library() -> str | None:
    """Loads the library installed beside the package; returns why not, if not."""
    info_path = os.path.join(_jit.PACKAGE, _jit._build.BUILD_INFO)
    try:
        with open(info_path) as file:
            built_for = json.load(file).get("torch")
    except (OSError, ValueError):
        built_for = None  # built before _C.build.json existed: try it
    if built_for is not None and built_for != torch.__version__:
        return (
            f"the installed fastmeta._C was built for torch {built_for}, and this is torch "
            f"{torch.__version__} (a compiled extension loads only into the torch it was "
            "built against)"
        )
    path = _jit.installed_library()
    if path is None:
        return (
            "fastmeta was installed without fastmeta._C (torch was not importable where it "
            "was built, e.g. in pip's build isolation)"
        )
    try:  # by path: only the library in this package folder
        module = _jit.load_library(path)
    except (ImportError, OSError) as error:  # built against another torch, or broken
        return f"fastmeta._C failed to load ({type(error).__name__}: {error})"
    _loaded(module, f"built by setup.py: {path}")
    return None


def _describe() -> str:
    """LOAD_ERROR: why there is no library, then the state of the compile on first use."""
    if _plan is None:
        return _absent
    plan = _plan
    failure = _jit.failed(plan)
    if failure is not None:
        return (
            f"{_absent}; compiling {plan.what} failed ({failure.get('error')}; log: "
            f"{failure.get('log')}): fix that and run `{_jit.COMMAND}` to try again"
        )
    if _jit.compiling(plan):
        return (
            f"{_absent}; {plan.what} is being compiled (log: {plan.path(_jit.LOG)}): "
            "processes started after it finishes use it, this one runs the reference backend"
        )
    if _jit.mode() == "off":
        return f"{_absent}; {_jit.MODE_VAR}=0: run `{_jit.COMMAND}` to compile it"
    return f"{_absent}; fastmeta compiles it for this torch on first use"


def _from_cache() -> None:
    """Loads a copy compiled on first use for this torch, if there is one."""
    global _plan, LOAD_ERROR
    try:
        _plan = _jit.make_plan(torch)
    except RuntimeError as error:
        LOAD_ERROR = f"{_absent}; cannot compile it here: {error}"
        return
    missing = _jit.missing_tools(_plan)
    if _jit.compiled(_plan) is not None:
        try:
            _loaded(_jit.load(_plan), f"compiled on first use: {_plan.path(_jit.LIBRARY)}")
            return
        except (ImportError, OSError) as error:
            LOAD_ERROR = (
                f"{_absent}; the copy compiled for this torch does not load "
                f"({type(error).__name__}: {error}): run `{_jit.COMMAND} --force`"
            )
            _plan = None
            return
    if missing is not None:
        LOAD_ERROR = f"{_absent}; cannot compile it here: {missing}, then run `{_jit.COMMAND}`"
        _plan = None
        return
    LOAD_ERROR = _describe()


def ensure() -> None:
    """Called where the compiled kernels would be used: when they are not loaded,
    starts their compile once per process (FASTMETA_JIT; see fastmeta/_jit.py) with
    a one-line message, or reports one in progress. Waits for it under
    FASTMETA_JIT=wait. Cheap after the first call."""
    global _started, LOAD_ERROR
    if LOADED or _started or _plan is None:
        return
    _started = True
    plan, mode = _plan, _jit.mode()
    if mode == "off" or _jit.failed(plan) is not None:
        LOAD_ERROR = _describe()
        return
    if _jit.compiling(plan):
        print(f"fastmeta: {_describe()}", file=sys.stderr, flush=True)
        if mode != "wait":
            return
    if mode == "wait":
        wait_and_load(plan)
        return
    _jit.start(plan, background=True)
    LOAD_ERROR = (
        f"{_absent}; compiling {plan.what} in the background (log: {plan.path(_jit.LOG)}): "
        "processes started after it finishes use it, this one runs the reference backend"
    )
    print(
        f"fastmeta: compiling {plan.what} in the background, once (minutes; log: "
        f"{plan.path(_jit.LOG)}); this process runs the pure-PyTorch reference backend "
        f"meanwhile. `{_jit.COMMAND}` waits for it; {_jit.MODE_VAR}=0 turns this off.",
        file=sys.stderr,
        flush=True,
    )


def wait_and_load(plan: _jit.Plan, force: bool = False) -> bool:
    """Compiles `plan` in a child process and waits (a compile in progress: waits
    for it), then loads the library. Prints one line before and one after."""
    global LOAD_ERROR
    busy = _jit.compiling(plan)
    print(
        f"fastmeta: {'waiting for the compile of' if busy else 'compiling'} {plan.what} "
        f"(minutes; log: {plan.path(_jit.LOG)})",
        file=sys.stderr,
        flush=True,
    )
    status = _jit.start(plan, background=False, force=force)
    done = _jit.compiled(plan)
    if status != 0 or done is None:
        LOAD_ERROR = _describe()
        print(f"fastmeta: {LOAD_ERROR}", file=sys.stderr, flush=True)
        return False
    try:
        module = _jit.load(plan)
    except (ImportError, OSError) as error:
        LOAD_ERROR = f"{_absent}; the compiled copy does not load ({type(error).__name__}: {error})"
        print(f"fastmeta: {LOAD_ERROR}", file=sys.stderr, flush=True)
        return False
    _loaded(module, f"compiled on first use: {plan.path(_jit.LIBRARY)}")
    seconds = done.get("seconds")
    print(
        f"fastmeta: {plan.what} ready"
        + (f" (compiled in {seconds:.0f} s)" if isinstance(seconds, int | float) else ""),
        file=sys.stderr,
        flush=True,
    )
    return True


def plan() -> _jit.Plan | None:
    """The compile on first use for this torch (None: the library loaded from the
    install, or cannot be compiled here: LOAD_ERROR says why)."""
    return _plan


_absent = _installed_library() or ""
if not LOADED:
    _from_cache()


def build_command(args: list[str]) -> int:
    """`python -m fastmeta build [--force]`: compiles fastmeta._C for this torch now
    (waits for a compile in progress); exit status 0 when it is loaded."""
    unknown = [a for a in args if a not in ("--force", "-h", "--help")]
    if unknown or "-h" in args or "--help" in args:
        print(
            "usage: python -m fastmeta build [--force]\ncompiles fastmeta._C for the torch "
            "imported here into the cache (fastmeta/_jit.py); --force compiles again",
            file=sys.stderr if unknown else sys.stdout,
        )
        return 2 if unknown else 0
    force = "--force" in args
    if LOADED and (not force or _plan is None):
        print(f"fastmeta: fastmeta._C is loaded ({ORIGIN}): nothing to compile")
        return 0
    if _plan is None:
        print(f"fastmeta: cannot compile fastmeta._C: {LOAD_ERROR}", file=sys.stderr)
        return 1
    try:
        return 0 if wait_and_load(_plan, force=force) else 1
    except KeyboardInterrupt:
        print(f"fastmeta: interrupted; `{_jit.COMMAND}` starts again", file=sys.stderr)
        return 130
