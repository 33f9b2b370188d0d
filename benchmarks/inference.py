"""Inference: every vggnet CPU runtime vs torchvision's VGG-16 eager fp32, OpenVINO's own tool chain, and the
mobile runtimes; and what reduced precision costs.

Speed. VGG-16 (config D, the paper's fc head, 1000 classes) at 224², batch 1 and 8. The anchor is
``torchvision.models.vgg16()`` run eagerly in fp32, NCHW, under ``inference_mode``; vggnet's model gets the
same weights (loaded from the torchvision state dict), so every row computes the same function (each arm's
largest error against the anchor, over its max |logit|, is printed when it is built and kept as
``rel_error_vs_anchor``). The arms come in four families:

- ``torch``: the anchor and vggnet's runtimes on torch and ONNX Runtime (``eager`` … ``onnx-int8``).
- ``openvino``: OpenVINO's own path as a user would take it, from torchvision's module (``torch.export`` ->
  ``openvino.convert_model``), compiled for the CPU once per batch size (static shapes) with
  ``PERFORMANCE_HINT`` LATENCY and ``INFERENCE_NUM_THREADS`` = torch's threads: ``openvino fp32``
  (``INFERENCE_PRECISION_HINT`` f32), ``openvino <p>`` at OpenVINO's default precision, named by the
  precision the compiled model reports (bf16 on a CPU with AVX512-BF16 or AMX), and ``openvino nncf int8``
  (``nncf.quantize`` on the calibration images the vggnet INT8 runtimes get). These are the peers. The
  family also runs vggnet's own ``openvino`` / ``openvino-int8`` runtimes when ``vggnet.infer`` registers
  them. ``openvino fp32``'s build time includes the conversion the three peer rows share.
- ``executorch``: vggnet's ``.pte`` exports (``vggnet.export.executorch``, as ``vggnet export --format
  executorch`` / ``executorch-int8`` write them, XNNPACK), captured at the largest batch timed (8: a program's
  memory is planned for the batch it was captured at), read back with ``vggnet.export.load_exported``.
- ``litert``: vggnet's ``.tflite`` exports (``--format tflite`` / ``tflite-int8``), on LiteRT's interpreter
  with torch's thread count. Timed at batch 1 only: litert-torch writes them at batch 1, and with the fc head
  the batch is baked into the graph, so batch 8 would be 8 batch-1 calls; the table shows "—" and the JSON
  ``null``. Converting the full-size model is practical (measured 2026-12-07 on the busy 2-core machine:
  fp32 32 s / 4.5 GB peak RSS, INT8 76 s / 3.2 GB; ExecuTorch fp32 21 s / 3.4 GB, INT8 65 s / 3.8 GB; the
  three OpenVINO peers 21 s together, NNCF's 14 s of it, 3.3 GB), so no flag makes these arms optional beyond
  ``--families``.

Why families live apart. Once OpenVINO, ExecuTorch or LiteRT has run in a process, torch eager VGG-16 at
batch 8 in that process dropped from 428 to 149 / 58 / 42 img/s on 2 cores (their thread pools and
torch's fight for the cores). So each family runs in its own long-lived worker process (this file with
``--worker FAMILY``, one JSON line per request over its stdin/stdout), started and built one after the other,
all with ``OMP_WAIT_POLICY=PASSIVE`` so an idle worker sleeps instead of spinning. The parent keeps the
interleaving: ``--repeats`` rounds, each timing every batch of every arm once, asking that arm's worker, so
only one arm computes at a time and a drift of the machine falls on all arms alike. The table reports
medians and ratios to the anchor measured in the same run. Build time includes compilation or export and
one warm-up call per batch size. GFLOPS = 2 × MACs per image × images/s (MACs counted by
``vggnet.count_macs``), compared with this CPU's peak for the precision the arm computes in (``peak_ops``).
After the table: vggnet's fastest bf16 path ÷ OpenVINO's fastest bf16 row, and vggnet's fastest INT8 path
(any vggnet runtime or export) ÷ ``openvino nncf int8`` and ÷ ``onnx-int8``, per batch (``versus_openvino``
in the JSON).

Accuracy. The CIFAR-10 model in ``--cifar-run`` (e.g. ``runs/edge/gap`` of ``benchmarks/phone.py``: VGG-16-BN, GAP
head, 32×32) on the run's own validation split (``vggnet.evaluate.eval_images``), each vggnet runtime (those of
``--runtimes``, OpenVINO's included when registered, and ``auto``) against eager fp32: top-1 agreement and the
change in top-1 accuracy; not timed, so it runs in the parent. Calibration (int8, onnx-int8, openvino-int8, auto) uses
``--calib-n`` training images spread evenly over the training split. A missing run is one line, and the
section is skipped.

    .venv/bin/python benchmarks/inference.py                 # full: a quiet machine, ~15 min on 2 cores (Zen 5)
    .venv/bin/python benchmarks/inference.py --quick         # smoke test: tiny width, few iterations, no file
    .venv/bin/python benchmarks/inference.py --families torch openvino   # some families only (torch: always)
    .venv/bin/python benchmarks/inference.py --quick --cifar-run runs/demo-rob --cifar-data ''   # a demo run

``--quick`` shrinks VGG-16 to 1/16 width (the anchor too: torchvision's ``VGG`` class built with the same
narrow layers), times each arm for ~0.1 s and evaluates 200 validation images; its numbers only show that
every path runs. A family whose package is not installed is reported and skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import vggnet
from vggnet.infer import RUNTIMES as VGGNET_RUNTIMES
from vggnet.infer import Predictor, Preprocessing, make_runtime, preprocess, top1_agreement
from vggnet.models import WeightsNotFoundError, checkpoint_file, checkpoint_meta, load_checkpoint

TORCH_RUNTIMES = ["eager", "channels_last", "bf16", "compile", "compile-bf16", "int8", "int8-dynamic", "onnx",
                  "onnx-int8"]
OPENVINO_RUNTIMES = ["openvino", "openvino-int8"]  # vggnet's, where vggnet.infer registers them
RUNTIMES = TORCH_RUNTIMES + [n for n in OPENVINO_RUNTIMES if n in VGGNET_RUNTIMES]
# The precision each runtime's convolutions compute in: which peak its GFLOPS are compared with. None: asked of
# OpenVINO (its default CPU precision); the peer and mobile arms say theirs when built.
PRECISION = {"eager": "fp32", "channels_last": "fp32", "compile": "fp32", "onnx": "fp32", "int8-dynamic": "fp32",
             "bf16": "bf16", "compile-bf16": "bf16", "int8": "int8", "onnx-int8": "int8",
             "openvino": None, "openvino-int8": "int8"}
OV_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  # OpenVINO's element type -> this file's names
# Each family runs in its own worker process (see the module docstring); what it needs installed.
FAMILIES = ("torch", "openvino", "executorch", "litert")
FAMILY_NEEDS = {"torch": (), "openvino": ("openvino", "nncf"), "executorch": ("executorch",),
                "litert": ("ai_edge_litert", "litert_torch")}
TARGETS = {"bf16": 3.0, "compile-bf16": 3.0, "int8": 5.0}  # × torchvision eager fp32 (issue 5)
INT8_AGREEMENT, INT8_DROP = 0.99, 0.5
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ANCHOR = "torchvision vgg16 eager fp32"


def family_of(runtime: str) -> str:
    """The worker a vggnet runtime runs in: OpenVINO's own thread pool must not share a process with torch's."""
    return "openvino" if runtime.startswith("openvino") else "torch"


# --------------------------------------------------------------------------------------------- the machine


def cpu_facts() -> dict[str, Any]:
    """Model, vendor, family, flags and the clock the kernel reports, from /proc/cpuinfo; cores usable."""
    facts: dict[str, Any] = {"model": platform.processor() or platform.machine(), "vendor": "", "family": None,
                             "model_number": None, "flags": [], "reported_mhz": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    first = text.split("\n\n")[0]
    for line in first.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name":
            facts["model"] = value
        elif key == "vendor_id":
            facts["vendor"] = value
        elif key == "cpu family":
            facts["family"] = int(value)
        elif key == "model":
            facts["model_number"] = int(value)
        elif key == "flags":
            facts["flags"] = value.split()
        elif key == "cpu MHz":
            facts["reported_mhz"] = float(value)
    facts["logical_cpus"] = os.cpu_count()
    facts["usable_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return facts


_CLOCK_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    unsigned long x = 0, n = 200000000UL; double best = 1e9;
    for (int r = 0; r < 5; r++) {
        struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
        for (unsigned long i = 0; i < n; i += 10)
            __asm__ volatile("add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\t"
                             "add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0" : "+r"(x));
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9; if (s < best) best = s;
    }
    printf("%.4f %lu\n", n / best / 1e9, x);
    return 0;
}
"""


