"""Test protocols for box regression, and the baselines any box predictor must beat.

* ``whole``: the image resized to S×S, one box — the view training draws its crops around;
* ``centre``: the paper's first protocol — shorter side to S, the central S×S crop, one box (an object that
  reaches outside the crop is cut);
* ``dense``: the paper's second — the net applied at every S×S window (stride ``stride``) of the image
  warped to (q·S)² for each q in ``scales`` (warped, as the training crops are: at q = 1 the one window is
  the ``whole`` view), the boxes weighted by :func:`window_scores` and merged by
  :func:`~vggnet.localize.boxes.merge_boxes`.

A prediction is correct when its IoU with some true box of the image reaches 0.5 (ILSVRC's criterion).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from vggnet.errors import UsageError
from vggnet.models import VGG

from .boxes import decode, encode, from_view, iou_hits, merge_boxes
from .model import BoxSpec, select_codes

PROTOCOLS = ("whole", "centre", "dense")


@dataclass(frozen=True)
class Views:
    """How an image is cut into network inputs: crop size, normalisation, and the dense scales and stride."""

    size: int
    mean: Sequence[float]
    std: Sequence[float]
    scales: Sequence[float] = (1.0, 1.5, 2.0)  # × size: the side of each warped square image (dense)
    stride: float = 0.25  # × size: window step (dense)


def _tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    return TF.to_image(image.convert("RGB"))


def _normalise(x: torch.Tensor, views: Views) -> torch.Tensor:
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(views.mean), list(views.std))


def view_batch(image: Image.Image | torch.Tensor, protocol: str, views: Views
               ) -> tuple[torch.Tensor, list[tuple[tuple[float, float], tuple[float, float]]]]:
    """The network inputs one image gives under ``protocol``, with each view's (offset, scale) so a box
    predicted in the view maps back to the image (:func:`~vggnet.localize.boxes.from_view`)."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    x = _tensor(image)
    h, w = x.shape[-2:]
    s = views.size
    if protocol == "whole":
        return _normalise(TF.resize(x, [s, s], antialias=True), views)[None], [((0.0, 0.0), (s / w, s / h))]
    if protocol == "centre":
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        top, left = (nh - s) // 2, (nw - s) // 2
        crop = TF.resize(x, [nh, nw], antialias=True)[..., top:top + s, left:left + s]
        return _normalise(crop, views)[None], [((float(left), float(top)), (nw / w, nh / h))]
    crops, places = [], []
    step = max(1, round(views.stride * s))
    for q in views.scales:  # warped to (q·S)², as training warps its crops: at q = 1 the one window is "whole"
        nh = nw = max(s, round(q * s))
        resized = TF.resize(x, [nh, nw], antialias=True)
        for top in _positions(nh, s, step):
            for left in _positions(nw, s, step):
                crops.append(resized[..., top:top + s, left:left + s])
                places.append(((float(left), float(top)), (nw / w, nh / h)))
    return _normalise(torch.stack(crops), views), places


def _positions(length: int, size: int, step: int) -> list[int]:
    """Window offsets from 0 to the far edge inclusive, evenly spread at about ``step`` apart."""
    n = math.ceil((length - size) / step) + 1 if length > size else 1
    return sorted({round(i * (length - size) / max(1, n - 1)) for i in range(n)})


def window_scores(raw: torch.Tensor, places: Sequence[tuple[tuple[float, float], tuple[float, float]]], size: int,
                  image_hw: Sequence[int], tolerance: float = 0.05, cut_weight: float = 0.05) -> torch.Tensor:
    """How far to trust each window's box (``raw``: xyxy in the window, unclipped) when merging.

    Training crops cut objects, and the target is then the visible part, so a window that sees part of an
    object predicts that part, with a side on the window's edge. Where that edge is inside the image, the
    object may well go on beyond it: each such side multiplies the weight by ``cut_weight``. A side on the
    image's own border is no evidence of a cut. The share of the box inside the window multiplies in too (a
    box reaching outside its window is an extrapolation).
    """
    h, w = image_hw
    inside = raw.clamp(0, size)
    area = (raw[:, 2:] - raw[:, :2]).clamp(min=0).prod(1)
    seen = ((inside[:, 2:] - inside[:, :2]).clamp(min=0).prod(1) / area.clamp(min=1e-6)).clamp(0, 1)
    tol = tolerance * size
    cuts = torch.zeros(len(raw))
    for i, ((left, top), (sx, sy)) in enumerate(places):
        nw, nh = w * sx, h * sy
        interior = (left > 0.5, top > 0.5, left + size < nw - 0.5, top + size < nh - 0.5)
        near = (inside[i, 0] <= tol, inside[i, 1] <= tol, inside[i, 2] >= size - tol, inside[i, 3] >= size - tol)
        cuts[i] = sum(bool(a and b) for a, b in zip(interior, near, strict=True))
    return seen * cut_weight ** cuts


@torch.no_grad()
def predict_boxes(model: VGG, image: Image.Image | torch.Tensor, spec: BoxSpec, views: Views, protocol: str,
                  label: int | None = None, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """One image → (its merged box in image pixels, every per-view box in image pixels); dense windows are
    weighted by :func:`window_scores` and merged by :func:`~vggnet.localize.boxes.merge_boxes`."""
    x, places = view_batch(image, protocol, views)
    h, w = _tensor(image).shape[-2:]
    model.eval()
    outs = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    labels = None if label is None else torch.full((len(outs),), label, dtype=torch.long)
    s = views.size
    raw = decode(select_codes(outs, spec, labels), (s, s), clip=False)  # may reach outside its window
    boxes = torch.stack([from_view(b, off, sc) for b, (off, sc) in zip(raw, places, strict=True)])
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                         boxes[:, 3].clamp(0, h)], dim=1)
    if len(boxes) == 1:
        return boxes[0], boxes
    merged, _ = merge_boxes(boxes, window_scores(raw, places, s, (h, w)))
    return merged, boxes


def score(pred: torch.Tensor, truths: Sequence[torch.Tensor], per_image: bool = False) -> dict[str, Any]:
    """Accuracy at IoU ≥ 0.5 and mean IoU (best-matching true box per image); ``per_image`` adds each image's
    IoU, for paired comparisons between predictors on the same images."""
    best, hit = iou_hits(pred, truths)
    out: dict[str, Any] = {"acc_iou50": float(hit.float().mean()), "mean_iou": float(best.mean()),
                           "images": len(truths)}
    if per_image:
        out["iou"] = [round(float(v), 4) for v in best]
    return out


def baselines(train_boxes: Sequence[torch.Tensor], train_sizes: Sequence[tuple[int, int]],
              test_truths: Sequence[torch.Tensor], test_sizes: Sequence[tuple[int, int]],
              per_image: bool = False) -> dict[str, dict]:
    """Three box predictors that look at no pixel, scored like the network: the mean training box, a centred
    box of the mean training size, and the whole image. (Boxes are averaged in normalised coordinates, so
    images of different sizes count alike.)"""
    codes = torch.stack([encode(b.reshape(4), size) for b, size in zip(train_boxes, train_sizes, strict=True)])
    mean = codes.mean(0)
    centred = torch.cat([torch.tensor([0.5, 0.5]), mean[2:]])
    whole = torch.tensor([0.5, 0.5, 1.0, 1.0])
    out = {}
    for name, code in (("mean box", mean), ("centred mean-size box", centred), ("whole image", whole)):
        pred = torch.stack([decode(code, size) for size in test_sizes])
        out[name] = score(pred, test_truths, per_image)
    return out
