"""Localisation on real photos: box regression (Appendix A) and Grad-CAM boxes on the raccoon set.

Data: 200 photos with PASCAL VOC boxes (`../shared/data/raccoon-voc.tar.gz`, one class), split 160 / 40 by a
fixed seed; every figure is on the 40 held-out photos. The source network is the 5-class CIFAR-10 classifier
of `benchmarks/transfer.py` (VGG-11-BN, width 0.5, fc head of 512; airplane, automobile, bird, cat, deer):
no ImageNet weights can be downloaded here.

Arms (each a `vggnet.localize.train.train_localizer` run, S = --image-size, the last epoch kept):
  SCR, all layers, Euclidean loss (the paper) · SCR, FC layers only · SCR, smooth-L1 · SCR from scratch;
  each tested with the whole image, the paper's centre crop, and dense windows over 3 scales, merged.
  One class means PCR is SCR here (4 × 1 outputs), so SCR vs PCR is measured on a second set: five CIFAR-10
  classes the source never saw, each photo pasted at a random place and size on another CIFAR photo
  (1,000 canvases of 128², 800 / 200), scored with the true class (the paper's first protocol).
Baselines (no pixel seen): the mean training box, a centred box of the mean size, the whole image.
Grad-CAM boxes: the source classifier's top-1 class explained on the whole image; the map thresholded at a
fraction of its peak, the box around the largest region. Input size, layer and fraction are chosen on the
160 training photos (never on the 40), then applied once to the held-out photos.

    .venv/bin/vggnet data prepare ../shared/data/raccoon-voc.tar.gz --out data/raccoon
    .venv/bin/vggnet data prepare ../shared/data/cifar10-train-jpg.tar.gz --out data/cifar10
    .venv/bin/python benchmarks/localize.py [--data data/raccoon] [--source runs/transfer/source] [--skip canvas]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF

from machine import write_results  # benchmarks/machine.py, beside this script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def arms(source: str | None) -> dict[str, dict[str, Any]]:
    base = {"weights": source, "per_class": False, "loss": "l2", "finetune": "all"}
    return {"SCR, all layers, L2 (paper)": base,
            "SCR, FC layers only, L2": {**base, "finetune": "fc"},
            "SCR, all layers, smooth-L1": {**base, "loss": "smooth_l1"},
            "SCR, all layers, L2, from scratch": {**base, "weights": None, "model": "vgg11_bn", "width": 0.5,
                                                  "fc_width": 512}}


def paired(rows: dict[str, Any]) -> dict[str, Any]:
    """The best network row against the best baseline on the same images: per-image IoU differences (mean,
    standard error) and how many images each wins, so "clearly better" is a measured statement."""
    import statistics

    nets = {k: v for k, v in rows.items() if not k.startswith("baseline") and "iou" in v}
    bases = {k: v for k, v in rows.items() if k.startswith("baseline")}
    if not nets or not bases:
        return {}
    net = max(nets, key=lambda k: nets[k]["mean_iou"])
    base = max(bases, key=lambda k: bases[k]["mean_iou"])
    diff = [a - b for a, b in zip(nets[net]["iou"], bases[base]["iou"], strict=True)]
    se = statistics.stdev(diff) / len(diff) ** 0.5
    return {"network": net, "baseline": base, "mean_iou_gain": statistics.fmean(diff), "se": se,
            "network_better": sum(d > 0 for d in diff), "baseline_better": sum(d < 0 for d in diff),
            "hits_only_network": sum(a >= 0.5 > b for a, b in zip(nets[net]["iou"], bases[base]["iou"],
                                                                  strict=True)),
            "hits_only_baseline": sum(b >= 0.5 > a for a, b in zip(nets[net]["iou"], bases[base]["iou"],
                                                                   strict=True))}


def train_or_reuse(settings, train, classes, folder: Path, val, data: str, reuse: bool) -> float:
    """Train the arm, or with ``reuse`` take the run already in ``folder`` when it was trained with the same
    settings (training is deterministic on CPU: same seed, same weights); returns the training seconds."""
    from dataclasses import asdict

    from vggnet.localize.train import train_localizer

    done = folder / "settings.json"
    if reuse and done.is_file() and json.loads(done.read_text()) == json.loads(json.dumps(asdict(settings))):
        print(f"  reusing {folder}", file=sys.stderr, flush=True)
        return float(json.loads((folder / "metrics.json").read_text())[-1]["seconds"])
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    start = time.perf_counter()
    train_localizer(settings, train, classes, folder, val, data=data,
                    log=lambda line: print("   ", line, file=sys.stderr, flush=True))
    return time.perf_counter() - start


CANVAS_CLASSES = ("dog", "frog", "horse", "ship", "truck")  # none of the source network's five


def make_canvas_voc(cifar: Path, out: Path, per_class: int = 200, size: int = 128, seed: int = 0) -> Path:
    """A five-class box set built from CIFAR-10 photos, so that per-class regression has classes to tell
    apart: one object photo (dog, frog, horse, ship or truck), scaled to 40-112 px and of a random aspect,
    pasted at a random place on another CIFAR photo of a source class (airplane ... deer) scaled to the canvas.
    Synthetic placement on real photos; written as a VOC folder, once."""
    import numpy as np
    from PIL import Image

    from vggnet.data.voc import VOCAnnotation, VOCObject, write_voc

    if (out / "annotations").is_dir() and len(list((out / "annotations").glob("*.xml"))) == 5 * per_class:
        return out
    rng = np.random.default_rng(seed)
    backgrounds = sorted(p for c in ("airplane", "automobile", "bird", "cat", "deer")
                         for p in (cifar / "train" / c).glob("*.jpg"))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    for name in CANVAS_CLASSES:
        photos = sorted((cifar / "train" / name).glob("*.jpg"))
        for i, k in enumerate(rng.choice(len(photos), per_class, replace=False)):
            with Image.open(backgrounds[rng.integers(len(backgrounds))]) as bg:
                canvas = bg.convert("RGB").resize((size, size), Image.BILINEAR)
            w = int(rng.integers(40, 113))
            h = int(np.clip(round(w * np.exp(rng.uniform(-0.3, 0.3))), 32, size))
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            with Image.open(photos[k]) as obj:
                canvas.paste(obj.convert("RGB").resize((w, h), Image.BILINEAR), (x0, y0))
            stem = f"{name}-{i:03d}"
            canvas.save(out / "images" / f"{stem}.jpg", quality=92)
            write_voc(VOCAnnotation(out / "images" / f"{stem}.jpg", size, size,
                                    (VOCObject(name, (float(x0), float(y0), float(x0 + w), float(y0 + h))),)),
                      out / "annotations" / f"{stem}.xml")
    return out


def canvas_study(args: argparse.Namespace) -> dict[str, Any]:
    """SCR vs PCR on the five-class canvas set (scored with each image's true class, the paper's first protocol)."""
    from vggnet.data.voc import load_voc_folder, split_annotations
    from vggnet.localize.evaluate import baselines, predict_boxes, score
    from vggnet.localize.runs import load_localizer
    from vggnet.localize.train import LocalizeSettings, eval_samples

    folder = make_canvas_voc(Path(args.cifar), Path(args.work) / "canvas-voc")
    annotations, _ = load_voc_folder(folder)
    train, val = split_annotations(annotations, 200, 0)
    classes = list(CANVAS_CLASSES)
    train_samples, val_samples = eval_samples(train, classes), eval_samples(val, classes)
    truths = [t for _, t, _ in val_samples]
    rows: dict[str, Any] = {f"baseline: {k}": v for k, v in baselines(
        [t[0] for _, t, _ in train_samples], [tuple(x.shape[-2:]) for x, _, _ in train_samples], truths,
        [tuple(x.shape[-2:]) for x, _, _ in val_samples], per_image=True).items()}
    runs = {}
    for name, per_class in (("SCR", False), ("PCR", True)):
        settings = LocalizeSettings(weights=args.source, per_class=per_class, image_size=args.image_size,
                                    epochs=args.canvas_epochs, val=200)
        run = Path(args.work) / f"canvas-{name}"
        train_s = train_or_reuse(settings, train, classes, run, val, str(folder), args.reuse)
        runs[name] = {"folder": str(run), "train_s": round(train_s, 1)}
        model, spec, views, _ = load_localizer(run)
        for protocol in ("whole", "dense"):
            preds = [predict_boxes(model, x, spec, views, protocol, label if per_class else None)[0]
                     for x, _, label in val_samples]
            rows[f"{name}, all layers, L2 — {protocol}"] = score(torch.stack(preds), truths, per_image=True)
            print(f"canvas {name} — {protocol}: {rows[f'{name}, all layers, L2 — {protocol}']}", flush=True)
    return {"rows": rows, "runs": runs, "paired": paired(rows), "images": {"train": len(train), "val": len(val)},
            "classes": classes}


def gradcam_boxes(model, samples, mean, std, size: int, layer: str, fractions: list[float]) -> dict[float, list]:
    """Per fraction, one box per sample (image pixels), from the top-1 class's Grad-CAM at ``layer``."""
    from vggnet.explain import cam_box, grad_cam

    out: dict[float, list] = {f: [] for f in fractions}
    for pixels, _, _ in samples:
        h, w = pixels.shape[-2:]
        x = TF.normalize(TF.to_dtype(TF.resize(pixels, [size, size], antialias=True), torch.float32, scale=True),
                         mean, std)[None]
        cam = grad_cam(model, x, layer)[0]
        for f in fractions:
            x0, y0, x1, y1 = cam_box(cam, f)
            out[f].append(torch.tensor([x0 * w / size, y0 * h / size, x1 * w / size, y1 * h / size]))
    return out


