"""Calibration for the CIFAR-10 goal: what does a known-fast recipe reach on *this* data and CPU?

The training issue asks for >= 93 % validation top-1 in 45 min of this 2-core CPU. Our VGG runs stop
at 86-88 % (``benchmarks/cifar10.md``). Is the gap the recipe, the architecture, or the data (JPEG at
about quality 75)? This script trains, on exactly the same 45,000 / 5,000 split and in-memory
loader, a recipe in the style of Keller Jordan's *airbench94* (published as reaching 94 % on the
lossless CIFAR-10 test set in about 10 epochs). Facts taken from its description; the code is ours:

- net ``ref``: a frozen 2x2 patch-whitening conv (24 filters: the PCA basis of 2x2x3 patches and
  its negation) + GELU, then three blocks ``conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU``
  of widths 64 / 256 / 256, a final 3x3 max-pool and a linear layer scaled by 1/9. BN scale fixed to
  1 (only the shift learns), BN momentum 0.6, convs dirac-initialised on their first input-many filters;
- Nesterov SGD (momentum 0.85) on the *summed* loss with label smoothing 0.2, batch 1024, learning
  rate 11.5 / (1024 (1 + 1 / (1 - momentum))), weight decay 0.0153 x batch / same scale, BN shifts at
  64x the learning rate; warm-up from 0.2x over 23 % of the steps, then linear down to 0.07x;
- lookahead every 5 steps (the fast weights pulled to a slow EMA whose decay rises as
  0.95^5 x (t / T)^3), the slow weights taken at the end; flip + 2-px reflect translate augmentation.

``--net vgg13_bn --width 0.75`` (any zoo name) trains one of our VGGs under the same recipe instead
(BN scales fixed, BN momentum 0.6, logits / 9, no whitening or dirac init), which separates "recipe"
from "architecture"; the ``cifar10`` recipe now carries these settings into ``vggnet train``.
Test-time augmentation: plain, + flip, and + flip and 1-px translations (the airbench "level 2" views).

    .venv/bin/python benchmarks/cifar10_reference.py --data data/cifar10 [--net ref] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from machine import write_results  # benchmarks/machine.py, beside this script
from vggnet.engine.distributed import Dist
from vggnet.engine.inputs import build_inputs
from vggnet.engine.recipe import load_recipe
from vggnet.models import create_model


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)  # PyTorch momentum = 1 - airbench's 0.6
    bn.weight.requires_grad_(False)
    return bn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), _bn(cout), nn.GELU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), _bn(cout), nn.GELU())


class Reference(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256)) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        c = [24, *widths]
        self.blocks = nn.Sequential(*[_block(c[i], c[i + 1]) for i in range(3)])
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        for m in self.blocks.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.dirac_(m.weight.data[: m.in_channels])

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N C H' W' 2 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov)
        w = (eigvec.T / torch.sqrt(eigval + eps).view(-1, 1)).view(12, 3, 2, 2).float()
        self.whiten.weight.copy_(torch.cat([w, -w]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        return self.fc(F.max_pool2d(x, 3).flatten(1)) / 9


class Scaled(nn.Module):
    """A zoo net with its logits scaled like the reference's (the recipe's learning rates assume it)."""

    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def _tta_logits(net: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    out = net(x)
    if level >= 1:
        out = 0.5 * out + 0.5 * net(x.flip(3))
    if level >= 2:  # plus the flip pair shifted one pixel up-left and one down-right (reflect padding)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]
        extra = sum(0.5 * net(s) + 0.5 * net(s.flip(3)) for s in shifted) / 2
        out = 0.5 * out + 0.5 * extra
    return out


@torch.no_grad()
def evaluate(net: nn.Module, loader, levels=(0, 1, 2)) -> dict[str, float]:
    net.eval()
    correct, total = dict.fromkeys(levels, 0), 0
    for images, targets in loader:
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for level in levels:
                correct[level] += int((_tta_logits(net, images, level).argmax(1) == targets).sum())
        total += len(targets)
    return {f"val_top1_tta{level}": 100 * c / total for level, c in correct.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10"), help="the prepared CIFAR-10 tree")
    parser.add_argument("--net", default="ref", help="'ref' (the airbench-style net) or a zoo name, e.g. vgg13_bn")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier for a zoo net")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=11.5, help="airbench's lr unit (see the module docstring)")
    parser.add_argument("--weight-decay", type=float, default=0.0153)
    parser.add_argument("--alternate-flip", action="store_true",
                        help="airbench's flip: each image mirrored every other epoch (default: at random)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: results/cifar10_reference_<net>.json)")
    args = parser.parse_args()
    args.out = args.out or Path(__file__).parent / "results" / f"cifar10_reference_{args.net}.json"
    if not (args.data / "train").is_dir():
        parser.error(f"{args.data}/train not found: run `vggnet data prepare "
                     f"../shared/data/cifar10-train-jpg.tar.gz --out {args.data} --cache` first")
    torch.manual_seed(0)
    recipe = load_recipe("cifar10", [f"data.path={args.data}", "data.pad=2", "data.cutout=0",
                                     f"optim.batch_size={args.batch_size}", "train.channels_last=true",
                                     f"data.flip={'alternate' if args.alternate_flip else 'true'}"])
    inputs = build_inputs(recipe, Dist())
    train = inputs.train
    train.channels_last = True

    if args.net == "ref":
        net: nn.Module = Reference(len(inputs.classes))
        first = train.images[:5000].permute(0, 3, 1, 2).float() * train.scale - train.shift
        net.init_whitening(first)
        slow_decay_params = [p for n, p in net.named_parameters() if p.requires_grad and p.ndim <= 1]
    else:
        vgg = create_model(args.net, num_classes=len(inputs.classes), width=args.width, head="gap", dropout=0.0)
        for m in vgg.modules():  # as in the reference: BN scale fixed at 1, only the shift learns
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.momentum = 0.4
        net = Scaled(vgg, 1 / 9)
        slow_decay_params = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    net = net.to(memory_format=torch.channels_last)
    other = [p for p in net.parameters() if p.requires_grad and all(p is not q for q in slow_decay_params)]

    momentum = 0.85
    unit = 1024 * (1 + 1 / (1 - momentum))
    lr, wd = args.lr / unit, args.weight_decay * args.batch_size / unit
    lr_bias = lr * 64
    optimizer = torch.optim.SGD([{"params": slow_decay_params, "lr": lr_bias, "weight_decay": wd / lr_bias},
                                 {"params": other, "lr": lr, "weight_decay": wd / lr}],
                                momentum=momentum, nesterov=True)
    base = [g["lr"] for g in optimizer.param_groups]
    total = math.ceil(args.epochs * len(train))
    warm = int(0.23 * total)

    def factor(step: int) -> float:
        if step < warm:
            return 0.2 + 0.8 * step / warm
        return 1.0 - 0.93 * (step - warm) / max(1, total - warm)

    slow = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}

    def lookahead(decay: float) -> None:
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if k in slow:
                    slow[k].lerp_(v, 1 - decay)
                    v.copy_(slow[k])

    whiten_bias = getattr(getattr(net, "whiten", None), "bias", None)
    step, start, epoch, log = 0, time.perf_counter(), 0, []
    while step < total:
        epoch += 1
        train.set_epoch(epoch)
        if whiten_bias is not None and epoch > 3:  # airbench trains the whitening bias for 3 epochs only
            whiten_bias.requires_grad_(False)
        net.train()
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        for images, targets in train:
            if step >= total:
                break
            for g, b in zip(optimizer.param_groups, base, strict=True):
                g["lr"] = b * factor(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(images)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=0.2, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 5 == 0:
                lookahead(0.95 ** 5 * (step / total) ** 3)
            loss_sum, seen = loss_sum + loss.item(), seen + len(targets)
        row = {"epoch": epoch, "train_loss": loss_sum / max(1, seen), "epoch_time": time.perf_counter() - t0}
        if epoch % 2 == 0 or step >= total:
            row.update(evaluate(net, inputs.val, levels=(0,)))
        log.append(row)
        print(json.dumps(row), flush=True)
    lookahead(1.0)  # keep the slow weights
    train_seconds = time.perf_counter() - start
    final = evaluate(net, inputs.val)
    wall = time.perf_counter() - start
    print("\n| net | epochs | val top-1 | + flip | + flip & translate | train time | wall incl. eval |")
    print("|---|---|---|---|---|---|---|")
    name = args.net if args.net == "ref" else f"{args.net} w{args.width}"
    print(f"| {name} | {args.epochs:g} | {final['val_top1_tta0']:.2f} % | {final['val_top1_tta1']:.2f} % | "
          f"{final['val_top1_tta2']:.2f} % | {train_seconds / 60:.1f} min | {wall / 60:.1f} min |")
    write_results(args.out, "CIFAR-10 45k/5k split: airbench-style recipe on this data and CPU (calibration)", args,
                  final=final, train_seconds=train_seconds, wall_seconds=wall, epochs_log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
