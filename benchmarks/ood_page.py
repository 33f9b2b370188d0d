"""How often does the web page's out-of-domain warning fire? Max softmax probability (MSP) against the validation
split's 5th percentile (vggnet.serve.ood), on the validation split and on two kinds of foreign images.

In-domain: the run's own validation split (the threshold is its 5th percentile, so the in-sample false-alarm rate is
5 % by construction; the 2-fold figure sets the threshold on one half and counts alarms on the other, the honest
estimate). Foreign: uniform RGB noise, and CIFAR-10 photos (``../shared/data/cifar10-train-jpg.tar.gz``) for the
digits demo model. Every image goes through the server's preprocessing (PIL image -> resize, centre crop, normalise),
as an upload does. ``--write-reference`` also writes ``ood.json`` beside the checkpoint for ``vggnet serve``.

    .venv/bin/vggnet train --recipe demo --out runs/demo
    .venv/bin/python benchmarks/ood_page.py --ckpt runs/demo/best.safetensors
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from machine import write_results  # benchmarks/machine.py, beside this script
from vggnet.evaluate.sources import eval_images
from vggnet.infer import Preprocessing, preprocess
from vggnet.models import checkpoint_meta, load_checkpoint
from vggnet.serve import ood


def scores(model: torch.nn.Module, prep: Preprocessing, images: list[Image.Image]) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            out.append(ood.max_softmax(model(preprocess(images[start:start + 64], prep))))
    return torch.cat(out).numpy()


def cifar_photos(archive: Path, n: int) -> list[Image.Image]:
    """``n`` photos spread over the archive's classes (every k-th JPEG in archive order)."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        step = max(1, len(members) // n)
        return [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB") for m in members[::step][:n]]


def noise(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an in-domain image scores higher than a foreign one), ties half: the threshold-free separation."""
    both = np.concatenate([inside, outside])
    ranks = both.argsort().argsort() + 1.0
    return float((ranks[:len(inside)].sum() - len(inside) * (len(inside) + 1) / 2) / (len(inside) * len(outside)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("runs/demo/best.safetensors"))
    p.add_argument("--cifar", type=Path, default=Path("../shared/data/cifar10-train-jpg.tar.gz"))
    p.add_argument("--n-foreign", type=int, default=1000)
    p.add_argument("--write-reference", action="store_true", help="write ood.json beside the checkpoint")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ood_page.json")
    args = p.parse_args()

    model, extra = load_checkpoint(args.ckpt)
    model.eval()
    prep = Preprocessing.from_meta(checkpoint_meta(args.ckpt, model, extra))
    images, _, _ = eval_images(args.ckpt, None, "val")
    val_images = [Image.fromarray(t.permute(1, 2, 0).numpy()) if isinstance(t, torch.Tensor) else t for t in images]
    val = scores(model, prep, val_images)
    t = ood.threshold(val)
    rng = np.random.default_rng(0)
    halves = np.array_split(rng.permutation(len(val)), 2)
    cross = float(np.mean([(val[b] < ood.threshold(val[a])).mean() for a, b in (halves, halves[::-1])]))
    foreign = {"uniform noise (32x32 RGB)": noise(args.n_foreign, 32),
               "uniform noise (224x224 RGB)": noise(args.n_foreign, 224, seed=1),
               "CIFAR-10 photos": cifar_photos(args.cifar, args.n_foreign)}
    detection = {}
    for name, pics in foreign.items():
        s = scores(model, prep, pics)
        detection[name] = {"images": len(s), "detection_rate": float((s < t).mean()),
                           "auroc_vs_val": auroc(val, s), "median_msp": float(np.median(s))}
        d = detection[name]
        print(f"{name:30s} detected {d['detection_rate']:.1%}  AUROC {d['auroc_vs_val']:.3f}")
    print(f"threshold {t:.4f}; false alarms on val {float((val < t).mean()):.1%} (2-fold {cross:.1%})")
    if args.write_reference:
        ref = {"signal": "max_softmax", "false_alarm": ood.FALSE_ALARM, "threshold": t, "images": len(val),
               "source": f"validation split of {args.ckpt.parent.name}"}
        print("wrote", ood.write_reference(args.ckpt, ref))
    write_results(args.out, "ood_page", args, signal="max softmax probability (MSP)",
                  checkpoint=str(args.ckpt), classes=len(prep.classes or ()), threshold=t,
                  validation={"images": len(val), "false_alarm_rate": float((val < t).mean()),
                              "false_alarm_rate_2fold": cross, "median_msp": float(np.median(val))},
                  foreign=detection)


if __name__ == "__main__":
    main()