def gradcam_study(source: Path, train_samples, val_samples) -> dict[str, Any]:
    from vggnet.explain import grad_cam_raw
    from vggnet.localize.evaluate import score
    from vggnet.models import checkpoint_file, load_checkpoint

    model, extra = load_checkpoint(checkpoint_file(source))
    mean, std = extra["mean"], extra["std"]
    fractions = [0.1, 0.2, 0.3, 0.5]
    grid = []
    for size in (32, 64, 96):
        for layer in ("block3_relu2", "block4_relu2", "block5_relu2"):
            boxes = gradcam_boxes(model, train_samples, mean, std, size, layer, fractions)
            cells = int(grad_cam_raw(model, torch.zeros(1, 3, size, size), layer).maps.shape[-1])
            for f in fractions:
                s = score(torch.stack(boxes[f]), [t for _, t, _ in train_samples])
                grid.append({"size": size, "layer": layer, "fraction": f, "map_cells": cells, **s})
                print(f"  Grad-CAM on the training photos: {size}px {layer} at {f:.1f}: "
                      f"{100 * s['acc_iou50']:.1f} %, mean IoU {s['mean_iou']:.3f}", file=sys.stderr, flush=True)
    best = max(grid, key=lambda r: (r["acc_iou50"], r["mean_iou"]))
    # A map of 2×2 cells or fewer cannot point anywhere: its box is a near-whole-image guess. The best setting
    # whose map has at least 4×4 cells is reported beside the unconstrained choice.
    spatial = max((r for r in grid if r["map_cells"] >= 4), key=lambda r: (r["acc_iou50"], r["mean_iou"]))
    out: dict[str, Any] = {"grid": grid}
    for key, pick in (("chosen_on_train", best), ("chosen_on_train_map_4x4_or_more", spatial)):
        boxes = gradcam_boxes(model, val_samples, mean, std, pick["size"], pick["layer"], [pick["fraction"]])
        out[key] = pick
        out[key.replace("chosen_on_train", "held_out")] = score(
            torch.stack(boxes[pick["fraction"]]), [t for _, t, _ in val_samples], per_image=True)
        out["boxes"] = boxes[pick["fraction"]]  # the pictures show the last pick: the spatial one
    with torch.no_grad():
        classes = extra["classes"]
        tops = []
        for pixels, _, _ in val_samples:
            x = TF.normalize(TF.to_dtype(TF.resize(pixels, [spatial["size"]] * 2, antialias=True), torch.float32,
                                         scale=True), mean, std)[None]
            tops.append(classes[int(model(x).argmax())])
    out["explained_classes"] = {c: tops.count(c) for c in sorted(set(tops))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/raccoon", help="VOC folder from `vggnet data prepare`")
    ap.add_argument("--source", default="runs/transfer/source", help="classification run to start from")
    ap.add_argument("--work", default="runs/localize", help="run folders")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--only", nargs="*", help="run only these arms (names as in the table)")
    ap.add_argument("--cifar", default="data/cifar10", help="CIFAR-10 JPEG tree for the five-class canvas set")
    ap.add_argument("--canvas-epochs", type=int, default=15)
    ap.add_argument("--skip", nargs="*", default=[], choices=("raccoon", "gradcam", "canvas"),
                    help="parts not to run (their results are kept from --out)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep arms already trained in --work with the same settings (re-test only)")
    ap.add_argument("--out", default=str(HERE / "results" / "localize.json"))
    ap.add_argument("--pictures", default=str(ROOT / "docs" / "img"), help="where the example PNGs go")
    args = ap.parse_args()

    from vggnet.data.voc import load_voc_folder, split_annotations
    from vggnet.localize.draw import contact_sheet, draw_boxes, save_png
    from vggnet.localize.evaluate import baselines, predict_boxes, score
    from vggnet.localize.runs import load_localizer
    from vggnet.localize.train import LocalizeSettings, eval_samples

    if not Path(args.source).exists():
        sys.exit(f"{args.source}: no source network; run benchmarks/transfer.py first (it trains it)")
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.is_file() and args.skip else {}
    command = " ".join(["python", *sys.argv])
    parts: dict[str, Any] = {k: kept.get(k) for k in ("raccoon", "gradcam", "canvas")}
    annotations, skipped = load_voc_folder(args.data)
    train, val = split_annotations(annotations, 40, 0)
    classes = sorted({o.name for a in annotations for o in a.objects})
    print(f"{len(train)} / {len(val)} photos, {len(skipped)} skipped, classes {classes}", flush=True)
    train_samples, val_samples = eval_samples(train, classes), eval_samples(val, classes)
    truths = [t for _, t, _ in val_samples]

    if "raccoon" not in args.skip:
        rows: dict[str, Any] = {f"baseline: {k}": v for k, v in baselines(
            [t[0] for _, t, _ in train_samples], [tuple(x.shape[-2:]) for x, _, _ in train_samples], truths,
            [tuple(x.shape[-2:]) for x, _, _ in val_samples], per_image=True).items()}
        runs: dict[str, Any] = {}
        for name, overrides in arms(args.source).items():
            settings = LocalizeSettings(image_size=args.image_size, epochs=args.epochs, **overrides)
            folder = Path(args.work) / name.replace(", ", "-").replace(" ", "_").replace("(", "").replace(")", "")
            train_s = train_or_reuse(settings, train, classes, folder, val, args.data, args.reuse)
            model, spec, views, _ = load_localizer(folder)
            runs[name] = {"folder": str(folder), "train_s": round(train_s, 1), "settings": vars(settings)}
            for protocol in ("whole", "centre", "dense"):
                start = time.perf_counter()
                preds = [predict_boxes(model, x, spec, views, protocol)[0] for x, _, _ in val_samples]
                rows[f"{name} — {protocol}"] = {**score(torch.stack(preds), truths, per_image=True),
                                               "test_s": round(time.perf_counter() - start, 1)}
                print(f"{name} — {protocol}: {rows[f'{name} — {protocol}']}", flush=True)
            if name.endswith("(paper)"):  # example pictures of the paper's recipe, its best protocol (whole)
                pictures = []
                for x, t, _ in val_samples[:8]:
                    box, _ = predict_boxes(model, x, spec, views, "whole")
                    pictures.append(draw_boxes(x, box, t))
                save_png(contact_sheet(pictures, cell=192), Path(args.pictures) / "localize_raccoon.png")
        parts["raccoon"] = {"command": command, "rows": rows, "runs": runs, "paired": paired(rows),
                            "split": {"train": len(train), "val": len(val), "seed": 0}}

    if "gradcam" not in args.skip:
        start = time.perf_counter()
        cam = gradcam_study(Path(args.source), train_samples, val_samples)
        pictures = [draw_boxes(x, b, t, "Grad-CAM") for (x, t, _), b in zip(val_samples[:8], cam.pop("boxes"),
                                                                           strict=False)]
        save_png(contact_sheet(pictures, cell=192), Path(args.pictures) / "gradcam_boxes_raccoon.png")
        parts["gradcam"] = {"command": command, **cam, "seconds": round(time.perf_counter() - start, 1)}

    if "canvas" not in args.skip:
        parts["canvas"] = {"command": command, **canvas_study(args)}

    for part in ("raccoon", "gradcam", "canvas"):
        if not parts[part]:
            continue
        table = dict(parts[part].get("rows", {}))
        if part == "gradcam":
            table = {}
            for key in ("chosen_on_train", "chosen_on_train_map_4x4_or_more"):
                pick = parts[part][key]
                table[f"Grad-CAM box ({pick['size']} px, {pick['layer']} = {pick['map_cells']}² map, "
                      f"{pick['fraction']:g} of the peak)"] = parts[part][key.replace("chosen_on_train", "held_out")]
        print(f"\n{part}\n| predictor | acc @ IoU 0.5 | mean IoU |\n|---|---|---|")
        for name, r in table.items():
            print(f"| {name} | {100 * r['acc_iou50']:.1f} % | {r['mean_iou']:.3f} |")
    write_results(out, "localize", args, **parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
