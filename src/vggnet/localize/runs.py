"""A trained box regressor at work: load it from its run, score it beside the baselines, draw its boxes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from vggnet import progress as vprogress
from vggnet.data import IMAGE_ERRORS, DataError
from vggnet.data.voc import VOCAnnotation, VOCError, primary_object, read_pixels, read_voc, split_annotations
from vggnet.errors import UsageError
from vggnet.infer.images import expand_image_paths
from vggnet.models import VGG, checkpoint_file, load_checkpoint

from .draw import draw_boxes, save_png
from .evaluate import PROTOCOLS, Views, baselines, predict_boxes, score
from .model import BoxSpec
from .train import eval_samples, eval_target


def load_localizer(ckpt: str | os.PathLike) -> tuple[VGG, BoxSpec, Views, dict[str, Any]]:
    """Model, what it predicts, how it cuts images into views, and the run's metadata."""
    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    spec = BoxSpec.from_metadata(extra, str(file))
    views = Views(int(extra["image_size"]), extra["mean"], extra["std"], tuple(extra.get("scales", (1.0,))))
    return model.eval(), spec, views, {**extra, "file": str(file)}


def _bar(items: Sequence[Any], desc: str, progress: bool | None, leave: bool = False) -> Any:
    """Progress over ``items``: a bar on a terminal; elsewhere a line every 30 s with the time left, the first once
    the work has run that long (a short evaluation logs nothing; ``progress=True``: from the start). ``progress=False``:
    none."""
    tty = sys.stderr.isatty()
    return vprogress.progress_bar(items, total=len(items), desc=desc, unit="img", progress=progress,
                                  leave=leave or not tty)


def evaluate_run(ckpt: str | os.PathLike, annotations: Sequence[VOCAnnotation], protocols: Sequence[str],
                 scales: Sequence[float] | None = None, split: str = "val", progress: bool | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Accuracy at IoU 0.5 and mean IoU of each protocol on the run's held-out images (its own split,
    re-drawn from its seed), beside the three baselines fitted on its training images' boxes (no pixels read).
    An image that cannot be decoded is left out and reported once to ``log``. ``progress``: see :func:`_bar`."""
    model, spec, views, meta = load_localizer(ckpt)
    if scales:
        views = Views(views.size, views.mean, views.std, tuple(scales), views.stride)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise UsageError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    cut = meta.get("split") or {"val": 40, "seed": 0}
    train, val = split_annotations(annotations, cut["val"], cut["seed"])
    test = list(annotations) if split == "all" else val
    samples = eval_samples(test, spec.classes, log)
    if not samples:
        raise DataError(f"none of the {len(test)} images to score could be read")
    rows: dict[str, dict[str, float]] = {}
    for protocol in protocols:
        preds = []
        for image, _, label in _bar(samples, protocol, progress):
            preds.append(predict_boxes(model, image, spec, views, protocol, label if spec.per_class else None)[0])
        rows[f"{'PCR' if spec.per_class else 'SCR'}, {protocol}"] = score(torch.stack(preds),
                                                                         [t for _, t, _ in samples])
    train_boxes = [eval_target(a, spec.classes)[0][0] for a in train]
    sizes = [(a.height, a.width) for a in train]  # the frame read_pixels returns (the annotation's)
    test_sizes = [tuple(x.shape[-2:]) for x, _, _ in samples]
    rows.update(baselines(train_boxes, sizes, [t for _, t, _ in samples], test_sizes))
    return {"checkpoint": meta["file"], "split": split, "images": len(samples), "protocols": list(protocols),
            "scales": list(views.scales), "rows": rows}


def predict_files(ckpt: str | os.PathLike, images: Sequence[str], out: Path, protocol: str = "whole",
                  annotations: str | os.PathLike | None = None, label: str | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[Path], int]:
    """One PNG per readable image: the predicted box in red, the annotated boxes (if any) in green.
    Unreadable images are reported and skipped. Returns (files written, images that failed)."""
    model, spec, views, _ = load_localizer(ckpt)
    if label is not None and label not in spec.classes:
        raise UsageError(f"class {label!r} is not one of the checkpoint's {list(spec.classes)}")
    paths = expand_image_paths(images)
    written, failed = [], 0
    for path in _bar(paths, "boxes", False if len(paths) < 5 else None, leave=True):
        truths, main = None, label
        xml = Path(annotations) / f"{path.stem}.xml" if annotations else None
        try:
            if xml is not None and xml.is_file():
                ann = read_voc(xml, images_dir=path.parent)
                main = main or primary_object(ann).name
                truths = torch.tensor([o.box for o in ann.objects if o.name == main], dtype=torch.float32)
                pixels = read_pixels(ann)
            else:
                with Image.open(path) as im:
                    pixels = TF.pil_to_tensor(im.convert("RGB"))
        except (VOCError, *IMAGE_ERRORS) as exc:
            log(f"skipped {path}: {exc}")
            failed += 1
            continue
        cls = spec.classes.index(main) if main in spec.classes else 0
        box, _ = predict_boxes(model, pixels, spec, views, protocol, cls if spec.per_class else None)
        name = spec.classes[cls] if spec.per_class or len(spec.classes) == 1 else None
        written.append(save_png(draw_boxes(pixels, box, truths, name), out / f"{path.stem}.boxes.png"))
    return written, failed
