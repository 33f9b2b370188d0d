"""The images an INT8 model is calibrated on, and the held-out ones it is checked against.

Images are read by ``vggnet eval``'s reader (:class:`vggnet.evaluate.FolderImages`, i.e. ``vggnet.data.read_image``),
and a run's own splits are rebuilt exactly as ``vggnet eval`` rebuilds them, so an image ``eval`` (and training)
accepts is never skipped in calibration, and is decoded to the same pixels. ``vggnet.evaluate`` is imported when
images are read, not with this module: loading or serving an exported file never pays for it.

Preprocessing belongs to :mod:`vggnet.infer`, above this package, so callers pass it in as ``preprocess``: a list
of uint8 C×H×W images → the normalised N×C×H×W batch the model takes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vggnet.errors import UsageError

__all__ = ["CALIB_IMAGES", "CHECK_IMAGES", "MIN_CHECK_IMAGES", "CalibrationError", "Int8Images",
           "calibration_batch", "check_counts", "evenly_spaced", "int8_images", "read_images"]

log = logging.getLogger(__name__)

# MinMax ranges settle well before 256 images; more only costs time. The held-out images the result is compared
# with eager on, and the fewest of those a check may rest on (unless fewer are asked for).
CALIB_IMAGES = 256
CHECK_IMAGES = 256
MIN_CHECK_IMAGES = 64

Preprocess = Callable[[list[Any]], torch.Tensor]


class CalibrationError(UsageError):
    """Calibration or check images that cannot be used: none readable, too few, or no recipe to find them by."""


def evenly_spaced(items: Sequence, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer): a deterministic calibration
    subset that covers every class of a class-sorted ImageFolder listing."""
    if n < 1:
        raise UsageError(f"n must be at least 1, got {n}")
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def check_counts(calib_images: int, check_images: int) -> None:
    if calib_images < 1:
        raise UsageError(f"calib_images must be at least 1, got {calib_images}")
    if check_images < 1:
        raise UsageError(f"check_images must be at least 1, got {check_images}")


def read_images(paths: Sequence[str | os.PathLike]) -> Sequence[torch.Tensor | None]:
    """The image files at ``paths`` as ``vggnet eval`` reads them: uint8 RGB, decoded on access; an unreadable file
    reads as ``None`` (logged)."""
    from vggnet.evaluate import FolderImages

    return FolderImages([str(p) for p in paths])


def calibration_batch(paths: Sequence[str | os.PathLike], n: int, preprocess: Preprocess) -> torch.Tensor:
    """``n`` of ``paths`` spread evenly, read as ``vggnet eval`` reads them and preprocessed: what a calibrated
    runtime (``int8``, ``onnx-int8``, ``auto``) is built on. Every chosen file must be readable: these are images
    the user named for this purpose, so a bad one is an error naming it, not a silent gap."""
    from vggnet.data import IMAGE_ERRORS, read_image

    images = []
    for path in evenly_spaced(list(paths), n):
        try:
            images.append(read_image(path))
        except IMAGE_ERRORS as exc:
            raise CalibrationError(f"calibration image {path}: unreadable ({type(exc).__name__}: {exc})") from exc
    return preprocess(images)


@dataclass
class Int8Images:
    """What an INT8 export is calibrated on and checked against, and where each came from."""

    calib: torch.Tensor
    held: torch.Tensor
    #: recorded in the file: source ("recipe" or "folder"), path, dataset and split (recipe), images, unreadable
    calibration: dict[str, Any]
    #: recorded in the export report: source, path, split ("val", "train" or "rest"), images, description
    check: dict[str, Any]


def _decode(images: Sequence[Any], indices: Sequence[int],
            preprocess: Preprocess) -> tuple[torch.Tensor | None, int]:
    """The chosen images preprocessed, and how many could not be read: skipped, not fatal."""
    good = [image for image in (images[i] for i in indices) if image is not None]
    return (preprocess(good) if good else None), len(indices) - len(good)


