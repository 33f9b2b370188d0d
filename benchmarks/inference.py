"""Inference: every vggnet CPU runtime vs torchvision's VGG-16 eager fp32, and what reduced precision costs.

Speed. VGG-16 (config D, the paper's fc head, 1000 classes) at 224², batch 1 and 8. The anchor is
``torchvision.models.vgg16()`` run eagerly in fp32, NCHW, under ``inference_mode``; vggnet's model gets the
same weights (loaded from the torchvision state dict), so every row computes the same function. All
runtimes are built first (build time includes compilation and one warm-up call per batch size), then the
arms are timed in turn, round-robin, ``--repeats`` times; the table reports medians and ratios to the anchor
measured in the same run. GFLOPS = 2 × MACs per image × images/s (MACs counted by ``vggnet.count_macs``),
compared with this CPU's peak for the precision the runtime computes in (see ``peak_ops``).

Accuracy. The CIFAR-10 model in ``--cifar-run`` (VGG-16-BN, width 0.5, GAP head, 32×32) on the run's own
validation split (``vggnet.evaluate.eval_images``), each runtime against eager fp32: top-1 agreement and
the change in top-1 accuracy. Calibration (int8, onnx-int8, auto) uses ``--calib-n`` training images spread
evenly over the training split.

    .venv/bin/python benchmarks/inference.py                 # full: a quiet machine, ~15-25 min on 2 cores
    .venv/bin/python benchmarks/inference.py --quick         # smoke test: tiny width, few iterations, no file

``--quick`` shrinks VGG-16 to 1/16 width (the anchor too: torchvision's ``VGG`` class built with the same
narrow layers), times each arm for ~0.1 s and evaluates 200 validation images; its numbers only show that
every path runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
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
from vggnet.infer import Predictor, Preprocessing, make_runtime, preprocess, top1_agreement
from vggnet.models import checkpoint_file, checkpoint_meta, load_checkpoint

RUNTIMES = ["eager", "channels_last", "bf16", "compile", "compile-bf16", "int8", "int8-dynamic", "onnx", "onnx-int8"]
# The precision each runtime's convolutions compute in: which peak its GFLOPS are compared with.
PRECISION = {"eager": "fp32", "channels_last": "fp32", "compile": "fp32", "onnx": "fp32", "int8-dynamic": "fp32",
             "bf16": "bf16", "compile-bf16": "bf16", "int8": "int8", "onnx-int8": "int8"}
TARGETS = {"bf16": 3.0, "compile-bf16": 3.0, "int8": 5.0}  # × torchvision eager fp32 (issue 5)
INT8_AGREEMENT, INT8_DROP = 0.99, 0.5
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ANCHOR = "torchvision vgg16 eager fp32"


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


def speed(args: argparse.Namespace, calib_images: list[Any], peak: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    tv = torchvision_vgg16(args.width, args.fc_width).eval()
    ours = vggnet.create_model("vgg16", width=args.width, fc_width=args.fc_width, weights=tv.state_dict()).eval()
    macs = vggnet.count_macs(ours.config, 224)
    prep = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=224, in_channels=3, num_classes=1000)
    calib = preprocess(calib_images, prep)  # CIFAR-10 training images upscaled to 224²: realistic value ranges
    batches = sorted(set(args.batches))
    inputs = {b: calib[torch.arange(b) % len(calib)] for b in batches}
    arms: dict[str, Any] = {ANCHOR: TorchvisionEager(tv)}
    builds: dict[str, float] = {ANCHOR: 0.0}
    for name in args.runtimes:
        t0 = time.perf_counter()
        try:
            runtime = make_runtime(name, ours, prep, calib)
            for b in batches:
                runtime(inputs[b])  # compile / specialise for every batch size before timing
        except Exception as exc:  # report, keep measuring the others
            print(f"  {name}: failed to build ({type(exc).__name__}: {exc})", flush=True)
            continue
        builds[name] = time.perf_counter() - t0
        arms[name] = runtime
        print(f"  built {name} in {builds[name]:.1f} s", flush=True)
    rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in arms}
    for r in range(args.repeats):
        for b in batches:
            for name, fn in arms.items():
                rates[name][b].append(timed(fn, inputs[b], args.target_s))
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} b{b} {rates[n][b][-1]:.2f}" for b in batches for n in arms), flush=True)
    rows = []
    for name in arms:
        precision = PRECISION.get(name, "fp32")  # the anchor is fp32
        row: dict[str, Any] = {"runtime": name, "precision": precision, "build_s": builds[name]}
        for b in batches:
            rate = statistics.median(rates[name][b])
            anchor = statistics.median(rates[ANCHOR][b])
            gflops = 2 * macs * rate / 1e9
            row[f"b{b}"] = {"img_per_s": rate, "runs": rates[name][b], "x_torchvision": rate / anchor,
                            "gflops": gflops, "pct_of_fp32_peak": 100 * gflops / peak["gflops"]["fp32"],
                            "pct_of_precision_peak": 100 * gflops / peak["gflops"][precision]}
        rows.append(row)
    return {"model": f"vgg16 (config D, fc head, 1000 classes, width {args.width}, fc_width {args.fc_width})",
            "input": "224x224", "macs_per_image": macs, "anchor": ANCHOR, "batches": batches, "rows": rows,
            "weights": "random init (torchvision's), shared by the anchor and vggnet; calibration: "
                       f"{len(calib_images)} CIFAR-10 training images resized to 224"}


# ---------------------------------------------------------------------------------------------- accuracy


def _tensors(images: Any, labels: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    kept = [(img, y) for img, y in zip(images, labels, strict=True) if img is not None]  # unreadable: skipped
    return [img for img, _ in kept], [y for _, y in kept]


def accuracy(args: argparse.Namespace, runtimes: list[str]) -> dict[str, Any]:
    from vggnet.evaluate import eval_images

    file = checkpoint_file(args.cifar_run)
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
            print(f"  {name}: failed ({type(exc).__name__}: {exc})", flush=True)
            rows.append({"runtime": name, "error": f"{type(exc).__name__}: {exc}"})
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
    head = f"{'runtime':<30}{'build s':>8}"
    for b in sp["batches"]:
        head += f" | b{b} {'img/s':>7}{'× tv':>6}{'GFLOPS':>8}{'%peak':>6}"
    print(head)
    for row in sp["rows"]:
        line = f"{row['runtime']:<30}{row['build_s']:>8.1f}"
        for b in sp["batches"]:
            c = row[f"b{b}"]
            line += (f" | {'':>2}{c['img_per_s']:>8.2f}{c['x_torchvision']:>6.2f}{c['gflops']:>8.1f}"
                     f"{c['pct_of_precision_peak']:>6.0f}")
        print(line)
    print("(%peak: of the peak for the runtime's precision; × tv: ratio to torchvision eager fp32, same run)")
    acc = result.get("accuracy")
    if acc:
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
            if name in rows:
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
    ap.add_argument("--runtimes", nargs="+", default=RUNTIMES, help="runtimes to measure (default: all)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=None, help="timing rounds (default: 3; --quick 1)")
    ap.add_argument("--target-s", type=float, default=None, help="seconds per timing (default: 3; --quick 0.1)")
    ap.add_argument("--speed-calib-n", type=int, default=None, help="calibration images for VGG-16 (default 32)")
    ap.add_argument("--calib-n", type=int, default=None, help="CIFAR-10 calibration images (default 512)")
    ap.add_argument("--val-limit", type=int, default=None, help="CIFAR-10 validation images (default: all)")
    ap.add_argument("--cifar-run", default="runs/cifar10")
    ap.add_argument("--cifar-data", default="data/cifar10")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--clock-ghz", type=float, default=None, help="core clock for the peak (default: measured)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/inference.json; "
                    "none with --quick)")
    args = ap.parse_args()
    quick = args.quick
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
    for name in ("torchao", "onnxruntime", "onnx", "onnxscript"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


if __name__ == "__main__":
    main()
