"""Validation during training: loss, top-1/top-5 and the confusion matrix, summed on the device; and the
progress bar of the training loops."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vggnet.progress import LOG_INTERVAL_S, progress_bar

from . import distributed


def loop_bar(total: int | None, desc: str, show: bool) -> tqdm:
    """A training or validation loop's progress: on a terminal a bar that disappears at the end (the epoch line
    follows); off one (a log, ``2>&1 | cat``) a line every ``LOG_INTERVAL_S`` seconds with the time left, the
    first only once the loop has run that long, so short epochs print nothing but their epoch line."""
    if not show:
        return progress_bar(total=total, progress=False)
    if sys.stderr.isatty():
        return progress_bar(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    return progress_bar(total=total, desc=desc, unit="batch", delay=LOG_INTERVAL_S)


def to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def _hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """How many targets are among the ``k`` best scores, as a device tensor (no host sync)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == targets.view(-1, 1)).any(dim=1).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], num_classes: int, env: distributed.Dist,
             amp: torch.dtype | None, channels_last: bool, flip: bool = False,
             set_mode: Callable[[nn.Module, bool], None] | None = None, progress: bool = False,
             desc: str = "validation") -> dict[str, Any]:
    """Loss, top-1/top-5 accuracy and confusion matrix over the (possibly sharded) validation set.

    With ``flip`` also the accuracy of softmax averaged over the image and its mirror (the paper's
    test-time flip), reported separately as ``val_top1_flip`` so the plain figure stays comparable.
    Counts stay on the device until the end: one host sync per evaluation, not one per batch. ``progress``:
    :func:`loop_bar` (a validation set can take minutes).
    """
    if set_mode is not None:
        set_mode(model, False)
    else:
        model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)  # loss, top1, top5, count, top1 with flip
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=env.device)
    autocast = {"device_type": env.device.type, "dtype": amp or torch.float32, "enabled": amp is not None}
    bar = loop_bar(len(loader) if hasattr(loader, "__len__") else None, desc, progress)
    for batch in loader:
        bar.update()  # before the batch's work: a skipped batch counts too
        if batch is None:
            continue
        images, targets = to_device(*batch, env.device, channels_last)
        with torch.autocast(**autocast):
            logits = model(images).float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += _hits(logits, targets, 1)
        sums[2] += _hits(logits, targets, 5)
        sums[3] += targets.numel()
        if flip:
            with torch.autocast(**autocast):
                mirror = model(images.flip(3)).float()
            sums[4] += _hits(logits.softmax(1) + mirror.softmax(1), targets, 1)
        confusion.index_put_((targets.long(), logits.argmax(1)), torch.ones_like(targets, dtype=torch.int64),
                             accumulate=True)  # rows: the true class (bincount would sync to size its output)
    bar.close()
    sums = distributed.all_sum(sums, env)
    confusion = distributed.all_sum(confusion, env)
    n = max(1.0, sums[3].item())
    out = {"val_loss": sums[0].item() / n, "val_top1": 100 * sums[1].item() / n,
           "val_top5": 100 * sums[2].item() / n, "confusion": confusion}
    if flip:
        out["val_top1_flip"] = 100 * sums[4].item() / n
    return out
