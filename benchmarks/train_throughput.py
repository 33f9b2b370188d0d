"""Training throughput: vggnet's engine vs a plain PyTorch loop over torchvision's vgg16_bn.

All arms train VGG-16-BN (10 classes, the paper's fc head) at batch 128 on the same 32×32 images (the
embedded digits, upscaled), for the same number of epochs; each arm's last epoch is timed, so
one-off start-up costs (oneDNN kernel selection, allocations) are left out. The anchor is
the seeds' style: fp32, NCHW, ``torch.optim.SGD`` defaults, a ``DataLoader`` over a
``TensorDataset``. The second arm is the same plain loop with bf16 autocast and channels_last, the
precision and layout the engine picks on a CPU with native bf16: it separates what precision buys
from what the engine itself adds. vggnet runs its own ``train()`` with the recipe's defaults on this
CPU (bf16 autocast where native, channels_last, fused SGD, batched in-memory augmentation). Arms
alternate and repeat; the table reports medians and ratios to both plain loops measured within the
same run.

    .venv/bin/python benchmarks/train_throughput.py [--repeats 2] [--epochs 2]
    .venv/bin/python benchmarks/train_throughput.py --smoke   # VGG-11-BN, small fc, 1 epoch on ~180 images, /tmp
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
ANCHOR = "torchvision plain loop (fp32, NCHW)"
PLAIN_BF16 = "plain loop + bf16 autocast + channels_last"
ENGINE = "vggnet engine"
# the full run: VGG-16-BN on the demo split (80 % of the digits for training); --smoke: VGG-11-BN with
# 64-wide fc layers on 10 %, only to see every arm run
FULL = {"arch": "vgg16_bn", "val_fraction": 0.2, "fc_width": 4096}
SMOKE = {"arch": "vgg11_bn", "val_fraction": 0.9, "fc_width": 64}


def plain_loop(epochs: int, arch: str, val_fraction: float, fc_width: int, fast: bool = False) -> float:
    """The anchor (``fast``: with bf16 autocast and channels_last, nothing else changed): images/s of the
    last epoch."""
    x, y = digits_tensors("train", size=SIZE, channels=3, val_fraction=val_fraction, seed=0)
    x = (x.float() / 255 - MEAN) / STD
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True)
    model = getattr(torchvision.models, arch)(num_classes=10)
    if fc_width != 4096:  # torchvision's classifier: fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8
        for i, (fan_in, fan_out) in {0: (512 * 7 * 7, fc_width), 3: (fc_width, fc_width), 6: (fc_width, 10)}.items():
            model.classifier[i] = torch.nn.Linear(fan_in, fan_out)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    rate = 0.0
    for _ in range(epochs):
        seen, t0 = 0, time.perf_counter()
        for images, targets in loader:
            if fast:
                images = images.contiguous(memory_format=torch.channels_last)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
                loss = criterion(model(images), targets)
            loss.backward()
            opt.step()
            seen += targets.numel()
        rate = seen / (time.perf_counter() - t0)
    return rate


def vggnet_engine(epochs: int, arch: str, val_fraction: float, fc_width: int) -> float:
    recipe = load_recipe("demo", [
        f"model.name={arch}", "model.width=1.0", "model.head=fc", f"model.fc_width={fc_width}", "model.dropout=0.5",
        f"optim.batch_size={BATCH}",
        "optim.name=sgd", "optim.lr=0.01", "optim.label_smoothing=0", "schedule.name=constant",
        f"schedule.epochs={epochs}", "train.eval_every=1000", f"data.val_fraction={val_fraction}"])
    with tempfile.TemporaryDirectory() as out:
        train(recipe, out, progress=False)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["img_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    ap.add_argument("--smoke", action="store_true",
                    help="check that every arm runs: VGG-11-BN with 64-wide fc layers, 1 epoch, 1 repeat, ~180 "
                         "training images, "
                         "results to /tmp/train_throughput_smoke.json unless --out is given")
    args = ap.parse_args()
    setting = FULL
    if args.smoke:
        setting, args.epochs, args.repeats = SMOKE, 1, 1
        if args.out == ap.get_default("out"):
            args.out = str(Path(tempfile.gettempdir()) / "train_throughput_smoke.json")
    arms = ((ANCHOR, lambda e: plain_loop(e, **setting)), (PLAIN_BF16, lambda e: plain_loop(e, **setting, fast=True)),
            (ENGINE, lambda e: vggnet_engine(e, **setting)))
    rates: dict[str, list[float]] = {name: [] for name, _ in arms}
    for r in range(args.repeats):
        for name, fn in arms:
            rate = fn(args.epochs)
            rates[name].append(rate)
            print(f"repeat {r + 1}: {name}: {rate:.1f} img/s", flush=True)
    anchor, plain_bf16 = statistics.median(rates[ANCHOR]), statistics.median(rates[PLAIN_BF16])
    rows = [{"arm": k, "img_per_s": statistics.median(v), "runs": v, "ratio": statistics.median(v) / anchor,
             "ratio_to_plain_bf16": statistics.median(v) / plain_bf16} for k, v in rates.items()]
    print(f"\n{'arm':<46}{'img/s':>10}{'× fp32 loop':>13}{'× bf16 loop':>13}")
    for row in rows:
        print(f"{row['arm']:<46}{row['img_per_s']:>10.1f}{row['ratio']:>13.2f}{row['ratio_to_plain_bf16']:>13.2f}")
    name = setting["arch"].replace("vgg", "VGG-").replace("_bn", "-BN")
    result = {
        "benchmark": f"training throughput, {name}, 10 classes, batch 128, 32x32"
                     + (" (smoke run: not a measurement)" if args.smoke else ""),
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
