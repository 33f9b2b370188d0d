"""A VGG that fits a phone: VGG-16-family variants under 50 MB, measured in the mobile runtimes.

The deployment guide asks for models under 50 MB on mobile and edge devices. The paper's VGG-16 is 528 MB at
1000 classes (134 M parameters at 10 classes: its fc6 alone is 103 M), so this benchmark trains the full-size net
and the compact ones on CIFAR-10 with one recipe and one budget, exports each as a phone would run it
(``.pte`` on ExecuTorch's XNNPACK backend, ``.tflite`` on LiteRT's interpreter, fp32 and INT8), and measures for
every file: its size, its top-1 on the same 5,000 validation images *run through that file in its own runtime*,
and its batch-1 latency in that runtime on this CPU.

Variants (VGG-16-BN, configuration D with batch norm, 32 × 32 inputs):

``full``    the paper's head (fc6 / fc7 4096 wide, dropout 0.5): the reference every row is compared with
``gap``     the compact head (global average pool → one linear layer): 14.7 M parameters, trained the same way
``pruned``  ``gap`` with 50 % of its MACs pruned (L1 filter norms, per layer) and fine-tuned ``--prune-epochs``

Training: ``benchmarks/recipes/compression_base.yaml`` (batch 256, Nesterov, one-cycle, label smoothing 0.1,
flip + crop) at width 1.0 for ``--epochs`` epochs each, same split seed, so every row is scored on the same
held-out images. The budget is what two CPU cores allow in an afternoon, not the paper's: the table compares the
variants with each other at that budget.

Latency: each file is timed at batch 1 in a fresh subprocess (its runtime alone in the process: a runtime loaded
beside another one slows both on two cores), ``--target-s`` seconds per timing, ``--repeats`` rounds interleaved
over the files; the table gives the median milliseconds per image.

    .venv/bin/vggnet data prepare ../shared/data/cifar10-train-jpg.tar.gz --out data/cifar10
    .venv/bin/python benchmarks/phone.py                       # train what is missing, export, measure (~55 min)
    .venv/bin/python benchmarks/phone.py --stages measure      # exports and measurements only (~8 min)
    .venv/bin/python benchmarks/phone.py --smoke               # every path at width 1/16, 1 epoch, no file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from machine import cpu_name

RECIPE = "benchmarks/recipes/compression_base.yaml"
LIMIT_MB = 50.0
FORMATS = ("executorch", "executorch-int8", "tflite", "tflite-int8")
SUFFIX = {"executorch": ".pte", "executorch-int8": ".int8.pte", "tflite": ".tflite", "tflite-int8": ".int8.tflite"}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def finished(run: Path, epochs: int) -> bool:
    final = run / "final.json"
    return final.is_file() and json.loads(final.read_text()).get("epoch", 0) >= epochs


def train_stage(args: argparse.Namespace) -> dict[str, float]:
    """Train the full-size and GAP nets and prune the GAP net, skipping what is already finished."""
    from vggnet.compress.prune import PruneSettings, prune_run
    from vggnet.engine.recipe import load_recipe
    from vggnet.engine.trainer import train

    work, walls = Path(args.work), {}
    common = [f"data.path={args.data}", f"model.width={args.width}", f"schedule.epochs={args.epochs}"]
    if args.smoke:  # train on 4 % of the images (2,000): paths only
        common.append("data.val_fraction=0.96")
    nets = {"full": ["model.head=fc", "model.dropout=0.5", f"model.fc_width={args.fc_width}"], "gap": []}
    for name, extra in nets.items():
        if not finished(work / name, args.epochs):
            log(f"training {name}")
            t0 = time.perf_counter()
            train(load_recipe(RECIPE, [*common, *extra]), work / name, progress=False)
            walls[name] = time.perf_counter() - t0
    if not finished(work / "pruned", args.prune_epochs):
        log("pruning gap")
        t0 = time.perf_counter()
        prune_run(PruneSettings(source=str(work / "gap"), macs_reduction=0.5), work / "pruned",
                  epochs=args.prune_epochs, progress=False, log=log)
        walls["pruned"] = time.perf_counter() - t0
    return walls


def time_file(path: str, target_s: float) -> float:
    """Milliseconds per image of ``path`` at batch 1 (a checkpoint runs eagerly in fp32), in this process."""
    from vggnet.export import load_exported
    from vggnet.infer import Predictor

    if path.endswith(".safetensors"):
        predictor = Predictor.from_checkpoint(path)
        fn, size = predictor.runtime, predictor.prep.image_size
    else:
        loaded = load_exported(path)
        fn, size = loaded.runtime, loaded.prep.image_size
    x = torch.randn(1, 3, size, size)
    for _ in range(3):
        fn(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < target_s:
        fn(x)
        n += 1
    return 1000 * (time.perf_counter() - t0) / n


def timed_in_subprocess(path: Path, target_s: float) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, __file__, "--time-file", str(path), "--target-s", str(target_s)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def measure_stage(args: argparse.Namespace) -> dict[str, Any]:
    """Export every variant in every format, score each file on the validation images in its own runtime, time
    each at batch 1 in its own process."""
    from vggnet.evaluate import eval_images
    from vggnet.export import export_model, load_exported
    from vggnet.infer import Predictor, Preprocessing, preprocess
    from vggnet.models import checkpoint_file, checkpoint_meta, count_macs, count_params, load_checkpoint

    work = Path(args.work)
    full_file = checkpoint_file(work / "full")
    model, extra = load_checkpoint(full_file)
    prep = Preprocessing.from_meta(checkpoint_meta(full_file, model, extra))
    images, labels, _ = eval_images(work / "full", None, "val", classes=prep.classes, limit=args.val_limit)
    kept = [(im, y) for im, y in zip(images, labels, strict=True) if im is not None]
    x, y = preprocess([im for im, _ in kept], prep), torch.tensor([lab for _, lab in kept])
    log(f"{len(y)} validation images")
    exports = work / "exports"
    exports.mkdir(exist_ok=True)

    rows: list[dict[str, Any]] = []
    correct: dict[str, list[bool]] = {}

    def score(name: str, fn: Any, chunk: int) -> float:
        logits = torch.cat([fn(part) for part in x.split(chunk)])
        hits = logits.argmax(1) == y
        correct[name] = hits.tolist()
        return 100 * float(hits.float().mean())

    for variant in ("full", "gap", "pruned"):
        run = work / variant
        file = checkpoint_file(run)
        net, _ = load_checkpoint(file)
        facts = {"variant": variant, "params": count_params(net), "macs": count_macs(net.config, prep.image_size)}
        name = f"{variant} checkpoint (fp32, PyTorch eager)"
        top1 = score(name, Predictor.from_checkpoint(file, max_batch=256).runtime, 256)
        rows.append({**facts, "name": name, "format": "checkpoint", "file": str(file),
                     "mb": file.stat().st_size / 1e6, "top1": top1})
        log(f"  {name}: {top1:.2f} %, {rows[-1]['mb']:.1f} MB")
        for fmt in args.formats:
            if variant == "full" and fmt.startswith("tflite") and not args.full_tflite:
                continue
            path = exports / f"{variant}{SUFFIX[fmt]}"
            if not path.is_file():
                t0 = time.perf_counter()
                options: dict[str, Any] = {"calib_images": args.calib_n} if fmt.endswith("int8") else {}
                if fmt.endswith("int8") and args.smoke:
                    options["min_agreement"] = 0.0  # a 1-epoch smoke net is near chance: nothing to agree on
                if fmt.startswith("executorch"):
                    options["max_batch"] = 100
                export_model(file, fmt, path, **options)
                log(f"  exported {path.name} in {time.perf_counter() - t0:.0f} s")
            loaded = load_exported(path)
            name = f"{variant} {fmt}"
            top1 = score(name, loaded.runtime, 100)
            rows.append({**facts, "name": name, "format": fmt, "file": str(path), "mb": path.stat().st_size / 1e6,
                         "top1": top1})
            log(f"  {name}: {top1:.2f} %, {rows[-1]['mb']:.1f} MB")
            del loaded

    ms: dict[str, list[float]] = {row["name"]: [] for row in rows}
    for r in range(args.repeats):
        for row in rows:
            ms[row["name"]].append(timed_in_subprocess(Path(row["file"]), args.target_s))
        log(f"  latency round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in ms.items()))
    reference = rows[0]["top1"]
    ref_hits = torch.tensor(correct[rows[0]["name"]])
    for row in rows:
        row["ms_batch1"] = statistics.median(ms[row["name"]])
        row["ms_runs"] = ms[row["name"]]
        row["under_limit"] = row["mb"] < LIMIT_MB
        row["delta_vs_full"] = row["top1"] - reference
        hits = torch.tensor(correct[row["name"]])
        # paired on the same images: one standard error of the difference in points
        diff = hits.float() - ref_hits.float()
        row["delta_se"] = 100 * float(diff.std() / len(diff) ** 0.5)
    return {"validation_images": len(y), "calibration_images": args.calib_n, "reference": rows[0]["name"],
            "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = ["| variant | format | params (M) | file (MB) | < 50 MB | top-1 % | Δ vs full (± SE) | ms, batch 1 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | {row['format']} | {row['params'] / 1e6:.1f} | {row['mb']:.1f} | "
                     f"{'yes' if row['under_limit'] else 'no'} | {row['top1']:.2f} | "
                     f"{row['delta_vs_full']:+.2f} ± {row['delta_se']:.2f} | {row['ms_batch1']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/cifar10", help="CIFAR-10 JPEG tree from `vggnet data prepare`")
    ap.add_argument("--work", default="runs/edge", help="run folders and exported files")
    ap.add_argument("--stages", nargs="+", default=["train", "measure"], choices=["train", "measure"])
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the full-size and GAP nets")
    ap.add_argument("--prune-epochs", type=int, default=3, help="fine-tuning epochs after pruning")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--full-tflite", action="store_true",
                    help="also convert the full-size net to .tflite (a 537 MB conversion; off by default)")
    ap.add_argument("--calib-n", type=int, default=512, help="calibration images of the INT8 files")
    ap.add_argument("--val-limit", type=int, default=None, help="validation images (default: all 5,000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-s", type=float, default=2.0)
    ap.add_argument("--smoke", action="store_true", help="width 1/16, fc 64, 1 epoch, 2,000 images: paths only")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/phone.json)")
    ap.add_argument("--time-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_file:
        print(time_file(args.time_file, args.target_s))
        return 0
    args.width, args.fc_width = 1.0, 4096
    if args.smoke:
        args.width, args.fc_width, args.epochs, args.prune_epochs = 1 / 16, 64, 1, 1
        args.work = args.work if args.work != "runs/edge" else "runs/edge-smoke"
        args.val_limit, args.repeats, args.target_s, args.calib_n = args.val_limit or 200, 1, 0.2, 64
    out = args.out or (None if args.smoke else "benchmarks/results/phone.json")
    walls = train_stage(args) if "train" in args.stages else {}
    if "measure" not in args.stages:
        return 0
    result = {"benchmark": "VGG-16-family variants under 50 MB in the mobile runtimes (CIFAR-10 validation)",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.date.today().isoformat(),
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "cpu_model": cpu_name()},
              "recipe": RECIPE, "epochs": args.epochs, "prune_epochs": args.prune_epochs, "train_walls_s": walls,
              **measure_stage(args)}
    print(table(result))
    if out:
        from vggnet.atomic import write_json

        write_json(out, result)
        log(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
