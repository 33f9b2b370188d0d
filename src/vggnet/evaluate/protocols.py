"""The paper's test-time protocols (Sec. 3.2 and 4.1–4.5): single crop, dense, multi-crop, multi-scale.

Every protocol turns each image into *views* (a centre crop, the whole image, a 5×5 grid of crops; with
or without their mirror images) at one or more test scales Q (shorter side rescaled isotropically to Q),
runs every model of an ensemble on every view and averages the **softmax** probabilities over views,
scales and models. ``shift`` is not the paper's: a test-time augmentation for tiny images (CIFAR),
where a rescale cannot make room for a crop grid, so the crop is translated within reflect padding
instead, matching the pad-and-crop training augmentation. ``dense+multicrop`` averages the dense and
the multi-crop probabilities with equal weight, whatever their number of views (the paper's Table 5).

Scales below 16 are relative to the training crop (``1.0`` = Q equals the crop, ``1.143`` at crop 224
is the paper's Q = 256), integers from 16 up are pixels, so the same protocol text serves 32-px
CIFAR checkpoints and 224-px ImageNet ones.

``dense`` trims each side of the rescaled image to a multiple of 32 (the net's stride) around its
centre, so that max-pool flooring does not bias the score map towards the top-left corner.

Views of many images are batched together: crops always share a shape; whole images (``dense``) are
grouped by rescaled size within a window of ``batch_size`` images, and run one at a time when all
their sizes differ.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from vggnet import progress as vprogress
from vggnet.data import eval_transform
from vggnet.data.transforms import RELATIVE_BELOW, scale_pixels
from vggnet.errors import UsageError
from vggnet.hardware import native_bf16
from vggnet.metrics import confusion_matrix, topk_correct
from vggnet.models import VGG

__all__ = ["KINDS", "RELATIVE_BELOW", "Protocol", "check_scales", "crop_boxes", "image_tensor", "parse_protocol",
           "predict_proba", "resolve_scale", "summarize", "trim_to_stride"]

KINDS = ("single", "shift", "dense", "multicrop", "dense+multicrop")
_ALIASES = {"centre": "single", "center": "single", "multi-crop": "multicrop",
            "dense+multi-crop": "dense+multicrop", "multicrop+dense": "dense+multicrop"}
STRIDE = 32  # a VGG's total stride (five 2×2 max-pools): ``dense`` trims each side to a multiple of it
MIN_SIDE = STRIDE  # the smallest input a VGG takes
GRID = 5  # the paper's multi-crop grid: 5×5 crops × 2 flips per scale
SHIFT = 2  # ``shift``: the centre crop moved this many pixels along both diagonals (reflect-padded)
SYNTAX = "KIND[@SCALE,SCALE,...][:flip|:noflip] with KIND one of " + ", ".join(KINDS)
ScaleValue = float | int


def _check_scale(value: Any) -> float | int:
    """A scale as stored: a float multiple of the crop (< 16) or an int pixel count (>= 16)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"scale {value!r} is not a number")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"scale {value!r} must be a positive finite number")
    if value < RELATIVE_BELOW:
        return float(value)
    if value != int(value):
        raise UsageError(f"scale {value!r}: values of {RELATIVE_BELOW} and more are pixels and must be whole; "
                         f"values below {RELATIVE_BELOW} are multiples of the training crop")
    return int(value)


def resolve_scale(q: ScaleValue, crop: int) -> int:
    """Q in pixels: ``q`` < 16 is a multiple of ``crop`` (rounded), larger values are pixels."""
    return scale_pixels(_check_scale(q), crop)