def measure_clock_ghz() -> float | None:
    """The core clock, measured: a chain of dependent integer adds retires one per cycle on every x86 core
    since the Pentium Pro, so adds per second = cycles per second. Needed because a VM's /proc/cpuinfo gives
    the TSC rate, which here is not the P0 clock (the kernel logs "TSC doesn't count with P0 frequency")."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "clock.c", Path(tmp) / "clock"
        src.write_text(_CLOCK_C)
        try:
            subprocess.run([cc, "-O1", str(src), "-o", str(exe)], check=True, capture_output=True, timeout=60)
            out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout
        except (subprocess.SubprocessError, OSError):
            return None
    return float(out.split()[0])


def peak_ops(facts: dict[str, Any], clock_ghz: float, cores: int) -> dict[str, Any]:
    """Peak multiply-add throughput (2 ops per MAC) of ``cores`` cores at ``clock_ghz``, per precision.

    Per core and cycle: fp32 = 2 FMA pipes × fp32 lanes × 2, with 8 lanes (256-bit datapaths: AVX2 parts and
    AMD Zen 2-4, whose AVX-512 runs on both 256-bit halves) or 16 (Intel AVX-512 server cores, AMD Zen 5);
    bf16 = 2 × fp32 with AVX512-BF16 (VDPBF16PS: two bf16 products per fp32 lane), 1024 with AMX; int8 = 4 ×
    fp32 with VNNI (VPDPBUSD: four u8×s8 products per 32-bit lane), 2048 with AMX, else 2 × fp32.
    """
    flags = set(facts["flags"])
    wide = ("avx512f" in flags and facts["vendor"] == "GenuineIntel") or (
        facts["vendor"] == "AuthenticAMD" and (facts["family"] or 0) >= 0x1A)
    fp32 = 2 * (16 if wide else 8) * 2 if "fma" in flags else 8
    bf16 = 1024 if "amx_bf16" in flags else (2 * fp32 if "avx512_bf16" in flags else fp32)
    int8 = 2048 if "amx_int8" in flags else (4 * fp32 if {"avx512_vnni", "avx_vnni"} & flags else 2 * fp32)
    per_cycle = {"fp32": fp32, "bf16": bf16, "int8": int8}
    return {"clock_ghz": clock_ghz, "cores": cores, "ops_per_cycle_per_core": per_cycle,
            "gflops": {k: v * cores * clock_ghz for k, v in per_cycle.items()}}


# ------------------------------------------------------------------------------------------------- models


def torchvision_vgg16(width: float, fc_width: int) -> nn.Module:
    """``torchvision.models.vgg16()`` at full size; the same class with narrower layers for --quick."""
    if width == 1.0 and fc_width == 4096:
        return torchvision.models.vgg16()
    from torchvision.models.vgg import VGG, cfgs, make_layers

    cfg = [v if v == "M" else max(1, round(v * width)) for v in cfgs["D"]]
    model = VGG(make_layers(cfg, batch_norm=False), num_classes=1000)
    channels = cfg[-2]
    model.classifier = nn.Sequential(nn.Linear(channels * 49, fc_width), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(fc_width, fc_width), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(fc_width, 1000))
    return model


class TorchvisionEager:
    name = "torchvision"

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def timed(fn: Any, x: torch.Tensor, target_s: float, max_iters: int = 50) -> float:
    """Images/s of ``fn`` on ``x``: one untimed call, then enough calls to fill ``target_s``."""
    t0 = time.perf_counter()
    fn(x)
    once = time.perf_counter() - t0
    iters = max(1, min(max_iters, math.ceil(target_s / max(once, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return iters * len(x) / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------- speed


class OpenVINOArm:
    """A converted model compiled for the CPU once per batch size (static shapes: OpenVINO at its best), run
    through one infer request per batch."""

    def __init__(self, ov_model: Any, batches: list[int], image: tuple[int, ...], config: dict[str, Any]) -> None:
        import openvino as ov

        core = ov.Core()
        self.requests, self.compiled = {}, {}
        for b in batches:
            model = ov_model.clone()
            model.reshape([b, *image])
            self.compiled[b] = core.compile_model(model, "CPU", config)
            self.requests[b] = self.compiled[b].create_infer_request()

    @property
    def precision(self) -> str:
        """The precision OpenVINO chose for the layers it runs in floating point (bf16 where AVX512-BF16 or
        AMX exists, unless the hint says f32)."""
        hint = next(iter(self.compiled.values())).get_property("INFERENCE_PRECISION_HINT")
        name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        return OV_PRECISION.get(name, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        request = self.requests[len(x)]
        request.infer({0: x.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())


def _openvino_arms(tv: nn.Module, ours: nn.Module, prep: Preprocessing, calib: torch.Tensor,
                   cfg: dict[str, Any]) -> dict[str, Any]:
    """OpenVINO's own path from torchvision's module (torch.export -> ``openvino.convert_model``), compiled fp32,
    at OpenVINO's default precision, and quantized by NNCF on the calibration images the vggnet INT8
    runtimes get; then vggnet's ``openvino`` runtimes where the registry has them. Built lazily: a failure of
    one arm is reported by :func:`_build`, the others still run."""
    import nncf
    import openvino as ov

    batches, threads, image = cfg["batches"], cfg["threads"], tuple(calib.shape[1:])
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    holder: dict[str, Any] = {}

    def converted() -> Any:  # dynamic batch, static 224²: reshaped to each batch by OpenVINOArm
        if "model" not in holder:
            example = calib[torch.arange(max(batches)) % len(calib)]
            dims = ({0: torch.export.Dim("batch", min=1, max=64)},)
            with torch.no_grad():
                holder["model"] = ov.convert_model(torch.export.export(tv, (example,), dynamic_shapes=dims))
        return holder["model"]

    def fp32() -> tuple[Any, str]:
        arm = OpenVINOArm(converted(), batches, image, {**config, "INFERENCE_PRECISION_HINT": "f32"})
        return arm, arm.precision

    def default() -> tuple[Any, str]:
        arm = OpenVINOArm(converted(), batches, image, config)
        return arm, arm.precision

    def nncf_int8() -> tuple[Any, str]:
        data = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
        quantized = nncf.quantize(converted(), data, subset_size=len(calib))
        return OpenVINOArm(quantized, batches, image, config), "int8"

    arms: dict[str, Any] = {"openvino fp32": fp32, "openvino default": default, "openvino nncf int8": nncf_int8}
    for name in cfg["runtimes"]:
        arms[name] = (lambda n=name: _vggnet_arm(n, ours, prep, calib))
    return arms


def _vggnet_arm(name: str, ours: nn.Module, prep: Preprocessing, calib: torch.Tensor) -> tuple[Any, str]:
    """vggnet's runtime ``name`` and its precision: PRECISION's entry, else what the runtime says it ran in
    (``openvino``: OpenVINO's default CPU precision), else OpenVINO's default asked of the CPU plugin."""
    runtime = make_runtime(name, ours, prep, calib)
    return runtime, PRECISION.get(name) or getattr(runtime, "precision", None) or _vggnet_precision(name)


def _vggnet_precision(name: str) -> str:
    """PRECISION's entry; vggnet's ``openvino`` runtime computes in OpenVINO's default CPU precision."""
    if PRECISION.get(name) is not None:
        return PRECISION[name]
    if name == "openvino":
        import openvino as ov

        hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
        name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        return OV_PRECISION.get(name, name)
    return "fp32"


def _edge_arms(family: str, ours: nn.Module, prep: Preprocessing, calib: torch.Tensor,
               cfg: dict[str, Any]) -> dict[str, Any]:
    """vggnet's mobile exports, written to the worker's temp folder and read back as a user would
    (``vggnet.export.load_exported``): an ExecuTorch program captured at the largest batch timed (its memory
    is planned for that batch), LiteRT files of batch 1."""
    from vggnet.export import load_exported

    tmp, batches = Path(cfg["tmp"]), cfg["batches"]
    calibration = {"images": len(calib), "source": "CIFAR-10 training images resized to 224 (the benchmark's)"}

    def load(path: Path, **options: Any) -> Any:
        return load_exported(path, **options).runtime

    if family == "executorch":
        from vggnet.export.executorch import export_executorch, export_executorch_int8

        top = max(batches)
        return {"executorch fp32": lambda: (load(export_executorch(ours, prep, tmp / "vgg16.pte", max_batch=top)),
                                            "fp32"),
                "executorch int8": lambda: (load(export_executorch_int8(
                    ours, prep, tmp / "vgg16.int8.pte", calib, calibration=calibration, max_batch=top)), "int8")}
    from vggnet.export.tflite import export_tflite, export_tflite_int8

    threads = cfg["threads"]
    return {"litert fp32": lambda: (load(export_tflite(ours, prep, tmp / "vgg16.tflite"), threads=threads), "fp32"),
            "litert int8": lambda: (load(export_tflite_int8(ours, prep, tmp / "vgg16.int8.tflite", calib,
                                                            calibration=calibration), threads=threads), "int8")}


def _build(factories: dict[str, Any], inputs: dict[int, torch.Tensor], reference: dict[int, torch.Tensor],
           batches: dict[str, list[int]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]]:
    """Each arm built, warmed at every batch it runs (build time includes both) and compared with eager
    torchvision on the same images (max error / max |logit|: a wrong weight or a broken export shows here)."""
    arms, info, failed = {}, {}, {}
    for name, factory in factories.items():
        t0 = time.perf_counter()
        try:
            fn, precision = factory()
            errors = {}
            for b in batches.get(name, list(inputs)):
                out = fn(inputs[b]).float()
                errors[b] = float((out - reference[b]).abs().max() / reference[b].abs().max().clamp_min(1e-12))
        except Exception as exc:  # report, keep measuring the others
            failed[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            continue
        arms[name] = fn
        info[name] = {"precision": precision, "build_s": time.perf_counter() - t0,
                      "batches": batches.get(name, list(inputs)), "rel_error_vs_anchor": max(errors.values())}
    return arms, info, failed


def _family_arms(family: str, cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str],
                                                            dict[int, torch.Tensor], int]:
    """The worker's arms built from the shared weights, their info, what failed, the inputs and the MACs per
    image. A function of its own so that what no arm holds (the models, the reference logits) is freed on
    return: four workers' worth of full-size VGG-16 copies is memory the machine may not have."""
    shared = torch.load(cfg["shared"], weights_only=True)
    tv = torchvision_vgg16(cfg["width"], cfg["fc_width"])
    tv.load_state_dict(shared["state"])
    tv.eval()
    ours = vggnet.create_model("vgg16", width=cfg["width"], fc_width=cfg["fc_width"], weights=shared["state"]).eval()
    prep = Preprocessing(**cfg["prep"])
    calib, inputs = shared["calib"], {int(b): x for b, x in shared["inputs"].items()}
    with torch.inference_mode():
        reference = {b: tv(x) for b, x in inputs.items()}
    factories: dict[str, Any] = {}
    batches: dict[str, list[int]] = {}
    if family == "torch":
        factories[ANCHOR] = lambda: (TorchvisionEager(tv), "fp32")
        for name in cfg["runtimes"]:
            factories[name] = (lambda n=name: (make_runtime(n, ours, prep, calib), PRECISION.get(n, "fp32")))
    elif family == "openvino":
        factories = _openvino_arms(tv, ours, prep, calib, cfg)
    else:
        factories = _edge_arms(family, ours, prep, calib, cfg)
        if family == "litert":
            batches = dict.fromkeys(factories, [1] if 1 in inputs else [])
    arms, info, failed = _build(factories, inputs, reference, batches)
    if "openvino default" in info:  # named by the precision OpenVINO actually chose
        name = f"openvino {info['openvino default']['precision']}"
        name = name if name not in info else f"{name} (default hint)"
        info = {name if k == "openvino default" else k: v for k, v in info.items()}
        arms = {name if k == "openvino default" else k: v for k, v in arms.items()}
    return arms, info, failed, inputs, vggnet.count_macs(ours.config, 224)


def worker(family: str) -> None:
    """One family's arms in this process: built once, then timed on request (one JSON line in, one out).

    The protocol channel is a private copy of stdout; file descriptor 1 is pointed at stderr, so whatever the
    runtimes print (NNCF's progress bars, converter tables) cannot corrupt it."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    cfg = json.loads(sys.stdin.readline())
    torch.set_num_threads(cfg["threads"])
    arms, info, failed, inputs, macs = _family_arms(family, cfg)
    gc.collect()
    channel.write(json.dumps({"arms": info, "failed": failed, "macs": macs}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        try:
            reply = {"rate": timed(arms[request["arm"]], inputs[request["batch"]], request["target_s"])}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
        channel.write(json.dumps(reply) + "\n")


class Worker:
    """The parent's handle on one family's worker process (this file run with ``--worker FAMILY``)."""

    def __init__(self, family: str, cfg: dict[str, Any]) -> None:
        self.family = family
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # idle between requests: sleep, do not spin
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", family],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.ready = self._ask(cfg)  # returns once every arm is built

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise RuntimeError(f"{self.family} worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def time(self, arm: str, batch: int, target_s: float) -> float:
        reply = self._ask({"arm": arm, "batch": batch, "target_s": target_s})
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["rate"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def available_families(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """The families whose packages are installed (looked up, not imported: importing them here would start
    their thread pools in the parent); the others with the reason."""
    ok, skipped = [], {}
    for family in wanted:
        missing = [m for m in FAMILY_NEEDS[family] if importlib.util.find_spec(m) is None]
        if missing:
            skipped[family] = f"not installed: {', '.join(missing)}"
        else:
            ok.append(family)
    return ok, skipped


def speed(args: argparse.Namespace, calib_images: list[Any], peak: dict[str, Any]) -> dict[str, Any]:
    families, skipped = available_families(args.families)
    for family, why in skipped.items():
        print(f"  family {family}: skipped ({why})", flush=True)
    torch.manual_seed(0)
    tv = torchvision_vgg16(args.width, args.fc_width).eval()
    prep = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=224, in_channels=3, num_classes=1000)
    calib = preprocess(calib_images, prep)  # CIFAR-10 training images upscaled to 224²: realistic value ranges
    batches = sorted(set(args.batches))
    inputs = {b: calib[torch.arange(b) % len(calib)] for b in batches}
    by_family = {f: [n for n in args.runtimes if family_of(n) == f] for f in FAMILIES}
    for name in args.runtimes:
        if family_of(name) not in families:
            print(f"  {name}: skipped (its family {family_of(name)} is not measured)", flush=True)
    workers: dict[str, Worker] = {}
    arms: dict[str, dict[str, Any]] = {}  # name -> worker's info + family
    failed: dict[str, str] = {}
    macs = None
    with tempfile.TemporaryDirectory(prefix="vggnet-inference-") as tmp:
        shared = Path(tmp) / "shared.pt"
        torch.save({"state": tv.state_dict(), "calib": calib, "inputs": inputs}, shared)
        del tv
        for family in families:  # one at a time: a build does not share the cores with another build
            cfg = {"shared": str(shared), "tmp": tmp, "width": args.width, "fc_width": args.fc_width,
                   "prep": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 224, "in_channels": 3,
                            "num_classes": 1000},
                   "runtimes": by_family[family], "batches": batches, "threads": torch.get_num_threads()}
            print(f"  family {family}: building", flush=True)
            try:
                worker_ = Worker(family, cfg)
            except RuntimeError as exc:
                print(f"  family {family}: failed ({exc})", flush=True)
                failed[family] = str(exc)
                continue
            workers[family] = worker_
            macs = worker_.ready["macs"]
            for name, info in worker_.ready["arms"].items():
                arms[name] = {**info, "family": family}
                print(f"  built {name} in {info['build_s']:.1f} s (max error vs anchor "
                      f"{info['rel_error_vs_anchor']:.1e} of max |logit|)", flush=True)
            for name, why in worker_.ready["failed"].items():
                failed[name] = why
                print(f"  {name}: failed to build ({why})", flush=True)
        try:
            rates = _rounds(args, workers, arms, batches)
        finally:
            for worker_ in workers.values():
                worker_.close()
    if ANCHOR not in arms:
        raise SystemExit("the anchor (torch family) did not run: nothing to compare with")
    rows = []
    for name, info in arms.items():
        if name not in rates:
            continue
        precision = info["precision"] if info["precision"] in peak["gflops"] else "fp32"
        row: dict[str, Any] = {"runtime": name, "family": info["family"], "by": _by(name),
                               "precision": info["precision"], "build_s": info["build_s"],
                               "rel_error_vs_anchor": info["rel_error_vs_anchor"]}
        for b in batches:
            if not rates[name][b]:
                row[f"b{b}"] = None  # not run at this batch (LiteRT: batch 1 files)
                continue
            rate = statistics.median(rates[name][b])
            anchor = statistics.median(rates[ANCHOR][b])
            gflops = 2 * macs * rate / 1e9
            row[f"b{b}"] = {"img_per_s": rate, "runs": rates[name][b], "x_torchvision": rate / anchor,
                            "gflops": gflops, "pct_of_fp32_peak": 100 * gflops / peak["gflops"]["fp32"],
                            "pct_of_precision_peak": 100 * gflops / peak["gflops"][precision]}
        rows.append(row)
    return {"model": f"vgg16 (config D, fc head, 1000 classes, width {args.width}, fc_width {args.fc_width})",
            "input": "224x224", "macs_per_image": macs, "anchor": ANCHOR, "batches": batches, "rows": rows,
            "families": families, "families_skipped": skipped, "failed": failed,
            "isolation": "one worker process per family, OMP_WAIT_POLICY=PASSIVE; timed round-robin",
            "weights": "random init (torchvision's), shared by every arm; calibration: "
                       f"{len(calib_images)} CIFAR-10 training images resized to 224",
            "versus_openvino": versus_openvino(rows, batches)}


def _rounds(args: argparse.Namespace, workers: dict[str, Worker], arms: dict[str, dict[str, Any]],
            batches: list[int]) -> dict[str, dict[int, list[float]]]:
    """``--repeats`` rounds; in each, every batch, every arm once, asked of its family's worker in turn, so
    only one arm computes at a time and a drift of the machine falls on all arms alike."""
    rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in arms}
    for r in range(args.repeats):
        for b in batches:
            for name, info in arms.items():
                worker_ = workers.get(info["family"])
                if worker_ is None or b not in info["batches"]:
                    continue
                try:
                    rates[name][b].append(worker_.time(name, b, args.target_s))
                except RuntimeError as exc:  # a dead worker takes its family's arms out of later rounds
                    print(f"  {name} b{b}: {exc}", flush=True)
                    if worker_.proc.poll() is not None:
                        del workers[info["family"]]
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} b{b} {rates[n][b][-1]:.2f}" for b in batches for n in arms if rates[n][b]), flush=True)
    return {n: v for n, v in rates.items() if any(v.values())}


def _by(name: str) -> str:
    """Whose path a row measures: the anchor, a peer (OpenVINO's own tool chain), or vggnet."""
    if name == ANCHOR:
        return "anchor"
    return "peer" if name.startswith("openvino ") else "vggnet"


def versus_openvino(rows: list[dict[str, Any]], batches: list[int]) -> dict[str, Any]:
    """Per batch: vggnet's fastest bf16 path ÷ OpenVINO's fastest bf16 row, and vggnet's fastest INT8 path ÷
    OpenVINO + NNCF INT8 and ÷ vggnet's ``onnx-int8`` (medians of the same run)."""
    out: dict[str, Any] = {}
    for b in batches:
        def rate(row: dict[str, Any], b: int = b) -> float:
            return (row.get(f"b{b}") or {}).get("img_per_s", 0.0)

        def best(by: str, precision: str, b: int = b) -> dict[str, Any] | None:
            found = [r for r in rows if r["by"] == by and r["precision"] == precision and rate(r)]
            return max(found, key=rate, default=None)

        def versus(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> dict[str, Any] | None:
            if ours is None or theirs is None:
                return None
            return {"vggnet": ours["runtime"], "vggnet_img_per_s": rate(ours), "other": theirs["runtime"],
                    "other_img_per_s": rate(theirs), "ratio": rate(ours) / rate(theirs)}

        named = {r["runtime"]: r for r in rows if rate(r)}
        int8 = best("vggnet", "int8")
        out[f"b{b}"] = {"bf16_vs_openvino": versus(best("vggnet", "bf16"), best("peer", "bf16")),
                        "int8_vs_openvino_nncf": versus(int8, named.get("openvino nncf int8")),
                        "int8_vs_onnx_int8": versus(int8, named.get("onnx-int8"))}
    return out

# ---------------------------------------------------------------------------------------------- accuracy


def _tensors(images: Any, labels: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    kept = [(img, y) for img, y in zip(images, labels, strict=True) if img is not None]  # unreadable: skipped
    return [img for img, _ in kept], [y for _, y in kept]


def accuracy(args: argparse.Namespace, runtimes: list[str]) -> dict[str, Any]:
    from vggnet.evaluate import eval_images

    try:
        file = checkpoint_file(args.cifar_run)
    except WeightsNotFoundError as exc:  # e.g. the default runs/cifar10 on a machine that never trained it
        print(f"  skipped: {exc} (train it with the cifar10 recipe, or pass --cifar-run)", flush=True)
        return {"skipped": str(exc)}
    model, extra = load_checkpoint(file)
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    images, labels, _ = eval_images(args.cifar_run, args.cifar_data, "val", classes=prep.classes,
                                    limit=args.val_limit)
    images, labels = _tensors(images, labels)
    train, train_labels, _ = eval_images(args.cifar_run, args.cifar_data, "train", classes=prep.classes,
                                         limit=args.calib_n)
    calib = preprocess(_tensors(train, train_labels)[0], prep)
    x, y = preprocess(images, prep), torch.tensor(labels)
    reference = Predictor(model, prep, "eager", max_batch=64).logits(x)
    ref_acc = float((reference.argmax(1) == y).float().mean())
    rows = []
    for name in runtimes:
        t0 = time.perf_counter()
        try:
            predictor = Predictor(model, prep, name, calib=calib, max_batch=64)
            logits = predictor.logits(x)
        except Exception as exc:
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"  # one line, however long
            print(f"  {name}: failed ({error})", flush=True)
            rows.append({"runtime": name, "error": error})
            continue
        acc = float((logits.argmax(1) == y).float().mean())
        row = {"runtime": predictor.runtime.name, "top1": 100 * acc, "delta_points": 100 * (acc - ref_acc),
               "agreement": 100 * top1_agreement(logits, reference), "seconds": time.perf_counter() - t0}
        if name == "auto":
            row["auto_report"] = predictor.runtime.report
        rows.append(row)
        print(f"  {row['runtime']}: top-1 {row['top1']:.2f} % ({row['delta_points']:+.2f}), agreement "
              f"{row['agreement']:.2f} %", flush=True)
    return {"checkpoint": str(file), "model": model.config.to_dict(), "val_images": len(labels),
            "calibration_images": len(calib), "eager_top1": 100 * ref_acc, "rows": rows}


# ---------------------------------------------------------------------------------------------------- main


def print_tables(result: dict[str, Any]) -> None:
    sp = result["speed"]
    peak = result["peak"]["gflops"]
    print(f"\nVGG-16 at 224², {sp['model']}; peak GFLOPS fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f}, "
          f"int8 {peak['int8']:.0f} ({result['peak']['cores']} cores at {result['peak']['clock_ghz']:.2f} GHz)")
    head = f"{'runtime':<30}{'family':<11}{'prec':<5}{'build s':>8}"
    for b in sp["batches"]:
        head += f" | b{b} {'img/s':>7}{'× tv':>6}{'GFLOPS':>8}{'%peak':>6}"
    print(head)
    for row in sp["rows"]:
        line = f"{row['runtime']:<30}{row['family']:<11}{row['precision']:<5}{row['build_s']:>8.1f}"
        for b in sp["batches"]:
            c = row[f"b{b}"]
            if c is None:
                line += f" | {'':>2}{'—':>8}{'':>20}"
                continue
            line += (f" | {'':>2}{c['img_per_s']:>8.2f}{c['x_torchvision']:>6.2f}{c['gflops']:>8.1f}"
                     f"{c['pct_of_precision_peak']:>6.0f}")
        print(line)
    print("(%peak: of the peak for the runtime's precision; × tv: ratio to torchvision eager fp32, same run;\n"
          " —: not run at that batch (LiteRT files are batch 1; vggnet's fc head bakes the batch into them);\n"
          " each family timed in its own worker process, round-robin)")
    for name, why in sp.get("failed", {}).items():
        print(f"failed: {name}: {why}")
    for name, why in sp.get("families_skipped", {}).items():
        print(f"family {name} skipped: {why}")
    print("\nvggnet vs OpenVINO (fastest vggnet path of each kind, same run):")
    for b in sp["batches"]:
        vs = sp["versus_openvino"][f"b{b}"]
        for key, what in (("bf16_vs_openvino", "bf16"), ("int8_vs_openvino_nncf", "INT8"),
                          ("int8_vs_onnx_int8", "INT8")):
            v = vs[key]
            if v is None:
                print(f"  b{b} {what}: — (an arm is missing)")
            else:
                print(f"  b{b} {what}: {v['vggnet']} {v['vggnet_img_per_s']:.2f} img/s ÷ {v['other']} "
                      f"{v['other_img_per_s']:.2f} = {v['ratio']:.2f}×")
    acc = result.get("accuracy")
    if acc and "skipped" in acc:
        print(f"\naccuracy skipped: {acc['skipped']}")
    elif acc:
        print(f"\nCIFAR-10 {acc['val_images']} validation images, eager fp32 top-1 {acc['eager_top1']:.2f} %, "
              f"calibration {acc['calibration_images']} training images")
        print(f"{'runtime':<22}{'top-1 %':>9}{'Δ points':>10}{'agreement %':>13}")
        for row in acc["rows"]:
            if "error" in row:
                print(f"{row['runtime']:<22} failed: {row['error']}")
            else:
                print(f"{row['runtime']:<22}{row['top1']:>9.2f}{row['delta_points']:>+10.2f}{row['agreement']:>13.2f}")
    print("\ntargets:")
    for line in result["targets"]:
        print(f"  {line}")


def check_targets(result: dict[str, Any]) -> list[str]:
    lines = []
    rows = {r["runtime"]: r for r in result["speed"]["rows"]}
    for name, target in TARGETS.items():
        for b in result["speed"]["batches"]:
            if name in rows and rows[name][f"b{b}"] is not None:
                got = rows[name][f"b{b}"]["x_torchvision"]
                lines.append(f"{name} batch {b}: {got:.2f}× torchvision eager fp32 (target ≥ {target}×): "
                             f"{'met' if got >= target else 'NOT met'}")
    acc = {r["runtime"]: r for r in (result.get("accuracy") or {}).get("rows", []) if "error" not in r}
    if "int8" in acc:
        a, d = acc["int8"]["agreement"], acc["int8"]["delta_points"]
        ok = a >= 100 * INT8_AGREEMENT and d >= -INT8_DROP
        lines.append(f"int8 on CIFAR-10: agreement {a:.2f} % (≥ {100 * INT8_AGREEMENT:.0f} %), accuracy change "
                     f"{d:+.2f} points (drop ≤ {INT8_DROP}): {'met' if ok else 'NOT met'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny width, few iterations, no results file")
    ap.add_argument("--runtimes", nargs="+", default=RUNTIMES,
                    help=f"vggnet runtimes to measure (default: all registered: {' '.join(RUNTIMES)})")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                    help="worker families to run (default: all installed); torch holds the anchor")
    ap.add_argument("--worker", choices=FAMILIES, help=argparse.SUPPRESS)  # internal: one family's worker
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=None, help="timing rounds (default: 3; --quick 1)")
    ap.add_argument("--target-s", type=float, default=None, help="seconds per timing (default: 3; --quick 0.1)")
    ap.add_argument("--speed-calib-n", type=int, default=None, help="calibration images for VGG-16 (default 32)")
    ap.add_argument("--calib-n", type=int, default=None, help="CIFAR-10 calibration images (default 512)")
    ap.add_argument("--val-limit", type=int, default=None, help="CIFAR-10 validation images (default: all)")
    ap.add_argument("--cifar-run", default="runs/cifar10")
    ap.add_argument("--cifar-data", default="data/cifar10",
                    help="its data ('' = the run's own recipe data, e.g. the embedded digits of a demo run)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--clock-ghz", type=float, default=None, help="core clock for the peak (default: measured)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/inference.json; "
                    "none with --quick)")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if "torch" not in args.families:
        raise SystemExit("--families must include torch: it runs the anchor every row is compared with")
    quick = args.quick
    args.cifar_data = args.cifar_data or None
    args.width, args.fc_width = (1 / 16, 256) if quick else (1.0, 4096)
    args.repeats = args.repeats or (1 if quick else 3)
    args.target_s = args.target_s or (0.1 if quick else 3.0)
    args.speed_calib_n = args.speed_calib_n or (4 if quick else 32)
    args.calib_n = args.calib_n or (64 if quick else 512)
    args.val_limit = args.val_limit or (200 if quick else None)
    out = args.out or (None if quick else "benchmarks/results/inference.json")

    facts = cpu_facts()
    measured = measure_clock_ghz()
    clock = args.clock_ghz or measured or (facts["reported_mhz"] or 0) / 1000
    threads = torch.get_num_threads()
    peak = peak_ops(facts, clock, min(threads, facts["usable_cpus"] or threads))
    peak["clock_source"] = ("--clock-ghz" if args.clock_ghz else "measured (dependent integer adds, one core)"
                            if measured else "/proc/cpuinfo cpu MHz")
    print(f"{facts['model']} ({facts['vendor']} family {facts['family']} model {facts['model_number']}), "
          f"{threads} threads; clock {clock:.2f} GHz ({peak['clock_source']}; /proc/cpuinfo says "
          f"{facts['reported_mhz']} MHz)", flush=True)

    from vggnet.evaluate import eval_images

    calib_images, calib_labels, _ = eval_images(args.cifar_run, args.cifar_data, "train", limit=args.speed_calib_n)
    calib_images = _tensors(calib_images, calib_labels)[0]
    print("speed:", flush=True)
    result: dict[str, Any] = {
        "benchmark": "inference: vggnet runtimes vs torchvision vgg16 eager fp32 (speed), CIFAR-10 (accuracy)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(), "quick": quick,
        "machine": {"cpu": facts["model"], "vendor": facts["vendor"], "family": facts["family"],
                    "model_number": facts["model_number"], "logical_cpus": facts["logical_cpus"],
                    "usable_cpus": facts["usable_cpus"], "torch_threads": threads,
                    "reported_mhz": facts["reported_mhz"], "measured_clock_ghz": measured,
                    "isa": sorted(f for f in facts["flags"] if f.startswith(("avx", "amx", "fma")))},
        "versions": _versions(), "peak": peak,
    }
    result["speed"] = speed(args, calib_images, peak)
    if not args.skip_accuracy:
        print("accuracy:", flush=True)
        result["accuracy"] = accuracy(args, [*args.runtimes, "auto"])
    result["targets"] = check_targets(result)
    print_tables(result)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {out}")


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__}
    for name in ("torchao", "onnxruntime", "onnx", "onnxscript", "openvino", "nncf", "executorch", "ai-edge-litert",
                 "litert-torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


if __name__ == "__main__":
    main()
