"""Box arithmetic for localisation: the paper's (centre, width, height) encoding, IoU, and merging.

Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates (a box covering a whole W×H image is
``(0, 0, W, H)``), as torchvision's ``box_iou`` expects. The network regresses the encoded form: the centre,
width and height divided by the view's width and height, so targets lie in ``[0, 1]`` whatever the input size
(Appendix A: "a bounding box is represented by a 4-D vector storing its center coordinates, width, and height").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_convert, box_iou

__all__ = ["box_iou", "decode", "encode", "iou_hits", "merge_boxes", "to_view", "from_view"]


def encode(boxes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """xyxy pixel boxes (…×4) in a view of ``size`` = (H, W) → normalised (cx, cy, w, h)."""
    h, w = size
    scale = boxes.new_tensor([w, h, w, h])
    return box_convert(boxes.reshape(-1, 4), "xyxy", "cxcywh").reshape(boxes.shape) / scale


def decode(codes: torch.Tensor, size: Sequence[int], clip: bool = True) -> torch.Tensor:
    """Normalised (cx, cy, w, h) (…×4) → xyxy pixel boxes in a view of ``size`` = (H, W).

    Widths and heights are floored at zero first (a regression can go negative); ``clip`` keeps the box in the
    view, since a box is scored against ground truth that lies inside the image.
    """
    h, w = size
    codes = torch.cat([codes[..., :2], codes[..., 2:].clamp(min=0)], dim=-1)
    boxes = box_convert(codes.reshape(-1, 4) * codes.new_tensor([w, h, w, h]), "cxcywh", "xyxy").reshape(codes.shape)
    if clip:
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
    return boxes


def to_view(boxes: torch.Tensor, offset: Sequence[float], scale: float | Sequence[float]) -> torch.Tensor:
    """Image boxes → the frame of a view cut at ``offset`` = (x, y) from the image resized by ``scale``."""
    sx, sy = (scale, scale) if isinstance(scale, (int, float)) else scale
    ox, oy = offset
    return boxes * boxes.new_tensor([sx, sy, sx, sy]) - boxes.new_tensor([ox, oy, ox, oy])


def from_view(boxes: torch.Tensor, offset: Sequence[float], scale: float | Sequence[float]) -> torch.Tensor:
    """The inverse of :func:`to_view`: boxes predicted in a view → the original image's pixels."""
    sx, sy = (scale, scale) if isinstance(scale, (int, float)) else scale
    ox, oy = offset
    return (boxes + boxes.new_tensor([ox, oy, ox, oy])) / boxes.new_tensor([sx, sy, sx, sy])


def iou_hits(pred: torch.Tensor, truths: Sequence[torch.Tensor],
             threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the best IoU of the predicted box (N×4) with any of that image's true boxes, and whether it
    reaches ``threshold`` (ILSVRC's rule: a prediction is right if it overlaps *some* object of the class)."""
    best = torch.stack([box_iou(p[None], t.reshape(-1, 4)).max() for p, t in zip(pred, truths, strict=True)])
    return best, best >= threshold


def merge_boxes(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> tuple[torch.Tensor, float]:
    """One box from many dense predictions: greedy clustering by IoU, then the score-weighted mean of the
    cluster with the largest total score.

    Boxes are visited by decreasing score; each joins the first cluster whose leader (its highest-scoring
    box) it overlaps by ``iou_threshold``, or leads a new one. Why this rule: a single high-scoring window
    can be wrong, and averaging *all* windows blends the object with windows that saw only part of it. The
    heaviest cluster is where many confident windows agree — OverFeat's observation, used by the paper to
    merge its dense predictions — and averaging inside it smooths the per-window regression noise.
    Returns (box, the cluster's share of the total score).
    """
    if boxes.numel() == 0:
        raise ValueError("no boxes to merge")
    scores = scores.clamp(min=0) + 1e-12
    order = scores.argsort(descending=True)
    leaders: list[int] = []
    members: list[list[int]] = []
    ious = box_iou(boxes, boxes)
    for i in order.tolist():
        for k, lead in enumerate(leaders):
            if ious[i, lead] >= iou_threshold:
                members[k].append(i)
                break
        else:
            leaders.append(i)
            members.append([i])
    weights = [float(scores[m].sum()) for m in members]
    best = members[max(range(len(members)), key=weights.__getitem__)]
    w = scores[best]
    merged = (boxes[best] * w[:, None]).sum(0) / w.sum()
    return merged, max(weights) / float(scores.sum())
