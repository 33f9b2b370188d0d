"""Compression on CIFAR-10: what pruning, distillation and INT8 cost in accuracy and buy in speed and size.

One base network (VGG-16-BN at --width, `benchmarks/recipes/compression_base.yaml`, --base-epochs) and everything
made from it:

  base + fine-tune   the base trained --finetune-epochs more, unpruned (the anchor every pruned row is held to:
                     the same recipe and the same budget)
  pruned             `vggnet compress prune --macs-reduction R` for each R in --macs-reductions, fine-tuned
                     --finetune-epochs with the base run's recipe at 0.1 x its lr
  student / KD       --student (e.g. VGG-11-BN at width 0.25) trained alone, and distilled from the base
                     (T = 4, alpha = 0.9), same recipe and epochs
  PTQ INT8           torchao PT2E static INT8 of the base (x86 Inductor), calibrated on --calib-n training images
  QAT INT8           torchao PT2E QAT fine-tuning of the base for --qat-epochs, converted to INT8
  pruned + INT8      PTQ of the strongest pruned network

Every accuracy is top-1 on the same 5,000 held-out training images (the recipe's fixed-seed split; CIFAR-10's
test set is not on this machine). Latency: batch 1 and 8 at 32 x 32, each arm timed in turn over --repeats
interleaved rounds, median; the ratio is to the base fp32 eager model measured in the same round. Stages
are resumable: a finished run folder is reused, so the script can be stopped and started again.

    .venv/bin/vggnet data prepare ../shared/data/cifar10-train-jpg.tar.gz --out data/cifar10
    .venv/bin/python benchmarks/compression.py                      # ~1-1.5 h on 2 cores
    .venv/bin/python benchmarks/compression.py --stages measure     # re-time and re-tabulate only
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from machine import write_results  # benchmarks/machine.py, beside this script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPE = str(HERE / "recipes" / "compression_base.yaml")  # VGG-16-BN w0.5, batch 256, one-cycle: trains VGG-16
STAGES = ("base", "anchor", "prune", "student", "distill", "qat", "measure", "paired")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def finished(run: Path, epochs: int) -> bool:
    final = run / "final.json"
    return final.is_file() and json.loads(final.read_text()).get("epoch") == epochs


def variant_tag(args: argparse.Namespace) -> str:
    """Pruning runs other than the committed table's (L1, per layer) get their own folders: -bn, -global."""
    criterion = "" if args.criterion == "l1" else f"-{args.criterion}"
    return criterion + ("" if args.scope == "layer" else f"-{args.scope}")


def seed_tag(seed: int) -> str:
    return "" if seed == 0 else f"-s{seed}"


def train_stages(args: argparse.Namespace) -> dict[str, float]:
    """Train whatever is not trained yet; returns the wall seconds of what ran now."""
    from vggnet.compress.distill import DistillSettings, distill
    from vggnet.compress.prune import PruneSettings, prune_run
    from vggnet.engine.recipe import load_recipe
    from vggnet.engine.trainer import train

    work = Path(args.work)
    walls: dict[str, float] = {}
    common = [f"data.path={args.data}", "train.eval_every=2"] if args.data else []
    base = work / "base"
    if "base" in args.stages and not finished(base, args.base_epochs):
        t0 = time.perf_counter()
        train(load_recipe(RECIPE, [*common, f"model.width={args.width}", f"schedule.epochs={args.base_epochs}"]),
              base, progress=False)
        walls["base"] = time.perf_counter() - t0
    lr = 0.1 * float(load_recipe(base / "recipe.yaml")["optim"]["lr"])
    tag = "" if args.finetune_epochs == 6 else f"-e{args.finetune_epochs}"  # the committed table's runs: 6 epochs
    anchor = work / f"base-finetuned{tag}"
    if "anchor" in args.stages and not finished(anchor, args.finetune_epochs):
        t0 = time.perf_counter()
        train(load_recipe(base / "recipe.yaml", [f"model.weights={base / 'best.safetensors'}",
                                                 f"schedule.epochs={args.finetune_epochs}", f"optim.lr={lr}"]),
              anchor, progress=False)
        walls["anchor"] = time.perf_counter() - t0
    if "prune" in args.stages:
        for reduction in args.macs_reductions:
            run = work / f"pruned-{round(100 * reduction)}{variant_tag(args)}{tag}"
            if finished(run, args.finetune_epochs):
                continue
            t0 = time.perf_counter()
            prune_run(PruneSettings(source=str(base), macs_reduction=reduction, criterion=args.criterion,
                                    scope=args.scope), run,
                      epochs=args.finetune_epochs, progress=False, log=log)
            walls[run.name] = time.perf_counter() - t0
    for seed in range(args.seeds):  # seed 0 is the committed table's pair; others only feed `paired`
        student = [*common, f"model.name={args.student}", f"model.width={args.student_width}",
                   f"schedule.epochs={args.student_epochs}", f"train.seed={seed}"]
        alone, kd = work / f"student{seed_tag(seed)}", work / f"student-kd{seed_tag(seed)}"
        if "student" in args.stages and not finished(alone, args.student_epochs):
            t0 = time.perf_counter()
            train(load_recipe(RECIPE, student), alone, progress=False)
            walls[alone.name] = time.perf_counter() - t0
        if "distill" in args.stages and not finished(kd, args.student_epochs):
            t0 = time.perf_counter()
            distill(load_recipe(RECIPE, student), DistillSettings(str(base), args.temperature, args.alpha),
                    kd, progress=False)
            walls[kd.name] = time.perf_counter() - t0
    if "qat" in args.stages and not (work / "qat" / "metrics.json").is_file():
        from vggnet.compress.qat import qat_finetune

        t0 = time.perf_counter()
        qat_finetune(base, work / "qat", epochs=args.qat_epochs, calib_images=args.calib_n)
        walls["qat"] = time.perf_counter() - t0
    return walls