@dataclass(frozen=True)
class Protocol:
    """One test-time protocol: ``kind`` at test ``scales`` (several = multi-scale), with or without flips.

    ``flip=None`` takes the paper's choice: mirrored views for ``dense`` and ``multicrop``, none for
    ``single`` (there it is optional test-time augmentation).
    """

    kind: str
    scales: tuple[ScaleValue, ...] = (1.0,)
    flip: bool | None = None

    def __post_init__(self) -> None:
        kind = _ALIASES.get(self.kind, self.kind)
        if kind not in KINDS:
            raise UsageError(f"unknown protocol kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        scales = (self.scales,) if isinstance(self.scales, int | float) else tuple(self.scales)
        if not scales:
            raise UsageError("a protocol needs at least one scale")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "scales", tuple(_check_scale(q) for q in scales))
        object.__setattr__(self, "flip", (kind != "single") if self.flip is None else bool(self.flip))

    @property
    def components(self) -> tuple[str, ...]:
        """The view kinds averaged with equal weight: ``("dense", "multicrop")`` for the combination."""
        return tuple(self.kind.split("+"))

    def pixel_scales(self, crop: int) -> tuple[int, ...]:
        return tuple(resolve_scale(q, crop) for q in self.scales)

    def views_per_image(self) -> int:
        """Forward passes per image and model (over all scales and components)."""
        per_scale = {"single": 1, "shift": 5, "dense": 1, "multicrop": GRID * GRID}
        return sum(per_scale[c] for c in self.components) * (2 if self.flip else 1) * len(self.scales)

    def __str__(self) -> str:
        text = f"{self.kind}@{','.join(_format_scale(q) for q in self.scales)}"
        default_flip = self.kind != "single"
        return text if self.flip == default_flip else text + (":flip" if self.flip else ":noflip")


def _format_scale(q: ScaleValue) -> str:
    return str(q) if isinstance(q, int) else f"{q:g}"


def _parse_number(item: str, text: str) -> ScaleValue:
    item = item.strip()
    if re.fullmatch(r"\d+", item):
        return int(item)
    try:
        return float(item)
    except ValueError:
        raise UsageError(f"bad protocol {text!r}: scale {item!r} is not a number; expected {SYNTAX}") from None


def parse_protocol(text: str) -> Protocol:
    """``"single"``, ``"dense@1.0,1.14,1.29"``, ``"multicrop@256,384,512"``, ``"single@1.0:flip"``...

    Syntax ``KIND[@SCALE,...][:flip|:noflip]``. A scale below 16 is a multiple of the training crop,
    an integer from 16 up is pixels; no scale means ``1.0`` (Q = the training crop).
    """
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"empty protocol; expected {SYNTAX}")
    body, colon, option = text.strip().lower().partition(":")
    flip: bool | None = None
    if colon:
        if option.strip() not in ("flip", "noflip"):
            raise UsageError(f"bad protocol {text!r}: unknown option {option!r} (use :flip or :noflip)")
        flip = option.strip() == "flip"
    kind, at, scale_text = body.partition("@")
    scales: tuple[ScaleValue, ...] = (1.0,)
    if at:
        items = scale_text.split(",")
        if not scale_text.strip() or any(not item.strip() for item in items):
            raise UsageError(f"bad protocol {text!r}: empty scale after '@' or ','; expected {SYNTAX}")
        scales = tuple(_parse_number(item, text) for item in items)
    try:
        return Protocol(kind.strip(), scales, flip)
    except ValueError as exc:
        raise UsageError(f"bad protocol {text!r}: {exc}; expected {SYNTAX}") from None


