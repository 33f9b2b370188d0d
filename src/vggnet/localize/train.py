"""Fine-tune a box regressor (Appendix A) on VOC-style box data: a training loop that fits on a screen.

The target of each image is its largest non-difficult object; the loss is the paper's Euclidean loss on the
normalised (cx, cy, w, h) — per-class regression counts only the true class's four outputs — or smooth-L1.
Runs end with the last epoch's weights (no epoch is chosen on the validation images the benchmark reports).
Each epoch ends with a line that says the run's time left; an epoch that runs over 30 s also reports its batches as
it goes (:func:`vggnet.progress.progress_bar`), so a log of a slow run is never silent for long.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from vggnet import progress as vprogress
from vggnet.atomic import write_json
from vggnet.data import IMAGE_ERRORS, DataError
from vggnet.data.voc import (
    VOCAnnotation,
    VOCBoxes,
    collate,
    primary_boxes,
    primary_object,
    read_pixels,
    train_box_transform,
)
from vggnet.errors import UsageError
from vggnet.models import VGG, save_checkpoint

from .boxes import encode
from .evaluate import Views, predict_boxes, score
from .model import BoxSpec, build_box_model, freeze_features, select_codes

_log = logging.getLogger(__name__)
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
LOSSES = ("l2", "smooth_l1")


@dataclass
class LocalizeSettings:
    """Everything a run needs; ``vggnet localize train`` reads these from YAML (localize/localize.yaml)."""

    model: str = "vgg11_bn"
    width: float = 0.5
    fc_width: int | None = 512
    dropout: float = 0.5
    weights: str | None = None  # a classification checkpoint (vggnet, torchvision or timm) to start from
    per_class: bool = False  # PCR (4 outputs per class) instead of SCR (4 shared)
    loss: str = "l2"
    finetune: str = "all"  # all | fc: the paper tried both
    image_size: int = 96
    crop: str = "contain"  # contain: random crops that keep the object whole; iou: SSD's (may cut it)
    zoom_out: float = 2.0  # half the time, the photo on a canvas up to this much larger first
    mean: list[float] | None = None  # None: the weights' own, else ImageNet's
    std: list[float] | None = None
    epochs: int = 40
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    val: int = 40  # images held out by a fixed-seed split
    scales: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0])

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise UsageError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.crop not in ("contain", "iou", "none"):
            raise UsageError(f"crop must be 'contain', 'iou' or 'none', got {self.crop!r}")
        if self.finetune not in ("all", "fc"):
            raise UsageError(f"finetune must be 'all' or 'fc', got {self.finetune!r}")
        if self.image_size < 32 or self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UsageError("image_size ≥ 32, epochs ≥ 1, batch_size ≥ 1 and lr > 0 are required")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalizeSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown localize setting(s) {unknown}; known: {', '.join(sorted(known))}")
        for f in fields(cls):  # a YAML typo (`epochs: ten`) is the user's to fix, not a TypeError deep in check()
            if f.name not in data or f.default in (MISSING, None) or data[f.name] is None and "None" in str(f.type):
                continue
            value, want = data[f.name], type(f.default)
            kinds = (int, float) if want is float else want
            if isinstance(value, bool) != (want is bool) or not isinstance(value, kinds):
                raise UsageError(f"localize setting {f.name}: expected {want.__name__}, got {value!r}")
        return cls(**data)


def box_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per image, summed over the four coordinates (the Euclidean loss of the paper), averaged over the batch."""
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="sum") / len(pred)
    return F.smooth_l1_loss(pred, target, reduction="sum", beta=0.1) / len(pred)


def evaluate_views(model: VGG, samples: Sequence[tuple[Any, torch.Tensor, int]], spec: BoxSpec, views: Views,
                   protocol: str) -> dict[str, float]:
    """``samples``: (image, its true boxes N×4 in pixels, class index) → accuracy at IoU 0.5 and mean IoU."""
    preds = [predict_boxes(model, image, spec, views, protocol, label if spec.per_class else None)[0]
             for image, _, label in samples]
    return score(torch.stack(preds), [boxes for _, boxes, _ in samples])


def eval_target(annotation: VOCAnnotation, classes: Sequence[str]) -> tuple[torch.Tensor, int]:
    """(the true boxes of the image's main class, that class's index): a prediction counts when it matches any
    non-difficult object of the class (every object when all are difficult). No pixel is read."""
    main = primary_object(annotation)
    same = [o for o in annotation.objects if o.name == main.name]
    boxes = [o.box for o in same if not o.difficult] or [o.box for o in same]
    return torch.tensor(boxes, dtype=torch.float32), list(classes).index(main.name)


