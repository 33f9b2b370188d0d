"""Transfer learning on real images: which way of reusing a VGG wins, at how many labelled images?

A VGG-11-BN (half width, the paper's fc head) is trained on five CIFAR-10 classes (airplane, automobile,
bird, cat, deer). Its knowledge is then moved to the other five (dog, frog, horse, ship, truck) with k
labelled training images per class, k in {10, 100, 1000}, drawn from their training split, and every
method is tested on the same 2,500 held-out validation images of those five classes:

- scratch: the same network from random weights, the same images, augmentation and number of steps, at
  the source net's learning rate (0.05 at batch 128, scaled linearly to the batch used);
- fine-tune (full): `vggnet train --recipe finetune --weights SOURCE` with the budget set per k (batch, epochs,
  lr 0.01 at batch 64 scaled linearly; features at 0.1x the head's lr; pad-crop + flip; the recipe's fitting
  to the data switched off);
- fine-tune (defaults): what a user gets: `vggnet train --recipe finetune --weights SOURCE --data TREE` with
  nothing else, through the CLI, on a folder holding only the k images per class (the recipe picks the
  augmentation, the validation split, the batch and the epochs itself), then `vggnet eval --ckpt RUN` on the
  held-out images;
- fine-tune (frozen to block 3): the same with `model.freeze=block3 model.freeze_bn=true`;
- Appendix B + linear SVM: `vggnet features` descriptors of the source net (dense, flip-averaged,
  L2-normalised) and `vggnet probe`'s LinearSVC with C chosen by 5-fold CV on the training images:
  relu7 at one scale vs three scales (averaged and stacked), and other layers (relu6 and the outputs of
  blocks 5, 4 (also at three scales) and 3).

k = 10 and 100 are drawn three times (seeds 0-2) and reported as mean ± standard deviation over draws;
k = 1000 once. The CIFAR split is the one training uses (val_fraction 0.1, seed 0). Every finished row is
kept in the results file, so an interrupted run continues where it stopped; the source net is trained into
``--work`` unless it is there, and rows measured with another source net (their weights gone or different) are
kept apart in the file, under their source's date and accuracy, so no table mixes two source nets.

    .venv/bin/python benchmarks/transfer.py --data data/cifar10
    .venv/bin/python benchmarks/transfer.py --data data/cifar10 --rows 'fine-tune (defaults)' 'fine-tune (full)'
    .venv/bin/python benchmarks/transfer.py --report          # the tables and the plot again, from the file
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
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
    if "val_top1" not in result:  # the folder was already trained to its end: its final metrics
        result = json.loads((out / "final.json").read_text())
    command = f"vggnet train --recipe {Path(recipe).stem} --data {tree} --out {out} --set {' '.join(overrides)}"
    return {"acc": result["val_top1"], "seconds": time.perf_counter() - start, "method": name,
            "command": command.removesuffix(" --set ")}


def run_defaults(weights: Path, tree: Path, test_tree: Path, out: Path) -> dict[str, Any]:
    """What a user gets: ``vggnet train --recipe finetune --weights SOURCE --data TREE`` with nothing else, through
    the CLI's own code path, on a folder holding only the k images per class; then ``vggnet eval --ckpt RUN`` (the
    checkpoint the run folder offers) on the held-out images, the val/ folder of ``test_tree``."""
    from vggnet.cli import main as cli

    command = ["train", "--recipe", "finetune", "--weights", str(weights), "--data", str(tree), "--out", str(out)]
    start = time.perf_counter()
    if cli(command) != 0:
        raise SystemExit(f"vggnet {' '.join(command)}: failed")
    seconds = time.perf_counter() - start
    scored = ["eval", "--ckpt", str(out), "--data", str(test_tree), "--out", str(out / "heldout")]
    if cli(scored) != 0:
        raise SystemExit(f"vggnet {' '.join(scored)}: failed")
    result = json.loads((out / "heldout" / "eval.json").read_text())["results"][0]
    ran = load_recipe(out / "recipe.yaml")  # what the defaults became on this folder
    chosen = {"data.augment": ran["data"]["augment"], "data.val_fraction": ran["data"]["val_fraction"],
              "optim.batch_size": ran["optim"]["batch_size"], "optim.lr": ran["optim"]["lr"],
              "schedule.epochs": ran["schedule"]["epochs"]}
    return {"acc": 100.0 - result["top1_err"], "seconds": seconds, "method": DEFAULTS, "resolved": chosen,
            "command": "vggnet " + " ".join(command), "scored_by": "vggnet " + " ".join(scored)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trained(run: Path) -> bool:
    """Whether a run folder has trained every epoch of its schedule (its best.safetensors exists long before)."""
    final = run / "final.json"
    if not final.exists():
        return False
    result = json.loads(final.read_text())
    return result.get("epoch") is not None and result.get("epoch") == result.get("epochs")


def source_net(rows: dict[str, Any], earlier: dict[str, Any], previous: dict[str, Any], tree: Path, work: Path,
               save: Callable[[], None]) -> Path:
    """The source network's weights, trained (or its training resumed) unless ``work`` holds it complete.

    Rows measured with another source net (the file's, when its weights are gone, unfinished or different) move
    to ``earlier`` under the date and accuracy of their source, and the file is saved so before training starts:
    no table mixes two source nets, and an interrupted run resumes the new source, not the old rows."""
    weights = work / "source" / "best.safetensors"
    done = trained(work / "source")
    recorded = rows.get("source", {}).get("sha256")
    if done and "source" in rows and recorded in (None, sha256(weights)):
        if recorded is None:  # the file's rows came from these very weights (no hash was kept then)
            rows["source"]["sha256"] = sha256(weights)
            save()
        return weights
    if rows:
        old = rows.get("source", {})
        tag = f"{previous.get('date', 'earlier')}, source net {old.get('acc', float('nan')):.2f} %"
        earlier[tag] = {"rows": dict(rows), "machine": previous.get("machine"),
                        "wall_seconds": previous.get("wall_seconds")}
        print(f"the source net of {len(rows)} rows in the results file is not (completely) in {work / 'source'}: "
              f"those rows are kept as {tag!r}; training the source net again", flush=True)
        rows.clear()
        save()
    recipe = str(HERE / "recipes" / "transfer_pretrain.yaml")
    rows["source"] = {**run_training("source", tree, work / "source", [], recipe), "sha256": sha256(weights)}
    save()
    return weights


DEFAULTS = "fine-tune (defaults)"
ROW_ORDER = ["scratch", "fine-tune (full)", DEFAULTS, "fine-tune (frozen to block3)", *FEATURES]


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
        if method not in table:  # not run with this source net
            continue
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


def sources(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(title, rows) of each source net in a results file: the current one first, then earlier ones."""
    rows = results.get("rows", {})
    current = f"source net {rows['source']['acc']:.2f} % ({results.get('date', '')})" if "source" in rows else ""
    return [(current, rows), *((tag, e["rows"]) for tag, e in results.get("earlier_sources", {}).items())]


def plot(results: dict[str, Any], ks: list[int], path: Path) -> None:
    """Accuracy against k, every row of every source net: the current one bold, earlier ones faded."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from vggnet.plots import save_figure

    fig = Figure(figsize=(10.5, 5.2), layout="constrained")
    ax = fig.subplots()
    colours = colormaps["tab20"].colors
    many = len(sources(results)) > 1
    for n, (title, rows) in enumerate(sources(results)):
        table = summary(rows)
        for i, method in enumerate(ROW_ORDER):
            points = [(k, table[method][k]) for k in ks if k in table.get(method, {})]
            if not points:
                continue
            xs = [k for k, _ in points]
            means = [float(np.mean(a)) for _, a in points]
            errs = [float(np.std(a, ddof=1)) if len(a) > 1 else 0.0 for _, a in points]
            svm = method.startswith("SVM")
            ax.errorbar(xs, means, yerr=errs, fmt=("--" if svm else "-" if n == 0 else ":") + "o", capsize=3,
                        label=method + (f" [{title}]" if many else ""), markersize=4, alpha=1.0 if n == 0 else 0.5,
                        color=colours[(2 * i) % 20 if i < 10 else 2 * (i - 10) + 1],
                        linewidth=1.2 if svm or n else 2.2)
    ax.set_xscale("log")
    ax.set_xticks(ks, labels=[str(k) for k in ks])
    ax.set_xlabel("labelled training images per class (5 target classes)")
    ax.set_ylabel("accuracy on 2,500 held-out images (%)")
    ax.set_title("CIFAR-10: 5 source classes -> 5 target classes, VGG-11-BN w0.5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="solid: trained, dashed: SVM"
              + (", dotted / faded: an earlier source net" if many else ""), title_fontsize=7)
    save_figure(fig, path)


def report_tables(results: dict[str, Any], ks: list[int]) -> str:
    """One table per source net (a row's numbers never mix two source nets)."""
    parts = []
    for title, rows in sources(results):
        parts.append(f"### {title}\n\n{markdown(rows, ks)}" if title else markdown(rows, ks))
    return "\n\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/cifar10", help="the extracted CIFAR-10 JPEG tree")
    ap.add_argument("--work", default="runs/transfer", help="scratch folder: trees of links, runs, features")
    ap.add_argument("--ks", default="10,100,1000")
    ap.add_argument("--draws", type=int, default=3, help="draws of the training images for k < 1000")
    ap.add_argument("--out", default=str(HERE / "results" / "transfer.json"))
    ap.add_argument("--report", action="store_true", help="only print the table and redraw the plot from --out")
    ap.add_argument("--rows", nargs="+", metavar="ROW", help="run only these rows (and the source net they need), "
                    "e.g. --rows 'fine-tune (defaults)' 'fine-tune (full)'; 'source' alone trains only the source")
    args = ap.parse_args()
    ks = [int(v) for v in args.ks.split(",")]
    if args.report:
        results = json.loads(Path(args.out).read_text())
        print(report_tables(results, ks))
        plot(results, ks, Path(args.out).with_suffix(".png"))
        return 0
    torch.set_num_threads(os.cpu_count() or 2)
    work, out = Path(args.work), Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    rows: dict[str, Any] = previous.get("rows", {})
    earlier: dict[str, Any] = previous.get("earlier_sources", {})
    t0 = time.perf_counter() - previous.get("wall_seconds", 0.0)
    wanted = set(args.rows or ROW_ORDER)
    unknown = wanted - set(ROW_ORDER) - {"source"}
    if unknown:
        ap.error(f"unknown --rows {sorted(unknown)}; rows: {', '.join(ROW_ORDER)} (or source alone)")

    def save() -> None:
        extra = {"earlier_sources": earlier} if earlier else {}
        write_results(out, "transfer", args, rows=rows, wall_seconds=time.perf_counter() - t0, **extra)

    train_ds, val_ds, classes = load_image_folder(args.data, val_fraction=0.1, seed=0)
    by_class = {part: {c: [p for p, y in ds.samples if classes[y] == c] for c in classes}
                for part, ds in (("train", train_ds), ("val", val_ds))}
    test = [(c, p) for c in TARGET for p in by_class["val"][c]]

    # 1. the source network
    source_tree = link_tree(work / "trees" / "source", {
        part: [(c, p) for c in SOURCE for p in by_class[part][c]] for part in ("train", "val")})
    weights = source_net(rows, earlier, previous, source_tree, work, save)
    print(f"source net: {rows['source']['acc']:.2f}% on the 5 source classes' validation images", flush=True)
    if wanted <= {"source"}:
        return 0
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
        if name not in wanted:
            continue
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
        # the tuned budget exactly: none of the recipe's fitting to the data (floors off; val/ is the test folder)
        budget = [f"optim.batch_size={batch}", f"schedule.epochs={epochs}", f"train.eval_every={epochs}",
                  "optim.min_batches=0", "schedule.min_steps=0"]
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
            key = f"{DEFAULTS} | k={k} | s{seed}"
            if DEFAULTS in wanted and key not in rows:
                flat = link_tree(work / "trees" / f"k{k}-s{seed}-only", {".": chosen})  # the user's folder: k/class
                rows[key] = {**run_defaults(weights, flat, tree, work / "runs" / f"k{k}-s{seed}-defaults"),
                             "k": k, "seed": seed}
                print(f"{key}: {rows[key]['acc']:.2f}% ({rows[key]['seconds']:.0f} s) {rows[key]['resolved']}",
                      flush=True)
                save()
            for method, (rec, extra) in runs.items():
                key = f"{method} | k={k} | s{seed}"
                if key in rows or method not in wanted:
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
    results = json.loads(out.read_text())
    print(report_tables(results, ks))
    plot(results, ks, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
