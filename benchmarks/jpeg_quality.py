"""How much CIFAR-10 accuracy does JPEG compression cost? The same short training at several qualities.

The shared CIFAR-10 tree is JPEG at about quality 75 (4:2:0 chroma, ~920 bytes per 32×32 image), while
published CIFAR-10 figures are on the lossless originals. We cannot undo the compression, but we can
measure the slope: re-encode the tree at lower qualities (train and validation alike, so each arm
trains and tests on one distribution, as the given tree does) and train the same net with the same
recipe on each. The anchor is the tree as given, trained in the same run. Each arm uses the same
45,000 / 5,000 split (same file names, same seed).

    .venv/bin/python benchmarks/jpeg_quality.py --data data/cifar10 [--qualities 50 30] [--epochs 8]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from machine import write_results  # benchmarks/machine.py, beside this script
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train

SUFFIXES = (".jpg", ".jpeg", ".png")


def reencode(src: Path, dst: Path, quality: int) -> dict[str, float]:
    """Copy the class tree ``src`` to ``dst`` with every image re-encoded as JPEG at ``quality``.

    Returns mean bytes per image and mean PSNR (dB, RGB, against the decoded source). Skipped when
    ``dst`` already holds a finished copy (a ``.done`` file with these figures).
    """
    done = dst / ".done.json"
    if done.exists():
        return json.loads(done.read_text())
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in SUFFIXES and not any(
        part.startswith(".") for part in p.relative_to(src).parts))
    sizes, psnrs = [], []
    for path in tqdm(files, desc=f"re-encode q{quality}", unit="img", mininterval=2, disable=not sys.stderr.isatty()):
        original = Image.open(path).convert("RGB")
        buf = io.BytesIO()
        original.save(buf, format="JPEG", quality=quality)
        out = dst / path.relative_to(src).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(buf.getvalue())
        a = np.asarray(original, dtype=np.float64)
        b = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float64)
        mse = float(((a - b) ** 2).mean())
        sizes.append(len(buf.getvalue()))
        psnrs.append(10 * np.log10(255.0 ** 2 / mse) if mse > 0 else 99.0)
    stats = {"images": len(files), "bytes_per_image": float(np.mean(sizes)), "psnr_db": float(np.mean(psnrs))}
    done.write_text(json.dumps(stats))
    return stats


def source_stats(src: Path) -> dict[str, float | None]:
    files = [p for p in src.rglob("*.jpg") if ".vggnet-cache" not in p.parts]
    return {"images": len(files), "bytes_per_image": float(np.mean([p.stat().st_size for p in files])),
            "psnr_db": None}  # the reference itself


def train_arm(data: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    recipe = load_recipe(args.recipe, [f"data.path={data}", f"model.name={args.model}", f"model.width={args.width}",
                                       f"schedule.epochs={args.epochs}", f"optim.batch_size={args.batch_size}"])
    start = time.perf_counter()
    final = train(recipe, out, resume=True, progress=False)
    return {"val_top1": final["val_top1"], "val_top1_flip": final.get("val_top1_flip", float("nan")),
            "train_top1": final["train_top1"], "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10"), help="the prepared CIFAR-10 tree")
    parser.add_argument("--qualities", type=int, nargs="+", default=[50, 30], help="JPEG qualities to re-encode at")
    parser.add_argument("--work", type=Path, default=Path("runs/jpeg_quality"), help="re-encoded trees and runs")
    parser.add_argument("--recipe", default="cifar10")
    parser.add_argument("--model", default="vgg11_bn")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "jpeg_quality.json")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        parser.error(f"{args.data}/train not found: run `vggnet data prepare "
                     f"../shared/data/cifar10-train-jpg.tar.gz --out {args.data}` first")

    arms = [("given (≈ q75)", args.data, source_stats(args.data / "train"))]
    for q in args.qualities:
        tree = args.work / f"q{q}"
        arms.append((f"q{q} (re-encoded)", tree, reencode(args.data / "train", tree / "train", q)))
    rows = []
    for name, tree, stats in arms:
        print(f"training on {name}: {args.model} w{args.width}, {args.epochs} epochs", flush=True)
        rows.append({"arm": name, "data": str(tree), **stats,
                     **train_arm(tree, args.work / "runs" / name.split()[0], args)})
    anchor = rows[0]
    print("\n| data | bytes/image | PSNR vs given (dB) | val top-1 | Δ vs given | flip TTA | train top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["delta_top1"] = r["val_top1"] - anchor["val_top1"]
        psnr = "–" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        print(f"| {r['arm']} | {r['bytes_per_image']:.0f} | {psnr} | {r['val_top1']:.2f} % | "
              f"{r['delta_top1']:+.2f} | {r['val_top1_flip']:.2f} % | {r['train_top1']:.1f} % |")
    write_results(args.out, "CIFAR-10 val top-1 vs JPEG quality of the (train and val) images, same recipe", args,
                  rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
