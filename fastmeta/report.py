"""What `fastmeta.backends()` reports: what was built, what is usable here, the
default backend of each op, where a dtype makes an op fall back to the reference, and
the per-shape races run so far."""

import dataclasses

import torch

from fastmeta import _extension, backend
from fastmeta import race as racing
from fastmeta.kernels.interpreter import triton_interpreter, triton_version

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # reported per op


@dataclasses.dataclass
class BackendReport:
    """What `fastmeta.backends()` returns; print it for a readable summary."""

    torch_version: str
    triton_version: str | None
    extension_built: bool
    extension_with_cuda: bool
    extension_error: str | None  # why it is not loaded, and what happens or what to do
    extension_origin: str | None  # "built by setup.py: PATH" or "compiled on first use: PATH"
    gpu: str | None
    triton_interpreter: bool
    forced: str | None
    usable: dict[str, str | None]  # backend -> None if usable here, else why not
    ops: dict[str, dict[str, str | None]]  # op -> device type -> default backend (float32)
    # op -> device type -> dtype -> why the default is the reference though the op has
    # a fused backend there (only ops, devices and dtypes that fall back)
    fallbacks: dict[str, dict[str, dict[torch.dtype, str]]]
    fallbacks_seen: dict[tuple[str, str, torch.dtype], str]  # calls that fell back, and why
    races: dict[tuple, racing.Outcome]  # (op, device, dtype, shape bucket) -> its race

    def __str__(self) -> str:
        built = (
            "not loaded"
            if not self.extension_built
            else (
                "built with CPU and CUDA kernels"
                if self.extension_with_cuda
                else "built with CPU kernels only"
            )
        )
        lines = [
            f"torch {self.torch_version}; triton {self.triton_version or 'not installed'}"
            + (" (interpreter)" if self.triton_interpreter else ""),
            f"fastmeta._C: {built}"
            + (f" ({self.extension_origin})" if self.extension_origin else "")
            + (f" ({self.extension_error})" if self.extension_error else ""),
            f"GPU: {self.gpu or 'none visible'}",
            f"forced backend: {self.forced or 'none'}",
            "backends usable here:",
        ]
        lines += [
            f"  {b:<10} {'yes' if why is None else 'no: ' + why}" for b, why in self.usable.items()
        ]
        lines.append("default backend per op:")
        for op, per_device in self.ops.items():
            choice = ", ".join(f"{d}: {b or '-'}" for d, b in per_device.items())
            lines.append(f"  {op:<24} {choice}")
        return "\n".join(lines + self.fallback_lines() + self.race_lines())

    def fallback_lines(self) -> list[str]:
        """Where the default is the reference though a fused backend exists for the
        device: per op, the dtypes and why; then the calls that did so."""
        lines = ["fallbacks to the reference by dtype:" + ("" if self.fallbacks else " none")]
        for op, per_device in self.fallbacks.items():
            parts = []
            for device, per_dtype in per_device.items():
                by_reason: dict[str, list[str]] = {}
                for dtype, why in per_dtype.items():
                    by_reason.setdefault(why, []).append(backend.dtype_name(dtype))
                parts += [
                    f"{device} {', '.join(names)} ({why})" for why, names in by_reason.items()
                ]
            lines.append(f"  {op:<24} {'; '.join(parts)}")
        lines.append(
            "fallbacks to the reference seen in this process:"
            + ("" if self.fallbacks_seen else " none")
        )
        lines += [
            f"  {op} {device} {backend.dtype_name(dtype)} ({why})"
            for (op, device, dtype), why in self.fallbacks_seen.items()
        ]
        return lines

    def race_lines(self) -> list[str]:
        """The per-shape races run so far: op, shape bucket, winner, times, dropped
        contenders and why."""
        raced = ", ".join(
            f"{device}: {' vs '.join(names)}" for device, names in racing.RACED.items()
        )
        lines = [
            f"per-shape races ({raced}; none under {racing.ENV_VAR}=0 or deterministic "
            "algorithms):" + ("" if self.races else " none run yet")
        ]
        for (op, device, dtype, bucket), outcome in self.races.items():
            parts = [f"{b} {ms:.3f} ms" for b, ms in outcome.times.items()]
            parts += [f"{b} dropped: {why}" for b, why in outcome.dropped.items()]
            lines.append(
                f"  {op} {device} {backend.dtype_name(dtype)} {bucket}: {outcome.winner}"
                + (f" ({'; '.join(parts)})" if parts else "")
            )
        return lines


def backends() -> BackendReport:
    """Reports what was built, what is usable here and which backend each op uses."""
    usable = {b: backend.unavailable_reason(b) for b in backend.BACKENDS}  # first: may load _C
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    devices = ("cpu", "cuda") if gpu else ("cpu",)
    ops = {
        op: {
            d: backend.default_backend(op, d, torch.float32) if d in devices else None
            for d in ("cpu", "cuda")
        }
        for op in backend.ops()
    }
    fallbacks: dict[str, dict[str, dict[torch.dtype, str]]] = {}
    for op in backend.ops():
        for d in devices:
            per_dtype = {
                dtype: why for dtype in DTYPES if (why := backend.fallback_reason(op, d, dtype))
            }
            if per_dtype:
                fallbacks.setdefault(op, {})[d] = per_dtype
    forced = backend.forced_backend()
    return BackendReport(
        torch_version=torch.__version__,
        triton_version=triton_version(),
        extension_built=_extension.LOADED,
        extension_with_cuda=_extension.WITH_CUDA,
        extension_error=_extension.LOAD_ERROR,
        extension_origin=_extension.ORIGIN,
        gpu=gpu,
        triton_interpreter=triton_interpreter(),
        forced=f"{forced[0]} (by {forced[1]})" if forced else None,
        usable=usable,
        ops=ops,
        fallbacks=fallbacks,
        fallbacks_seen=backend.fallbacks_seen(),
        races=racing.results(),
    )