def crop_boxes(height: int, width: int, crop: int, grid: int = GRID) -> list[tuple[int, int]]:
    """(top, left) of a ``grid``×``grid`` regular grid of ``crop``-sized boxes, row by row.

    The first and last rows/columns touch the image borders (corners included), the others are evenly
    spaced between them (rounded half up), so every box lies inside the image.
    """
    if crop > height or crop > width:
        raise ValueError(f"a {crop}×{crop} crop does not fit a {height}×{width} image")
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")

    def offsets(size: int) -> list[int]:
        span = size - crop
        if grid == 1:
            return [span // 2]
        return [(2 * k * span + grid - 1) // (2 * (grid - 1)) for k in range(grid)]

    return [(top, left) for top in offsets(height) for left in offsets(width)]


def _has_fc_head(model: nn.Module) -> bool:
    return isinstance(model, VGG) and model.config.head == "fc"


def _num_classes(models: Sequence[nn.Module]) -> int | None:
    """The class count every model agrees on (from VGG configs); None when some model does not say."""
    counts = {m.config.num_classes for m in models if isinstance(m, VGG)}
    if len(counts) > 1:
        raise UsageError(f"the models disagree on the number of classes ({sorted(counts)}); "
                         "an ensemble needs the same classes")
    return counts.pop() if counts and all(isinstance(m, VGG) for m in models) else None


def _prepare(model: nn.Module, dense: bool, device: torch.device, channels_last: bool) -> nn.Module:
    """A private copy in eval mode on ``device``; for dense evaluation the fc head becomes the conv head."""
    net = copy.deepcopy(model)
    if dense and _has_fc_head(net):
        net.convert_head("conv")
    net = net.eval().to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


class _Accumulator:
    """Buffers views per (component, shape), runs full batches through every model, sums softmaxes per image."""

    def __init__(self, nets: dict[str, list[nn.Module]], n: int, num_classes: int | None, batch_size: int,
                 device: torch.device, bf16: bool, channels_last: bool) -> None:
        self.nets, self.n, self.batch_size = nets, n, batch_size
        self.device, self.bf16, self.channels_last = device, bf16, channels_last
        self.sums: dict[str, torch.Tensor | None] = {
            comp: None if num_classes is None else torch.zeros(n, num_classes) for comp in nets}
        self.counts = {comp: torch.zeros(n) for comp in nets}
        self.buffers: dict[tuple, list[tuple[torch.Tensor, int]]] = {}
        self.pending: dict[tuple, int] = {}

    def add(self, comp: str, views: torch.Tensor, owner: int) -> None:
        key = (comp, tuple(views.shape[1:]))
        self.buffers.setdefault(key, []).append((views, owner))
        self.pending[key] = self.pending.get(key, 0) + len(views)
        while self.pending[key] >= self.batch_size:
            self._run(key, self.batch_size)

    def flush(self) -> None:
        for key in list(self.buffers):
            while self.pending.get(key, 0):
                self._run(key, self.batch_size)
        self.buffers.clear()
        self.pending.clear()

    def _run(self, key: tuple, limit: int) -> None:
        buffer, parts, owners, taken = self.buffers[key], [], [], 0
        while buffer and taken < limit:
            views, owner = buffer[0]
            room = limit - taken
            if len(views) > room:  # split an image's views across two batches
                buffer[0] = (views[room:], owner)
                views = views[:room]
            else:
                buffer.pop(0)
            parts.append(views)
            owners.append(torch.full((len(views),), owner, dtype=torch.long))
            taken += len(views)
        self.pending[key] -= taken
        self._forward(key[0], torch.cat(parts), torch.cat(owners))

    def _forward(self, comp: str, x: torch.Tensor, owners: torch.Tensor) -> None:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ones = torch.ones(len(owners))
        for net in self.nets[comp]:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = net(x)
            probs = torch.softmax(logits.float(), dim=1).cpu()
            total = self.sums[comp]
            if total is None:
                total = self.sums[comp] = torch.zeros(self.n, probs.shape[1])
            elif probs.shape[1] != total.shape[1]:
                raise UsageError(f"the models disagree on the number of classes ({total.shape[1]} vs "
                                 f"{probs.shape[1]}); an ensemble needs the same classes")
            total.index_add_(0, owners, probs)
            self.counts[comp].index_add_(0, owners, ones)

    def result(self) -> torch.Tensor:
        means = []
        for comp, total in self.sums.items():
            if total is None:  # no image gave a view and the class count is unknown (not a VGG)
                return torch.full((self.n, 0), math.nan)
            counts = self.counts[comp].unsqueeze(1)
            means.append(torch.where(counts > 0, total / counts.clamp(min=1), math.nan))
        return torch.stack(means).mean(0).float()


def image_tensor(item: Any, channels: int) -> torch.Tensor | None:
    """A CHW image tensor from a dataset item (a tensor or an ``(image, label)`` pair); ``None`` stays."""
    if isinstance(item, tuple | list):
        item = item[0]
    if item is None:
        return None
    image = torch.as_tensor(item)
    if image.dim() != 3:
        raise ValueError(f"images must be C×H×W tensors, got shape {tuple(image.shape)}")
    if image.shape[0] == 1 and channels != 1:
        image = image.expand(channels, -1, -1)
    return image


def _views(comp: str, image: torch.Tensor, crop: int, flip: bool) -> torch.Tensor:
    """The network inputs one (rescaled, normalised) image yields for one component at one scale."""
    if comp == "dense":
        views = trim_to_stride(image, crop).unsqueeze(0)
    elif comp == "single":
        views = TF.center_crop(image, [crop, crop]).unsqueeze(0)
    elif comp == "shift":  # small-image TTA: the centre crop and four diagonal translations of it
        padded = F.pad(image.unsqueeze(0), (SHIFT,) * 4, mode="reflect")[0]
        top, left = (padded.shape[-2] - crop) // 2, (padded.shape[-1] - crop) // 2
        offsets = [(0, 0), (-SHIFT, -SHIFT), (-SHIFT, SHIFT), (SHIFT, -SHIFT), (SHIFT, SHIFT)]
        views = torch.stack([padded[:, top + dy:top + dy + crop, left + dx:left + dx + crop] for dy, dx in offsets])
    else:
        boxes = crop_boxes(image.shape[-2], image.shape[-1], crop)
        views = torch.stack([image[:, top:top + crop, left:left + crop] for top, left in boxes])
    return torch.cat([views, views.flip(-1)]) if flip else views


def trim_to_stride(image: torch.Tensor, crop: int) -> torch.Tensor:
    """The centred part of ``image`` whose sides are multiples of :data:`STRIDE` (never below ``crop``).

    Max-pooling floors its input, so on a side that is not a multiple of 32 the net silently drops up to
    31 px from the bottom and right: the score map would come from the top-left of the image. Trimming
    the remainder evenly from both edges first keeps the dense view centred, like the paper's crops.
    Sides already at a multiple of 32 (the paper's Q = 256, 384, 512, 224 ...) are left as they are.
    """
    size = [side if side - side % STRIDE < crop else side - side % STRIDE for side in image.shape[-2:]]
    return image if size == list(image.shape[-2:]) else TF.center_crop(image, size)


def check_scales(protocol: Protocol, crop: int) -> tuple[int, ...]:
    """The protocol's test scales in pixels, or a UsageError when a crop cannot fit or the input is too small;
    callable before any image is read, so a command can refuse before it starts."""
    qs = protocol.pixel_scales(crop)
    for q in qs:
        if q < crop and protocol.kind != "dense":
            raise UsageError(f"{protocol}: test scale Q={q} px is smaller than the {crop}-px training crop, "
                             "so no crop fits; use scales >= 1.0 (or the dense protocol)")
        if q < MIN_SIDE:
            raise UsageError(f"{protocol}: test scale Q={q} px is below the {MIN_SIDE} px a VGG needs")
    return qs


def predict_proba(
    models: Sequence[nn.Module] | nn.Module,
    images: Sequence[Any],
    protocol: Protocol | str,
    *,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp_bf16: bool | None = None,
    channels_last: bool = True,
    progress: bool | None = None,
) -> torch.Tensor:
    """Class probabilities (N × classes, float32) of ``images`` under ``protocol``, averaged over ``models``.

    ``images`` is a sequence of uint8 (or [0, 1] float) C×H×W tensors, or of ``(image, label)`` pairs, of
    any and varying sizes; an item that is ``None`` (an unreadable file) gives a row of NaN. ``crop``,
    ``mean`` and ``std`` are the training crop size and normalisation (checkpoint metadata). The callers'
    models are not modified (each is copied; the copy for dense evaluation gets the conv head).
    ``amp_bf16=None`` uses bf16 autocast where the hardware runs it natively. ``progress``: None, a bar on a
    terminal and otherwise (a log, a pipe) a line every 30 s with the time left, the first once the run has taken
    that long (so a long ``vggnet eval`` under ``nohup`` is not silent, and a short one says nothing); True, the
    same from the first image; False, nothing.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models:
        raise ValueError("no models to evaluate")
    protocol = parse_protocol(protocol) if isinstance(protocol, str) else protocol
    crop, batch_size = int(crop), int(batch_size)
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if len(mean) != len(std):
        raise UsageError(f"mean and std differ in length ({len(mean)} vs {len(std)})")
    qs = check_scales(protocol, crop)
    device = torch.device(device)
    bf16 = native_bf16(device) if amp_bf16 is None else bool(amp_bf16)
    num_classes = _num_classes(models)
    nets: dict[str, list[nn.Module]] = {}
    for comp in sorted(protocol.components, key=lambda c: c == "dense"):  # crops first: dense may reuse them
        if comp == "dense" and "multicrop" in nets:
            nets[comp] = [net if not _has_fc_head(m) else _prepare(m, True, device, channels_last)
                          for m, net in zip(models, nets["multicrop"], strict=True)]
        else:
            nets[comp] = [_prepare(m, comp == "dense", device, channels_last) for m in models]
    transforms = {q: eval_transform(q, None, mean=list(mean), std=list(std)) for q in set(qs)}
    n, channels = len(images), len(mean)
    acc = _Accumulator(nets, n, num_classes, batch_size, device, bf16, channels_last)
    with torch.inference_mode(), vprogress.progress_bar(total=n, desc=str(protocol), unit="img", progress=progress,
                                                        mininterval=0.5) as bar:
        for start in range(0, n, batch_size):  # a window of images: dense views of equal size batch together
            window = [(i, image_tensor(images[i], channels)) for i in range(start, min(n, start + batch_size))]
            window = [(i, image) for i, image in window if image is not None]
            for q in qs:
                for i, image in window:
                    scaled = transforms[q](image).as_subclass(torch.Tensor)
                    for comp in protocol.components:
                        acc.add(comp, _views(comp, scaled, crop, protocol.flip), i)
            acc.flush()
            bar.update(min(n, start + batch_size) - start)
    return acc.result()


def summarize(probs: torch.Tensor, targets: Sequence[int] | torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1 / top-5 error (%), per-class accuracy (%), confusion matrix (rows true, columns predicted).

    Rows of ``probs`` holding NaN (unreadable images) are left out and counted as ``skipped``. Top-5 is
    top-min(5, classes) (``top5_k``); with no image left the errors are ``None``.
    """
    probs = torch.as_tensor(probs, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    classes = list(classes)
    if probs.dim() != 2 or len(probs) != len(targets):
        raise ValueError(f"need N×C probabilities and N targets, got {tuple(probs.shape)} and {len(targets)}")
    if probs.shape[1] != len(classes):
        raise ValueError(f"{probs.shape[1]} columns of probabilities but {len(classes)} class names")
    valid = torch.isfinite(probs).all(dim=1)
    probs, targets = probs[valid], targets[valid]
    n, num_classes = len(targets), len(classes)
    confusion = confusion_matrix(probs.argmax(dim=1), targets, num_classes)
    rows = confusion.sum(dim=1)
    per_class = {name: (100.0 * int(confusion[i, i]) / int(rows[i]) if int(rows[i]) else None)
                 for i, name in enumerate(classes)}
    hits = topk_correct(probs, targets, (1, 5)) if n else {1: 0, 5: 0}
    return {
        "n": n,
        "skipped": int((~valid).sum()),
        "top1_err": 100.0 * (1 - hits[1] / n) if n else None,
        "top5_err": 100.0 * (1 - hits[5] / n) if n else None,
        "top5_k": min(5, num_classes),
        "per_class_acc": per_class,
        "confusion": confusion.tolist(),
    }
