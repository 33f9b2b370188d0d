"""What the hardware runs natively, shared by training (``engine``) and evaluation (``evaluate``); torch only.

One answer for both, so a model is never trained in bf16 and then evaluated in fp32 (or the reverse) on the
same machine just because two checks disagreed.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["native_bf16"]

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
        except Exception:  # private helpers: any failure means "not known to be supported"
            continue
    return False


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 autocast runs natively (fast) here: CUDA with bf16, CPUs with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_bf16()
