"""Transfer learning on real images: which way of reusing a VGG wins, at how many labelled images?

A VGG-11-BN (half width, the paper's fc head) is trained on five CIFAR-10 classes (airplane, automobile,
bird, cat, deer). Its knowledge is then moved to the other five (dog, frog, horse, ship, truck) with k
labelled training images per class, k in {10, 100, 1000}, drawn from their training split, and every
method is tested on the same 2,500 held-out validation images of those five classes:

- scratch: the same network from random weights, the same images, augmentation and number of steps, at
  the source net's learning rate (0.05 at batch 128, scaled linearly to the batch used);
- fine-tune (full): `vggnet train --recipe finetune --weights SOURCE` (lr 0.01 at batch 64, scaled
  linearly; features at 0.1x the head's lr);
- fine-tune (frozen to block 3): the same with `model.freeze=block3 model.freeze_bn=true`;
- Appendix B + linear SVM: `vggnet features` descriptors of the source net (dense, flip-averaged,
  L2-normalised) and `vggnet probe`'s LinearSVC with C chosen by 5-fold CV on the training images:
  relu7 at one scale vs three scales (averaged and stacked), and other layers (relu6 and the outputs of
  blocks 5, 4 (also at three scales) and 3).

k = 10 and 100 are drawn three times (seeds 0-2) and reported as mean ± standard deviation over draws;
k = 1000 once. The CIFAR split is the one training uses (val_fraction 0.1, seed 0). Every finished row is
kept in the results file, so an interrupted run continues where it stopped.

    .venv/bin/python benchmarks/transfer.py --data data/cifar10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from machine import write_results  # benchmarks/machine.py, beside this script
from vggnet.data import load_image_folder
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train
from vggnet.evaluate import FolderImages
from vggnet.transfer import FeatureFile, load_features, save_features
from vggnet.transfer.features import extract_features, load_source
from vggnet.transfer.probe import probe

SOURCE = ["airplane", "automobile", "bird", "cat", "deer"]
TARGET = ["dog", "frog", "horse", "ship", "truck"]
HERE = Path(__file__).resolve().parent
# per k: (batch size, epochs); the same for scratch and both fine-tunes, so each sees the same images.
# Learning rates follow the linear scaling rule from the recipes' own batch sizes: scratch 0.05 at 128
# (the source net's), fine-tuning 0.01 at 64 (the finetune recipe's)
BUDGET = {10: (10, 60), 100: (50, 30), 1000: (64, 12)}
SCRATCH_LR, FINETUNE_LR = (0.05, 128), (0.01, 64)
FEATURES = {  # row name: (layer, scales in px, stack)
    "SVM relu7 @32": ("relu7", [32], False),
    "SVM relu7 @32,48,64 avg": ("relu7", [32, 48, 64], False),
    "SVM relu7 @32,48,64 stack": ("relu7", [32, 48, 64], True),
    "SVM relu6 @32": ("relu6", [32], False),
    "SVM block5_pool @32": ("block5_pool", [32], False),
    "SVM block4_pool @32": ("block4_pool", [32], False),
    "SVM block4_pool @32,48,64 avg": ("block4_pool", [32, 48, 64], False),
    "SVM block3_pool @32": ("block3_pool", [32], False),
}
CIFAR = ["data.augment=flip_crop", "data.pad=4", "data.scale=null", "data.in_memory=true"]


def link_tree(root: Path, parts: dict[str, list[tuple[str, str]]]) -> Path:
    """An ImageFolder tree of symlinks: parts = {"train": [(class, path)...], "val": [...]}."""
    done = root / ".done"
    if done.exists():
        return root
    for part, samples in parts.items():
        for cls, path in samples:
            dst = root / part / cls / Path(path).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(os.path.abspath(path), dst)
    done.touch()
    return root


def draw(pool: dict[str, list[str]], k: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [(cls, paths[i]) for cls, paths in pool.items() for i in sorted(rng.choice(len(paths), k, replace=False))]


def take(ff: FeatureFile, index: np.ndarray) -> FeatureFile:
    """The rows ``index`` of a features file (a draw's training images, or the test images)."""
    return dataclasses.replace(ff, features=ff.features[index], labels=ff.labels[index],
                               paths=[ff.paths[i] for i in index], split=ff.split[index])


def run_training(name: str, tree: Path, out: Path, overrides: list[str], recipe: str) -> dict[str, Any]:
    r = load_recipe(recipe, [f"data.path={tree}", *overrides])
    start = time.perf_counter()
    result = train(r, out, resume=True, progress=False)
    return {"acc": result["val_top1"], "seconds": time.perf_counter() - start, "method": name}


ROW_ORDER = ["scratch", "fine-tune (full)", "fine-tune (frozen to block3)", *FEATURES]


def summary(rows: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """method -> k -> accuracies of its draws."""
    table: dict[str, dict[int, list[float]]] = {}
    for key, row in rows.items():
        if " | k=" in key:
            table.setdefault(row["method"], {}).setdefault(int(row["k"]), []).append(float(row["acc"]))
    return table


def markdown(rows: dict[str, Any], ks: list[int]) -> str:
    """Mean ± standard deviation over draws (one draw: the value alone)."""
    table = summary(rows)
    lines = ["| method | " + " | ".join(f"k = {k} / class" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for method in ROW_ORDER:
        cells = []
        for k in ks:
            accs = table.get(method, {}).get(k, [])
            if not accs:
                cells.append("–")
            elif len(accs) == 1:
                cells.append(f"{accs[0]:.1f}")
            else:
                cells.append(f"{np.mean(accs):.1f} ± {np.std(accs, ddof=1):.1f} (n={len(accs)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, Any], ks: list[int], path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from vggnet.plots import save_figure

    table = summary(rows)
    fig = Figure(figsize=(9.5, 4.8), layout="constrained")
    ax = fig.subplots()
    colours = colormaps["tab20"].colors
    for i, method in enumerate(ROW_ORDER):
        points = [(k, table[method][k]) for k in ks if k in table.get(method, {})]
        if not points:
            continue
        xs = [k for k, _ in points]
        means = [float(np.mean(a)) for _, a in points]
        errs = [float(np.std(a, ddof=1)) if len(a) > 1 else 0.0 for _, a in points]
        svm = method.startswith("SVM")
        ax.errorbar(xs, means, yerr=errs, fmt=("--" if svm else "-") + "o", capsize=3, label=method, markersize=4,
                    color=colours[(2 * i) % 20 if i < 10 else 2 * (i - 10) + 1], linewidth=1.2 if svm else 2.2)
    ax.set_xscale("log")
    ax.set_xticks(ks, labels=[str(k) for k in ks])
    ax.set_xlabel("labelled training images per class (5 target classes)")
    ax.set_ylabel("accuracy on 2,500 held-out images (%)")
    ax.set_title("CIFAR-10: 5 source classes -> 5 target classes, VGG-11-BN w0.5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="solid: trained, dashed: SVM",
              title_fontsize=8)
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/cifar10", help="the extracted CIFAR-10 JPEG tree")
    ap.add_argument("--work", default="runs/transfer", help="scratch folder: trees of links, runs, features")
    ap.add_argument("--ks", default="10,100,1000")
    ap.add_argument("--draws", type=int, default=3, help="draws of the training images for k < 1000")
    ap.add_argument("--out", default=str(HERE / "results" / "transfer.json"))
    ap.add_argument("--report", action="store_true", help="only print the table and redraw the plot from --out")
    args = ap.parse_args()
    ks = [int(v) for v in args.ks.split(",")]
    if args.report:
        rows = json.loads(Path(args.out).read_text())["rows"]
        print(markdown(rows, ks))
        plot(rows, ks, Path(args.out).with_suffix(".png"))
        return 0
    torch.set_num_threads(os.cpu_count() or 2)
    work, out = Path(args.work), Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    rows: dict[str, Any] = previous.get("rows", {})
    t0 = time.perf_counter() - previous.get("wall_seconds", 0.0)

    def save() -> None:
        write_results(out, "transfer", args, rows=rows, wall_seconds=time.perf_counter() - t0)

    train_ds, val_ds, classes = load_image_folder(args.data, val_fraction=0.1, seed=0)
    by_class = {part: {c: [p for p, y in ds.samples if classes[y] == c] for c in classes}
                for part, ds in (("train", train_ds), ("val", val_ds))}
    test = [(c, p) for c in TARGET for p in by_class["val"][c]]

    # 1. the source network
    source_tree = link_tree(work / "trees" / "source", {
        part: [(c, p) for c in SOURCE for p in by_class[part][c]] for part in ("train", "val")})
    recipe = str(HERE / "recipes" / "transfer_pretrain.yaml")
    if "source" not in rows:
        rows["source"] = run_training("source", source_tree, work / "source", [], recipe)
        save()
    weights = work / "source" / "best.safetensors"
    print(f"source net: {rows['source']['acc']:.2f}% on the 5 source classes' validation images", flush=True)
    arch = ["model.name=vgg11_bn", "model.width=0.5", "model.head=fc", "model.fc_width=512",
            "data.image_size=32", "data.mean=[0.4914,0.4822,0.4465]", "data.std=[0.2470,0.2435,0.2616]"]

    # 2. Appendix B features of every target-class image, once per setting
    model, prep, _ = load_source(ckpt=str(weights))
    pool_items = [(c, p) for c in TARGET for p in by_class["train"][c]]
    items = pool_items + test
    labels = np.array([TARGET.index(c) for c, _ in items])
    split = np.array(["train"] * len(pool_items) + ["val"] * len(test))
    index = {p: i for i, (_, p) in enumerate(items)}
    feats: dict[str, FeatureFile] = {}
    for name, (layer, scales, stack) in FEATURES.items():
        cache = work / "features" / f"{layer}-{'-'.join(map(str, scales))}-{'stack' if stack else 'avg'}.npz"
        if cache.exists():
            feats[name] = load_features(cache)
            continue
        start = time.perf_counter()
        f, ok = extract_features(model, FolderImages([p for _, p in items]), layer=layer, scales=scales,
                                 crop=prep["image_size"], mean=prep["mean"], std=prep["std"], stack=stack,
                                 batch_size=256, progress=sys.stderr.isatty())
        assert bool(ok.all()), "unreadable CIFAR images"
        feats[name] = FeatureFile(f.numpy(), labels, TARGET, [p for _, p in items], split, layer, scales, stack,
                                  model.config.name, str(weights))
        save_features(feats[name], cache)
        rows.setdefault("feature_seconds", {})[name] = time.perf_counter() - start
        save()

    # 3. each k, each draw: three trainings and the SVM rows
    for k in ks:
        batch, epochs = BUDGET[k]
        budget = [f"optim.batch_size={batch}", f"schedule.epochs={epochs}", f"train.eval_every={epochs}"]
        for seed in range(args.draws if k < 1000 else 1):
            chosen = draw({c: by_class["train"][c] for c in TARGET}, k, seed)
            tree = link_tree(work / "trees" / f"k{k}-s{seed}", {"train": chosen, "val": test})
            scratch_lr = SCRATCH_LR[0] * batch / SCRATCH_LR[1]
            tune_lr = f"optim.lr={FINETUNE_LR[0] * batch / FINETUNE_LR[1]:g}"
            runs = {
                "scratch": ("finetune", [*arch, f"optim.lr={scratch_lr:g}", "optim.lr_mult=null"]),
                "fine-tune (full)": ("finetune", [f"model.weights={weights}", tune_lr]),
                "fine-tune (frozen to block3)": ("finetune", [f"model.weights={weights}", tune_lr,
                                                              "model.freeze=block3", "model.freeze_bn=true"]),
            }
            for method, (rec, extra) in runs.items():
                key = f"{method} | k={k} | s{seed}"
                if key in rows:
                    continue
                slug = method.split(" ")[0] + ("-frozen" if "frozen" in method else "")
                rows[key] = {**run_training(method, tree, work / "runs" / f"k{k}-s{seed}-{slug}",
                                            [*CIFAR, *budget, *extra], rec), "k": k, "seed": seed}
                print(f"{key}: {rows[key]['acc']:.2f}% ({rows[key]['seconds']:.0f} s)", flush=True)
                save()
            rows_idx = np.array([index[p] for _, p in chosen])
            test_idx = np.array([index[p] for _, p in test])
            for name, ff in feats.items():
                key = f"{name} | k={k} | s{seed}"
                if key in rows:
                    continue
                start = time.perf_counter()
                report = probe(take(ff, rows_idx), take(ff, test_idx), models=("svm",), seed=seed)
                svm = report["results"]["svm"]
                rows[key] = {"acc": svm["accuracy"], "mAP": svm["mAP"], "C": svm["C"], "k": k, "seed": seed,
                             "seconds": time.perf_counter() - start, "method": name}
                print(f"{key}: {svm['accuracy']:.2f}% (C={svm['C']:g})", flush=True)
                save()
    save()
    print(markdown(rows, ks))
    plot(rows, ks, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