def eval_samples(annotations: Sequence[VOCAnnotation], classes: Sequence[str],
                 log: Callable[[str], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(pixels, true boxes, class index) per image, see :func:`eval_target`. An image that cannot be decoded
    (changed since :func:`~vggnet.data.voc.load_voc_folder` checked it) is left out with one line to ``log``
    (default: a logging warning), so one bad file never stops an evaluation after its other images."""
    out = []
    for ann in annotations:
        try:
            pixels = read_pixels(ann)
        except IMAGE_ERRORS as exc:  # VOCError (a size that changed) is a ValueError too
            (log or _log.warning)(f"skipped {ann.image}: unreadable image ({type(exc).__name__}: {exc})")
            continue
        out.append((pixels, *eval_target(ann, classes)))
    return out


def _epoch_bar(loader: DataLoader, epoch: int, epochs: int, progress: bool | None) -> tqdm:
    """An epoch's batches: on a terminal a bar that gives way to the epoch line; elsewhere a line every 30 s once the
    epoch has run that long (``progress=True``: from its start), so a run of short epochs logs only its epoch lines."""
    tty = sys.stderr.isatty()
    return vprogress.progress_bar(loader, total=len(loader), desc=f"epoch {epoch}/{epochs}", unit="batch",
                                  progress=progress, leave=not tty)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The epoch's record as ``key value`` pairs, and the run's time left at its pace so far."""
    line = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
    epoch, seconds = record["epoch"], record["seconds"]
    return line if epoch >= epochs else f"{line}, {tqdm.format_interval(seconds / epoch * (epochs - epoch))} left"


def train_localizer(settings: LocalizeSettings, train_anns: Sequence[VOCAnnotation], classes: Sequence[str],
                    out_dir: Path, val_anns: Sequence[VOCAnnotation] = (), data: str | None = None,
                    log: Callable[[str], None] = print, progress: bool | None = None) -> Path:
    """Train on ``train_anns`` and save ``out_dir/best.safetensors`` (the last epoch) with ``metrics.json``;
    ``val_anns`` are scored (whole-image view) every 10 epochs and at the end, never used to choose. ``log`` gets
    one line per epoch, with the run's time left; ``progress`` (None or True: a bar on a terminal, a line every 30 s
    elsewhere; False: none) covers the batches of a long epoch."""
    settings.check()
    if not train_anns:
        raise DataError("no training images")
    train_set = VOCBoxes(train_anns, classes, single_object=True, transform=train_box_transform(
        settings.image_size, crop=settings.crop, zoom_out=settings.zoom_out))
    val_samples = eval_samples(val_anns, classes, log)
    torch.manual_seed(settings.seed)
    spec = BoxSpec(tuple(classes), settings.per_class)
    model, info = build_box_model(settings.model, spec, width=settings.width, fc_width=settings.fc_width,
                                  dropout=settings.dropout, weights=settings.weights)
    mean = settings.mean or info.get("mean") or IMAGENET["mean"]
    std = settings.std or info.get("std") or IMAGENET["std"]
    views = Views(settings.image_size, mean, std, tuple(settings.scales))
    frozen = freeze_features(model) if settings.finetune == "fc" else []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
                          nesterov=True)
    loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, drop_last=len(train_set) > 32,
                        collate_fn=collate, generator=torch.Generator().manual_seed(settings.seed))
    total = settings.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total)
                                                                                   / total)))
    norm_mean = torch.tensor(mean).view(1, -1, 1, 1)
    norm_std = torch.tensor(std).view(1, -1, 1, 1)
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        model.train()
        if frozen:
            model.features.eval()  # frozen BN statistics too
        losses = []
        for batch in _epoch_bar(loader, epoch, settings.epochs, progress):
            if batch is None:  # every image of the batch was unreadable (reported by the dataset)
                continue
            images, targets = batch
            boxes = primary_boxes(targets)
            labels = torch.stack([t["labels"][0] for t in targets])
            x = (images - norm_mean) / norm_std
            target = encode(boxes, (settings.image_size, settings.image_size))
            pred = select_codes(model(x), spec, labels)
            loss = box_loss(pred, target, settings.loss)
            if not torch.isfinite(loss):  # stop before a diverged model is saved as if trained
                raise UsageError(f"the loss became {loss.item()} in epoch {epoch}; lower lr (now {settings.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        record: dict[str, Any] = {"epoch": epoch, "train_loss": sum(losses) / max(1, len(losses)),
                                  "seconds": round(time.perf_counter() - start, 1)}
        if val_samples and (epoch == settings.epochs or epoch % 10 == 0):
            record.update({f"val_{k}": v for k, v in evaluate_views(model, val_samples, spec, views, "whole").items()
                           if k != "images"})
        history.append(record)
        log(_epoch_line(record, settings.epochs))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**spec.metadata(), "mean": list(mean), "std": list(std),
            "image_size": settings.image_size, "scales": list(settings.scales), "loss": settings.loss,
            "finetune": settings.finetune, "weights": info.get("weights"), "epochs": settings.epochs,
            "split": {"val": settings.val, "seed": settings.seed}, "data": data,
            "train_boxes": [[*primary_object(a).box, a.width, a.height] for a in train_anns]}
    path = save_checkpoint(model.eval(), out_dir / "best.safetensors", meta)
    write_json(out_dir / "settings.json", asdict(settings))
    write_json(out_dir / "metrics.json", history)
    return path
