"""The images an INT8 model is calibrated on, and the held-out ones it is checked against.

Images are read by ``vggnet eval``'s reader (:class:`vggnet.evaluate.FolderImages`, i.e. ``vggnet.data.read_image``),
and a run's own splits are rebuilt exactly as ``vggnet eval`` rebuilds them, so an image ``eval`` (and training)
accepts is never skipped in calibration, and is decoded to the same pixels. ``vggnet.evaluate`` is imported when
images are read, not with this module: loading or serving an exported file never pays for it.

Where calibration images come from is one rule for every INT8 path (``vggnet predict`` / ``vggnet serve`` with
``int8``, ``onnx-int8`` or ``auto``, and ``vggnet export --format onnx-int8|pt2-int8``), decided by
:func:`calibration_source` alone: ``--calib-data PATH`` when given, else the training split of the run the checkpoint
belongs to (its ``recipe.yaml``: the embedded digits of the demo, an ImageFolder tree...), else a one-line error
saying what to pass. The validation split is never calibrated on.

Preprocessing and the expansion of a ``--calib-data`` folder, glob or file belong to :mod:`vggnet.infer`, above
this package, so callers pass them in: ``preprocess`` (a list of uint8 C×H×W images → the normalised N×C×H×W batch
the model takes) and ``calib_paths`` (the files found).
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

__all__ = ["CALIB_HINT", "CALIB_IMAGES", "CHECK_IMAGES", "MIN_CHECK_IMAGES", "CalibrationError", "CalibrationSource",
           "Int8Images", "calibration_batch", "calibration_set", "calibration_source", "check_counts", "describe",
           "evenly_spaced", "int8_images", "read_images"]

log = logging.getLogger(__name__)

# MinMax ranges settle well before 256 images; more only costs time. The held-out images the result is compared
# with eager on, and the fewest of those a check may rest on (unless fewer are asked for).
CALIB_IMAGES = 256
CHECK_IMAGES = 256
MIN_CHECK_IMAGES = 64
# What the one-line error of a checkpoint with neither --calib-data nor a run folder tells the user to pass.
CALIB_HINT = "pass --calib-data PATH (a folder, glob or file of training images)"

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


def describe(calibration: dict[str, Any]) -> str:
    """Where calibration images came from, in words, from the record an INT8 file keeps
    (:meth:`CalibrationSource.record`): what ``predict``, ``serve`` and ``export`` print."""
    if calibration.get("source") == "recipe":
        return f"the training split of {calibration['path']} ({calibration.get('dataset', 'folder')})"
    return str(calibration["path"])


@dataclass(frozen=True)
class CalibrationSource:
    """Where an INT8 model's calibration images come from, as :func:`calibration_source` decided it."""

    #: "folder" (``--calib-data``) or "recipe" (the run's own training split)
    source: str
    #: the ``--calib-data`` PATH as given, or the run's ``recipe.yaml``
    path: str
    #: the checkpoint being calibrated (its run's splits are rebuilt from it); None for ``--calib-data`` alone
    ckpt: Path | None = None
    #: folder: the image files of ``path``
    files: tuple[Path, ...] = ()
    #: recipe: the dataset the recipe names ("digits", "folder", "cifar10", ...)
    dataset: str = "folder"
    #: what an error tells the user to pass instead
    hint: str = CALIB_HINT

    def record(self) -> dict[str, Any]:
        """What an INT8 file records of its calibration (before the image counts are added)."""
        if self.source == "folder":
            return {"source": "folder", "path": self.path}
        return {"source": "recipe", "path": self.path, "dataset": self.dataset, "split": "train"}

    @property
    def description(self) -> str:
        return describe(self.record())

    def images(self, classes: Sequence[str] | None = None) -> Sequence[torch.Tensor | None]:
        """Every candidate image, decoded on access; an unreadable one reads as ``None``. A run's training split
        that cannot be rebuilt here (data not on this machine, other classes) is an error saying what to pass."""
        if self.source == "folder":
            return read_images(self.files)
        try:
            return _run_split(Path(self.ckpt or self.path), classes, "train")[0]
        except (ValueError, OSError) as exc:  # UsageError / DataError, or data not on this machine
            raise CalibrationError(f"calibration images: {self.description} cannot be read here "
                                   f"({' '.join(str(exc).split())}); {self.hint}") from exc


