"""Training throughput: vggnet's engine vs a plain PyTorch loop over torchvision's vgg16_bn.

Both train VGG-16-BN (10 classes, the paper's fc head) at batch 128 on the same 32×32 images (the
embedded digits, upscaled), for the same number of epochs; each side's last epoch is timed, so
one-off start-up costs (oneDNN kernel selection, allocations) are left out of both. The anchor is
the seeds' style: fp32, NCHW, ``torch.optim.SGD`` defaults, a ``DataLoader`` over a
``TensorDataset``. vggnet runs its own ``train()`` with the recipe's defaults on this CPU (bf16
autocast, channels_last, fused SGD, batched in-memory augmentation). Arms alternate and repeat;
the table reports medians and the ratio measured within the same run.

    .venv/bin/python benchmarks/train_throughput.py [--repeats 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from machine import cpu_name  # benchmarks/machine.py, beside this script
from vggnet.data import digits_tensors
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train

BATCH, SIZE = 128, 32
MEAN, STD = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)


def plain_loop(epochs: int) -> float:
    """The anchor: images/s of the last epoch."""
    x, y = digits_tensors("train", size=SIZE, channels=3, val_fraction=0.2, seed=0)
    x = (x.float() / 255 - MEAN) / STD
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True)
    model = torchvision.models.vgg16_bn(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    rate = 0.0
    for _ in range(epochs):
        seen, t0 = 0, time.perf_counter()
        for images, targets in loader:
            opt.zero_grad()
            loss = criterion(model(images), targets)
            loss.backward()
            opt.step()
            seen += targets.numel()
        rate = seen / (time.perf_counter() - t0)
    return rate


def vggnet_engine(epochs: int) -> float:
    recipe = load_recipe("demo", [
        "model.name=vgg16_bn", "model.width=1.0", "model.head=fc", "model.dropout=0.5", f"optim.batch_size={BATCH}",
        "optim.name=sgd", "optim.lr=0.01", "optim.label_smoothing=0", "schedule.name=constant",
        f"schedule.epochs={epochs}", "train.eval_every=1000"])
    with tempfile.TemporaryDirectory() as out:
        train(recipe, out, progress=False)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["img_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    rates: dict[str, list[float]] = {"torchvision plain loop (fp32, NCHW)": [], "vggnet engine": []}
    for r in range(args.repeats):
        for name, fn in (("torchvision plain loop (fp32, NCHW)", plain_loop), ("vggnet engine", vggnet_engine)):
            rate = fn(args.epochs)
            rates[name].append(rate)
            print(f"repeat {r + 1}: {name}: {rate:.1f} img/s", flush=True)
    anchor = statistics.median(rates["torchvision plain loop (fp32, NCHW)"])
    rows = [{"arm": k, "img_per_s": statistics.median(v), "runs": v, "ratio": statistics.median(v) / anchor}
            for k, v in rates.items()]
    print(f"\n{'arm':<40}{'img/s':>10}{'× anchor':>10}")
    for row in rows:
        print(f"{row['arm']:<40}{row['img_per_s']:>10.1f}{row['ratio']:>10.2f}")
    result = {
        "benchmark": "training throughput, VGG-16-BN, 10 classes, batch 128, 32x32",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "cpu": cpu_name(), "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