def _run_split(ckpt: Path, classes: Sequence[str] | None, split: str) -> tuple[Sequence[Any], Path, str]:
    """A split of the data the run at ``ckpt`` was trained on, rebuilt from its ``recipe.yaml`` as ``vggnet eval``
    does (same val fraction and seed), with the recipe file and the dataset's name."""
    import yaml

    from vggnet.evaluate import eval_images, find_recipe

    recipe = find_recipe(ckpt)
    if recipe is None:
        raise CalibrationError(f"{ckpt}: no recipe.yaml beside the checkpoint, so its training images are unknown; "
                               "pass --calib-data PATH (a folder of training images) to calibrate the INT8 model")
    data = (yaml.safe_load(recipe.read_text()) or {}).get("data") or {}
    images, _, _ = eval_images(ckpt, split=split, classes=None if classes is None else list(classes))
    return images, recipe, str(data.get("dataset", "folder"))


def _held_out(ckpt: Path, classes: Sequence[str] | None, train: Sequence[Any], chosen: list[int],
              calibration: dict[str, Any], where: str, check_images: int,
              preprocess: Preprocess) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The run's validation images when it has readable ones, else the training images not calibrated on."""
    try:
        val, recipe, _ = _run_split(ckpt, classes, "val")
        if len(val):
            held, _ = _decode(val, evenly_spaced(range(len(val)), check_images), preprocess)
            if held is not None:
                return held, {"source": "recipe", "path": str(recipe), "split": "val",
                              "description": f"validation images of {recipe}"}
    except (ValueError, OSError) as exc:  # no recipe, no val split, data not on this machine
        log.info("int8 export: the run's validation images are not available (%s); checking on leftovers", exc)
    used = set(chosen)
    left = [i for i in range(len(train)) if i not in used]
    held = _decode(train, evenly_spaced(left, check_images), preprocess)[0] if left else None
    return held, {"source": calibration["source"], "path": calibration["path"],
                  "split": "train" if calibration["source"] == "recipe" else "rest",
                  "description": f"images of {where} not used for calibration"}


def int8_images(ckpt: str | os.PathLike, preprocess: Preprocess, classes: Sequence[str] | None = None, *,
                calib_paths: Sequence[Path] | None = None, calib_source: str | os.PathLike | None = None,
                calib_images: int = CALIB_IMAGES, check_images: int = CHECK_IMAGES) -> Int8Images:
    """Calibration and check images for an INT8 export of the checkpoint ``ckpt``.

    Calibration uses ``calib_images`` images spread evenly over the run's own training split (from its
    ``recipe.yaml``), or over ``calib_paths`` (the files of ``calib_source``, a folder, glob or file) when given;
    never the validation split the run reports on. The check uses that validation split when there is one (an
    agreement with fp32 is not an accuracy figure, so nothing leaks), else the images left over after calibration:
    ``check_images`` at most, at least ``min(check_images, MIN_CHECK_IMAGES)``. Everything is read here, before a
    slow export, so bad data fails in seconds, naming the path.
    """
    check_counts(calib_images, check_images)
    ckpt = Path(ckpt)
    if calib_paths is not None:
        train: Sequence[Any] = read_images(calib_paths)
        calibration: dict[str, Any] = {"source": "folder", "path": str(calib_source)}
        where = str(calib_source)
    else:
        train, recipe, dataset = _run_split(ckpt, classes, "train")
        calibration = {"source": "recipe", "path": str(recipe), "dataset": dataset, "split": "train"}
        where = f"the training split of {recipe} ({dataset})"
    chosen = evenly_spaced(range(len(train)), calib_images)
    calib, unreadable = _decode(train, chosen, preprocess)
    if calib is None:
        raise CalibrationError(f"calibration data {where}: none of the {len(chosen)} images tried could be read")
    calibration.update(images=len(calib), unreadable=unreadable)
    held, check = _held_out(ckpt, classes, train, chosen, calibration, where, check_images, preprocess)
    needed = min(check_images, MIN_CHECK_IMAGES)
    if held is None or len(held) < needed:
        raise CalibrationError(
            f"only {0 if held is None else len(held)} held-out images to check the INT8 model against fp32 (at "
            f"least {needed} needed) and the run has no readable validation split: give --calib-data a folder with "
            f"more than --calib-images ({calib_images}) images, or lower --check-images")
    check["images"] = len(held)
    return Int8Images(calib, held, calibration, check)