def _recipe_dataset(recipe: Path) -> str:
    """The dataset a run's recipe names; "folder" when it names none (a broken recipe fails when it is read)."""
    import yaml

    try:
        loaded = yaml.safe_load(recipe.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return "folder"
    data = loaded.get("data") if isinstance(loaded, dict) else None
    return str(data.get("dataset", "folder")) if isinstance(data, dict) else "folder"


def calibration_source(ckpt: str | os.PathLike | None, calib_paths: Sequence[Path] | None = None,
                       calib_source: str | os.PathLike | None = None, *, needed_by: str = "INT8 calibration",
                       hint: str = CALIB_HINT) -> CalibrationSource:
    """The one rule for the calibration images of every INT8 path: ``calib_paths`` (the files of ``--calib-data``
    ``calib_source``) when given, else the training split of the run ``ckpt`` belongs to (its ``recipe.yaml``, as
    ``vggnet eval`` finds it), else a :class:`CalibrationError` of one line: ``needed_by`` needs calibration
    images, ``hint``. Nothing is read but the recipe, so a bad call fails before any slow work."""
    if calib_paths is not None:
        where = str(calib_source) if calib_source is not None else "the given files"
        return CalibrationSource("folder", where, None if ckpt is None else Path(ckpt), tuple(calib_paths), hint=hint)
    if ckpt is None:
        raise CalibrationError(f"{needed_by} needs calibration images: {hint}")
    from vggnet.evaluate import find_recipe

    recipe = find_recipe(ckpt)
    if recipe is None:
        raise CalibrationError(f"{needed_by} needs calibration images: {ckpt} has no recipe.yaml beside it (not in "
                               f"a run folder), so the training split of its run is unknown; {hint}")
    return CalibrationSource("recipe", str(recipe), Path(ckpt), dataset=_recipe_dataset(recipe), hint=hint)


def calibration_set(source: CalibrationSource, n: int, preprocess: Preprocess,
                    classes: Sequence[str] | None = None) -> torch.Tensor:
    """``n`` images of ``source`` spread evenly and preprocessed: the batch a calibrated runtime (``int8``,
    ``onnx-int8``, ``auto``) is built on. Files the user named (``--calib-data``) must all be readable
    (:func:`calibration_batch`); the run's own training split is read as ``vggnet eval`` reads it, and an image
    it skips is skipped here too."""
    if n < 1:
        raise UsageError(f"the number of calibration images must be at least 1, got {n}")
    if source.source == "folder":
        return calibration_batch(source.files, n, preprocess)
    images = source.images(classes)
    chosen = evenly_spaced(range(len(images)), n)
    batch, _ = _decode(images, chosen, preprocess)
    if batch is None:
        raise CalibrationError(f"calibration data {source.description}: none of the {len(chosen)} images tried "
                               "could be read")
    return batch


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


def _run_split(ckpt: Path, classes: Sequence[str] | None, split: str) -> tuple[Sequence[Any], Path]:
    """A split of the data the run at ``ckpt`` was trained on, rebuilt from its ``recipe.yaml`` as ``vggnet eval``
    does (same val fraction and seed), with the recipe file."""
    from vggnet.evaluate import eval_images, find_recipe

    recipe = find_recipe(ckpt)
    if recipe is None:
        raise CalibrationError(f"{ckpt}: no recipe.yaml beside the checkpoint, so the splits of its run are unknown")
    images, _, _ = eval_images(ckpt, split=split, classes=None if classes is None else list(classes))
    return images, recipe


def _held_out(ckpt: Path, classes: Sequence[str] | None, train: Sequence[Any], chosen: list[int],
              calibration: dict[str, Any], where: str, check_images: int,
              preprocess: Preprocess) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The run's validation images when it has readable ones, else the training images not calibrated on."""
    try:
        val, recipe = _run_split(ckpt, classes, "val")
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

    Calibration uses ``calib_images`` images spread evenly over what :func:`calibration_source` picks: the run's
    own training split (from its ``recipe.yaml``), or ``calib_paths`` (the files of ``calib_source``, a folder,
    glob or file) when given; never the validation split the run reports on. The check uses that validation split
    when there is one (an agreement with fp32 is not an accuracy figure, so nothing leaks), else the images left
    over after calibration: ``check_images`` at most, at least ``min(check_images, MIN_CHECK_IMAGES)``. Everything
    is read here, before a slow export, so bad data fails in seconds, naming the path.
    """
    check_counts(calib_images, check_images)
    ckpt = Path(ckpt)
    source = calibration_source(ckpt, calib_paths, calib_source, needed_by="an INT8 export")
    train = source.images(classes)
    calibration = source.record()
    where = source.description
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