def timed_rate(fn: Any, x: torch.Tensor, target_s: float) -> float:
    fn(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < target_s:
        fn(x)
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def validation_set(work: Path) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The base run's preprocessing and its held-out images as one tensor, with their labels: every arm is
    scored on exactly these."""
    from vggnet.evaluate import eval_images
    from vggnet.infer import Preprocessing, preprocess
    from vggnet.models import checkpoint_file, checkpoint_meta, load_checkpoint

    base_file = checkpoint_file(work / "base")
    base_model, extra = load_checkpoint(base_file)
    prep = Preprocessing.from_meta(checkpoint_meta(base_file, base_model, extra))
    images, labels, _ = eval_images(work / "base", None, "val", classes=prep.classes)
    kept = [(im, y) for im, y in zip(images, labels, strict=True) if im is not None]
    return prep, preprocess([im for im, _ in kept], prep), torch.tensor([lab for _, lab in kept])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy, size, parameters, MACs and latency of every arm on the same validation images."""
    from vggnet.evaluate import eval_images
    from vggnet.infer import Predictor, preprocess
    from vggnet.models import checkpoint_file, count_macs, count_params, load_checkpoint

    work = Path(args.work)
    prep, x, y = validation_set(work)
    base_file = checkpoint_file(work / "base")
    base_model, _ = load_checkpoint(base_file)
    train_images, train_labels, _ = eval_images(work / "base", None, "train", classes=prep.classes,
                                                limit=args.calib_n)
    calib = preprocess([im for im in train_images if im is not None], prep)
    log(f"{len(y)} validation images, {len(calib)} calibration images")

    arms: dict[str, dict[str, Any]] = {}

    def add(name: str, run: Path, runtime: str = "eager", note: str = "", file_bytes: int | None = -1) -> None:
        if not run.exists():
            log(f"  {name}: {run} missing, skipped")
            return
        file = checkpoint_file(run)
        model, _ = load_checkpoint(file)
        t0 = time.perf_counter()
        predictor = Predictor(model, prep, runtime, calib=calib if "int8" in runtime else None, max_batch=256)
        logits = predictor.logits(x)
        arms[name] = {"run": str(run), "runtime": runtime, "note": note, "model": model.config.to_dict(),
                      "top1": 100 * float((logits.argmax(1) == y).float().mean()),
                      "params": count_params(model), "macs": count_macs(model.config, prep.image_size),
                      "file_bytes": file.stat().st_size if file_bytes == -1 else file_bytes,
                      "build_and_eval_s": round(time.perf_counter() - t0, 1), "_fn": predictor.runtime}
        log(f"  {name}: top-1 {arms[name]['top1']:.2f} %")

    add("base (fp32)", work / "base")
    add("base + fine-tune, unpruned (anchor)", work / "base-finetuned")
    for reduction in args.macs_reductions:
        add(f"pruned −{round(100 * reduction)} % MACs", work / f"pruned-{round(100 * reduction)}")
    add(f"student {args.student} w{args.student_width} alone", work / "student")
    add(f"student {args.student} w{args.student_width} distilled", work / "student-kd")
    add("base PTQ INT8 (torchao PT2E, built at load)", work / "base", "int8", file_bytes=None)
    strongest = work / f"pruned-{round(100 * max(args.macs_reductions))}"
    add(f"pruned −{round(100 * max(args.macs_reductions))} % + PTQ INT8", strongest, "int8", file_bytes=None)
    qat_metrics = work / "qat" / "metrics.json"
    if qat_metrics.is_file():
        from vggnet.compress.qat import load_qat

        saved = json.loads(qat_metrics.read_text())
        qat = load_qat(work / "qat", compile=True)
        logits = torch.cat([qat.runtime(chunk) for chunk in x.split(256)])
        arms["base QAT INT8 (torchao PT2E, qat.pt2)"] = {
            "run": str(work / "qat"), "runtime": "qat-int8 (compiled)", "note": "top-1 re-measured here",
            "top1": 100 * float((logits.argmax(1) == y).float().mean()), "params": saved.get("params"),
            "macs": saved.get("macs"), "file_bytes": saved.get("file_bytes"), "qat_metrics": saved,
            "_fn": qat.runtime}
        log(f"  QAT: top-1 {arms['base QAT INT8 (torchao PT2E, qat.pt2)']['top1']:.2f} %")
    from vggnet.export import export_model, load_exported

    for fmt, name in (("onnx", "base ONNX fp32 file (ONNX Runtime)"), ("onnx-int8", "base ONNX INT8 file")):
        path = work / f"base{'.int8' if fmt == 'onnx-int8' else ''}.onnx"
        report = export_model(base_file, fmt, path, **({"calib_images": args.calib_n} if fmt == "onnx-int8" else {}))
        loaded = load_exported(path)
        logits = torch.cat([loaded.runtime(chunk) for chunk in x.split(256)])
        arms[name] = {"run": str(path), "runtime": loaded.format, "top1": 100 * float((logits.argmax(1) == y)
                                                                                     .float().mean()),
                      "params": count_params(base_model), "macs": count_macs(base_model.config, prep.image_size),
                      "file_bytes": path.stat().st_size, "export": report.to_dict(), "_fn": loaded.runtime}
        log(f"  {name}: top-1 {arms[name]['top1']:.2f} %, {path.stat().st_size / 1e6:.2f} MB")

    timed = {k: v for k, v in arms.items() if "_fn" in v}
    anchor_name = "base (fp32)"
    rates: dict[str, dict[int, list[float]]] = {k: {b: [] for b in args.batches} for k in timed}
    for r in range(args.repeats):
        for b in args.batches:
            xb = x[:b].contiguous()
            for name, arm in timed.items():
                rates[name][b].append(timed_rate(arm["_fn"], xb, args.target_s))
        log(f"  latency round {r + 1}/{args.repeats} done")
    for name, arm in timed.items():
        arm.pop("_fn")
        for b in args.batches:
            ratios = [a / c for a, c in zip(rates[name][b], rates[anchor_name][b], strict=True)]
            arm[f"b{b}"] = {"img_per_s": statistics.median(rates[name][b]), "runs": rates[name][b],
                            "x_base": statistics.median(ratios), "ms_per_batch": 1000 * b
                            / statistics.median(rates[name][b])}
    return {"validation_images": len(y), "calibration_images": len(calib), "anchor": anchor_name, "arms": arms}


def run_facts(run: Path) -> dict[str, Any]:
    """What a run folder says about itself: epochs, summed epoch times, seed, and for a pruned run its cut."""
    from vggnet.engine.recipe import load_recipe

    facts: dict[str, Any] = {"epochs": json.loads((run / "final.json").read_text()).get("epoch")}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        facts["train_seconds"] = round(sum(r.get("epoch_time", 0.0) for r in records), 1)
    if (run / "recipe.yaml").is_file():
        facts["seed"] = load_recipe(run / "recipe.yaml")["train"]["seed"]
    cut = run / "prune.json"
    if cut.is_file():
        record = json.loads(cut.read_text())
        facts["cut"] = {**{k: record["settings"][k] for k in ("criterion", "scope", "macs_reduction")},
                        "ratio": record["ratio"], "macs_kept": record["macs_kept"]}
    return facts


def paired(args: argparse.Namespace) -> dict[str, Any]:
    """Top-1 of each finished run on the same validation images, and paired comparisons (McNemar, mid-p).

    The targets compare two nets on the same 5,000 images, so the test is paired: only the images exactly one
    of them gets right count (``b``: only the first, ``c``: only the second). Accuracy only, no timing. The
    run folders are found, not named by this invocation's arguments: each run's own facts (epochs, seed, cut)
    are recorded beside its accuracy. Each run is scored with its best checkpoint, chosen on these same images
    during training, as in the main table (a slight optimism shared by every arm).
    """
    from vggnet.infer import Predictor
    from vggnet.models import checkpoint_file, load_checkpoint
    from vggnet.reproduce.paired import mcnemar_midp, no_gain_bound

    work = Path(args.work)
    prep, x, y = validation_set(work)
    n = len(y)
    correct: dict[str, torch.Tensor] = {}
    runs: dict[str, Any] = {}

    def top1(file: Path) -> torch.Tensor:
        model, _ = load_checkpoint(file)
        return Predictor(model, prep, "eager", max_batch=256).logits(x).argmax(1) == y

    for run in sorted(p for p in work.iterdir() if (p / "final.json").is_file()):
        correct[run.name] = top1(checkpoint_file(run))
        runs[run.name] = {"top1": 100 * float(correct[run.name].float().mean()), **run_facts(run)}
        if (run / "pruned.safetensors").is_file():  # right after the cut, before any fine-tuning
            runs[run.name]["top1_at_cut"] = 100 * float(top1(run / "pruned.safetensors").float().mean())
        log(f"  {run.name}: top-1 {runs[run.name]['top1']:.2f} %")

    def compare(first: str, second: str, margin: float | None = None) -> dict[str, Any] | None:
        """``first`` - ``second`` in top-1 points with its two-sided 95 % interval (Agresti-Min); with a
        ``margin``, whether a loss of at most ``margin`` points is shown (one-sided 95 % lower bound above
        ``-margin``), ruled out (upper bound below it) or neither."""
        if first not in correct or second not in correct:
            return None
        a, b_ = correct[first], correct[second]
        b, c = int((a & ~b_).sum()), int((~a & b_).sum())
        pair = {"first": first, "second": second, "diff_points": 100 * (b - c) / n, "b": b, "c": c,
                "p_mid": mcnemar_midp(b, c), "ci95": [no_gain_bound(b, c, n, 0.975), -no_gain_bound(c, b, n, 0.975)]}
        if margin is not None:
            low, high = no_gain_bound(b, c, n, 0.95), -no_gain_bound(c, b, n, 0.95)
            pair["target"] = {"max_loss_points": margin, "one_sided_95": [low, high],
                              "verdict": "met" if low >= -margin else "not met" if high < -margin else "not shown"}
        return pair

    pairs = []
    for name in sorted(n for n in correct if n.startswith("pruned-")):  # each against the anchor of its budget
        budget = re.search(r"-e\d+$", name)
        pairs.append(compare(name, "base-finetuned" + (budget.group(0) if budget else ""), margin=0.5))
    kd_gains = []
    for name in sorted(n for n in correct if n.startswith("student-kd")):  # every seed trained, whatever --seeds
        pair = compare(name, name.replace("student-kd", "student"))
        pairs.append(pair)
        if pair:
            kd_gains.append(pair["diff_points"])
    kd: dict[str, Any] = {"gains_points": kd_gains}
    if len(kd_gains) > 1:
        from scipy import stats

        mean, sd = statistics.mean(kd_gains), statistics.stdev(kd_gains)
        se = sd / len(kd_gains) ** 0.5
        half = float(stats.t.ppf(0.975, len(kd_gains) - 1)) * se
        # training seeds as the unit, on these fixed 5,000 images: the interval covers seed-to-seed variation
        # only, not the sampling of the images (each seed's own paired interval shows that part)
        p_seeds = float(2 * stats.t.sf(abs(mean) / se, len(kd_gains) - 1)) if se else (1.0 if mean == 0 else 0.0)
        kd.update(mean=mean, sd=sd, se=se, seed_ci95=[mean - half, mean + half], p_seeds=p_seeds)
        log(f"  KD over {len(kd_gains)} seeds: {mean:+.2f} points (SD {sd:.2f}, seed-to-seed 95 % interval "
            f"{mean - half:+.2f} to {mean + half:+.2f})")
    for pair in filter(None, pairs):
        target = f", target: {pair['target']['verdict']}" if "target" in pair else ""
        log(f"  {pair['first']} vs {pair['second']}: {pair['diff_points']:+.2f} points (95 % {pair['ci95'][0]:+.2f} "
            f"to {pair['ci95'][1]:+.2f}; b {pair['b']}, c {pair['c']}, mid-p {pair['p_mid']:.3g}){target}")
    return {"validation_images": n, "runs": runs, "pairs": [p for p in pairs if p], "kd_over_seeds": kd}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    for name, arm in result["arms"].items():
        if not arm.get("top1") or not arm.get("macs"):
            continue
        marker = "s" if "INT8" in name else "o"
        ax.scatter(arm["macs"] / 1e6, arm["top1"], marker=marker, s=40, alpha=0.8, label=f"{name}: {arm['top1']:.2f} %")
    ax.set_xscale("log")
    ax.set_xticks([5, 10, 20, 40, 80], labels=["5", "10", "20", "40", "80"])
    ax.minorticks_off()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_xlabel("MACs per 32×32 image (millions, log scale)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("CIFAR-10: accuracy against compute (squares: INT8)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict[str, Any], batches: list[int]) -> str:
    speeds = " | ".join(f"b{b} × base" for b in batches)
    head = f"| model | top-1 % | params (M) | MACs (M) | {speeds} | file (MB) |"
    lines = [head, "|" + "---|" * (5 + len(batches))]
    for name, arm in result["arms"].items():
        speed = " | ".join(f"{arm[f'b{b}']['x_base']:.2f}" if f"b{b}" in arm else "–" for b in batches)
        size = f"{arm['file_bytes'] / 1e6:.2f}" if arm.get("file_bytes") else "–"
        lines.append(f"| {name} | {arm.get('top1', float('nan')):.2f} | {arm.get('params', 0) / 1e6:.2f} | "
                     f"{arm.get('macs', 0) / 1e6:.1f} | {speed} | {size} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/cifar10", help="CIFAR-10 JPEG tree from `vggnet data prepare`")
    ap.add_argument("--work", default="runs/compression", help="run folders")
    ap.add_argument("--width", type=float, default=0.5, help="the base VGG-16-BN's width")
    ap.add_argument("--base-epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=6)
    ap.add_argument("--macs-reductions", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--criterion", default="l1", choices=("l1", "bn"))
    ap.add_argument("--scope", default="layer", choices=("layer", "global"),
                    help="rank filters per layer (the committed table) or across layers (folder suffix -global)")
    ap.add_argument("--student", default="vgg11_bn")
    ap.add_argument("--student-width", type=float, default=0.25)
    ap.add_argument("--student-epochs", type=int, default=12)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--seeds", type=int, default=1,
                    help="train the student alone and distilled with seeds 0..N-1 (folders student-sK, "
                         "student-kd-sK); the `paired` stage compares each pair")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--calib-n", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-s", type=float, default=1.0, help="seconds per latency measurement")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--replot", action="store_true", help="redraw --plot from --out, measure nothing")
    ap.add_argument("--smoke", action="store_true",
                    help="every stage on the embedded digits at width 0.125, one epoch each, short timings; "
                         "writes under /tmp and no results file: only shows that every path runs")
    ap.add_argument("--out", default=str(HERE / "results" / "compression.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "compression.png"))
    args = ap.parse_args()
    global RECIPE
    if args.smoke:
        RECIPE = "demo"
        args.work, args.data, args.width, args.student_width = "/tmp/compression-smoke", "", 0.125, 0.0625
        args.base_epochs = args.finetune_epochs = args.student_epochs = args.qat_epochs = 1
        args.calib_n, args.repeats, args.target_s = 64, 1, 0.05
        args.out, args.plot = "/tmp/compression-smoke/compression.json", "/tmp/compression-smoke/compression.png"
    walls = {} if args.replot else train_stages(args)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    walls = {**old.get("train_wall_s", {}), **{k: round(v, 1) for k, v in walls.items()}}
    if args.replot:  # the figure again from the results file, nothing re-measured
        plot(json.loads(out.read_text()), Path(args.plot))
        return 0
    if "paired" in args.stages:
        pairs_out = out.with_name(out.stem + "_paired.json")
        result = paired(args)
        write_results(pairs_out, "compression, paired accuracy", args, **result)
    if "measure" not in args.stages:
        return 0
    result = measure(args)
    print(table(result, args.batches))
    plot(result, Path(args.plot))
    write_results(out, "compression", args, train_wall_s=walls, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
