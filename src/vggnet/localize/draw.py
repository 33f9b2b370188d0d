"""Pictures of boxes: the prediction (red) and, when known, the truth (green) drawn on the image, with a legend
in the bottom-left corner so a picture shown on its own says which colour is which."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from vggnet.atomic import atomic_path

PRED, TRUE = (230, 40, 40), (40, 200, 60)
LEGEND_BACKGROUND = (0, 0, 0)


def draw_legend(image: Image.Image, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> bool:
    """A colour swatch and its meaning per entry, on a dark strip in the bottom-left corner (in place).

    Left out (False) on a thumbnail-sized image, where it would hide a third of the picture or more; the
    picture keeps the image's own size, so it can be laid over or beside the original.
    """
    draw = ImageDraw.Draw(image)
    pad = 2
    line = max(draw.textbbox((0, 0), text)[3] for text, _ in entries) + pad
    swatch = line - pad
    width = max(draw.textlength(text) for text, _ in entries) + swatch + 3 * pad
    top = image.height - len(entries) * line - pad
    if 3 * (image.height - top) > image.height or 2 * width > image.width:
        return False
    draw.rectangle((0, top, width, image.height), fill=LEGEND_BACKGROUND)
    for i, (text, colour) in enumerate(entries):
        y = top + pad + i * line
        draw.rectangle((pad, y, pad + swatch - 1, y + swatch - 1), fill=colour)
        draw.text((2 * pad + swatch, y), text, fill=(255, 255, 255))
    return True


def draw_boxes(pixels: torch.Tensor, pred: torch.Tensor, truths: torch.Tensor | None = None,
               label: str | None = None) -> Image.Image:
    """uint8 CHW pixels + an xyxy box (and the true boxes) → an RGB picture, the IoU written when truth is known,
    and a legend naming the colours (only those drawn)."""
    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()).convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 200))
    text = label or ""
    legend = [("predicted", PRED)]
    if truths is not None and len(truths):
        legend.append(("true", TRUE))
        for box in truths.tolist():
            draw.rectangle(box, outline=TRUE, width=width)
        iou = float(box_iou(pred[None], truths.reshape(-1, 4)).max())
        text = f"{text}  IoU {iou:.2f}".strip()
    draw.rectangle(pred.tolist(), outline=PRED, width=width)
    if text:
        x0, y0 = pred[0].item(), pred[1].item()
        draw.rectangle(draw.textbbox((x0 + width, y0 + width), text), fill=PRED)
        draw.text((x0 + width, y0 + width), text, fill=(255, 255, 255))
    draw_legend(image, legend)
    return image


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write through :func:`vggnet.atomic.atomic_path`: a half-written PNG never replaces a good one."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


def contact_sheet(images: Sequence[Image.Image], columns: int = 4, cell: int = 256) -> Image.Image:
    """Several pictures in one grid (for the README), each fitted into a ``cell``-pixel square."""
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, image in enumerate(images):
        thumb = image.copy()
        thumb.thumbnail((cell, cell))
        x, y = (i % columns) * cell + (cell - thumb.width) // 2, (i // columns) * cell + (cell - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    return sheet
