"""What the hardware runs natively, shared by training (``engine``), evaluation (``evaluate``) and inference
(``infer``, ``serve``); torch only.

One answer for all, so a model is never trained in bf16 and then evaluated in fp32 (or the reverse) on the
same machine just because two checks disagreed; and one reading of ``--device`` / precision flags, so a CUDA
device that is not there, or fp16 on a CPU, is the same clear error in every command, before anything loads.
"""

from __future__ import annotations

import functools
import logging

import torch

from vggnet.errors import UsageError

__all__ = ["PRECISIONS", "autocast_dtype", "inference_dtype", "native_bf16", "resolve_device"]

log = logging.getLogger(__name__)

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpu_bf16() -> bool:
    """AVX512-BF16 or AMX: read from /proc/cpuinfo (public and stable), else torch's own probes (other OSes)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return any(flag in flags for flag in _CPU_BF16_FLAGS)
    except OSError:
        pass
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except (RuntimeError, AttributeError, TypeError):  # private helpers: failing means "not known to be supported"
            log.debug("torch.cpu.%s failed", probe, exc_info=True)
            continue
    return False


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 autocast runs natively (fast) here: CUDA with bf16, CPUs with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_bf16()


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a command runs on, checked. ``None`` (or ``""``): CUDA when available, else the CPU.

    ``cuda`` / ``cuda:N`` on a machine without CUDA, an index past the visible GPUs, ``mps`` without Metal
    or an unknown name are a :class:`~vggnet.errors.UsageError` that says what to pass instead.
    """
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"device {str(device)!r} asked for, but CUDA is not available here ({why}); "
                             "use --device cpu, or run on a machine with a CUDA GPU")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"device {str(device)!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"device {str(device)!r} asked for, but Apple's Metal (MPS) is not available here; "
                             "use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"device {str(device)!r}: use cpu, cuda or cuda:N")
    return dev


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, or None for fp32. ``auto`` is bf16 where the hardware
    runs it natively (CUDA with bf16, AVX512-BF16 / AMX CPUs), fp16 on older GPUs, else fp32."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if native_bf16(device) else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def inference_dtype(precision: str | None, device: torch.device | str) -> torch.dtype | None:
    """:func:`autocast_dtype` for inference (``None`` is fp32), refusing what does not run: fp16 off CUDA (CPU
    autocast has no fast fp16 kernels; bf16 is the CPU's half precision) and bf16 on a GPU without it."""
    device = torch.device(device)
    dtype = autocast_dtype(precision or "fp32", device)
    if dtype is torch.float16 and device.type != "cuda":
        raise UsageError(f"precision fp16 needs a CUDA device, not {device.type}; on the CPU use bf16 (native on "
                         "AVX512-BF16 / AMX) or fp32, or pass --device cuda")
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"precision bf16: {device} does not support bf16; use fp16 or fp32")
    return dtype
