"""One bf16 capability answer for training and evaluation."""

import builtins
import io
from pathlib import Path

import pytest
import torch

from vggnet import hardware
from vggnet.engine.trainer import pick_precision
from vggnet.errors import UsageError


def test_training_and_evaluation_use_the_same_bf16_answer():
    expected = torch.bfloat16 if hardware.native_bf16("cpu") else None
    assert pick_precision("auto", torch.device("cpu")) == expected
    assert pick_precision("fp32", torch.device("cpu")) is None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # this machine's answer, read here from its flags rather than from native_bf16
        flags = cpuinfo.read_text().split()
        assert expected is (torch.bfloat16 if "avx512_bf16" in flags or "amx_bf16" in flags else None)


def test_cpu_flags_decide_and_unreadable_cpuinfo_falls_back_to_torch(monkeypatch):
    real_open = builtins.open

    def fake_open(flags):
        def opener(path, *args, **kwargs):
            if path == "/proc/cpuinfo":
                if flags is None:
                    raise OSError("no procfs")
                return io.StringIO(flags)
            return real_open(path, *args, **kwargs)
        return opener

    for flags, probe, expected in [("fpu avx512f avx512_bf16", False, True), ("fpu avx2", True, False),
                                   ("fpu amx_bf16 amx_tile", False, True), (None, True, True), (None, False, False)]:
        hardware._cpu_bf16.cache_clear()
        monkeypatch.setattr(builtins, "open", fake_open(flags))
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda p=probe: p, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert hardware.native_bf16("cpu") is expected, (flags, probe)
    hardware._cpu_bf16.cache_clear()
    assert hardware.native_bf16("meta") is False


# (request, device, the GPU supports bf16, the CPU has AVX512-BF16/AMX) -> the autocast dtype, written out by hand
# from the rule (autocast_dtype, README `--precision`): fp32 is None; bf16 and fp16 are what they say; auto is bf16
# where it runs natively, fp16 on a GPU without bf16, else fp32
PRECISION_TABLE = [
    ("fp32", "cpu", False, True, None), ("fp32", "cuda", True, False, None),
    ("bf16", "cpu", False, False, torch.bfloat16), ("bf16", "cuda", False, False, torch.bfloat16),
    ("fp16", "cpu", False, False, torch.float16), ("fp16", "cuda", True, True, torch.float16),
    ("auto", "cpu", False, True, torch.bfloat16), ("auto", "cpu", True, False, None),
    ("auto", "cuda", True, False, torch.bfloat16), ("auto", "cuda", False, True, torch.float16),
]


@pytest.mark.parametrize(("precision", "device", "gpu_bf16", "cpu_bf16", "expected"), PRECISION_TABLE)
def test_precision_requests_give_the_documented_dtype(monkeypatch, precision, device, gpu_bf16, cpu_bf16, expected):
    """Training (pick_precision) and hardware.autocast_dtype, each against the table, not against each other: a
    rule wrong in autocast_dtype would pass a comparison of the two (the CPU and GPU capabilities are faked)."""
    real_open = builtins.open

    def opener(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO("fpu avx2 avx512f avx512_bf16" if cpu_bf16 else "fpu avx2 avx512f")
        return real_open(path, *args, **kwargs)

    hardware._cpu_bf16.cache_clear()
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    try:
        for dev in (torch.device(device), device):
            assert hardware.autocast_dtype(precision, dev) is expected, (precision, dev)
        assert pick_precision(precision, torch.device(device)) is expected
    finally:
        hardware._cpu_bf16.cache_clear()


def test_unknown_precision_is_a_usage_error():
    for ask in (lambda: hardware.autocast_dtype("int4", "cpu"), lambda: pick_precision("half", torch.device("cpu"))):
        with pytest.raises(UsageError, match="unknown precision"):
            ask()
