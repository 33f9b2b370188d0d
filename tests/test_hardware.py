"""One bf16 capability answer for training and evaluation."""

import builtins
import io

import torch

from vggnet import hardware
from vggnet.engine.trainer import pick_precision


def test_training_and_evaluation_use_the_same_bf16_answer():
    expected = torch.bfloat16 if hardware.native_bf16("cpu") else None
    assert pick_precision("auto", torch.device("cpu")) == expected
    assert pick_precision("fp32", torch.device("cpu")) is None


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
