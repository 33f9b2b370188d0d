"""What an evaluation reads: checkpoints (one, or several for an ensemble) and the images to test on.

``load_models`` accepts run folders (``best.safetensors``, else ``last.safetensors``) or checkpoint files
and refuses ensembles whose members disagree on classes or preprocessing. ``eval_images`` rebuilds the
validation split a run was trained with, from the run's ``recipe.yaml`` (same ``data.val_fraction`` and
``data.split_seed`` through :func:`vggnet.data.load_image_folder`, or the embedded digits), and returns
the images at their original resolution: the protocols do their own rescaling.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vggnet.data import IMAGE_ERRORS, DataError, digits_tensors, download_builtin, load_image_folder, read_image
from vggnet.errors import UsageError
from vggnet.models import VGG, checkpoint_file, checkpoint_meta, load_checkpoint

__all__ = ["FolderImages", "checkpoint_file", "eval_images", "find_recipe", "load_models"]

log = logging.getLogger(__name__)
PathLike = str | os.PathLike
# The recipe defaults (vggnet.engine.recipe.DEFAULTS), for runs whose folder holds no recipe.yaml.
_DEFAULT_SPLIT = {"val_fraction": 0.1, "split_seed": 0}
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list) and a and isinstance(a[0], float):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
                                        for x, y in zip(a, b, strict=True))
    return a == b


def load_models(paths: PathLike | Sequence[PathLike]) -> tuple[list[VGG], dict[str, Any]]:
    """Models (eval mode) and their shared metadata: ``classes`` (None if not recorded), ``mean``, ``std``,
    ``image_size`` (the training crop), ``test_scale`` (the first member's validation view) and ``test_scales``
    (every member's), plus ``checkpoints`` (files) and ``models`` (architecture names).

    Several paths make an ensemble; members must agree on classes, normalisation and crop size.
    """
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise UsageError("no checkpoint given")
    models, files, metas = [], [], []
    for given in paths:
        file = checkpoint_file(given)
        model, extra = load_checkpoint(file)
        metas.append(checkpoint_meta(file, model, extra))
        models.append(model)
        files.append(file)
    first = metas[0]
    for file, meta in zip(files[1:], metas[1:], strict=True):
        for key in ("classes", "num_classes", "in_channels", "mean", "std", "image_size"):
            if not _same(first[key], meta[key]):
                raise UsageError(f"cannot ensemble {files[0]} and {file}: their {key} differ "
                                 f"({_short(first[key])} vs {_short(meta[key])})")
    info = {key: first[key] for key in ("classes", "mean", "std", "image_size", "num_classes", "test_scale")}
    info["test_scales"] = [meta["test_scale"] for meta in metas]  # members may have been validated at other views
    return models, {**info, "checkpoints": [str(f) for f in files], "models": [m.config.name for m in models]}


def _short(value: Any, n: int = 6) -> str:
    if isinstance(value, list) and len(value) > n:
        return f"[{', '.join(map(repr, value[:n]))}, ... ({len(value)} in all)]"
    return repr(value)


def find_recipe(path: PathLike) -> Path | None:
    """The ``recipe.yaml`` of the run a checkpoint path belongs to (the folder, or up to two levels above
    a file: ``RUN/best.safetensors``, ``RUN/checkpoints/epoch-NNNN/...``)."""
    path = Path(path)
    folders = [path] if path.is_dir() else list(path.parents)[:3]
    return next((f / "recipe.yaml" for f in folders if (f / "recipe.yaml").is_file()), None)


class FolderImages(Sequence):
    """Images of an ImageFolder split read on demand as uint8 3×H×W; an unreadable file gives ``None``."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return FolderImages(self.paths[index])
        path = self.paths[index]
        try:
            return read_image(path)
        except IMAGE_ERRORS as exc:  # the image is left out and counted as skipped
            log.warning("skipping unreadable image %s (%s)", path, exc)
            return None


def _read_recipe(file: Path) -> dict[str, Any]:
    """A run's saved recipe; one edited into something else is the user's to fix, not a traceback."""
    try:
        recipe = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{file}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(recipe, dict) or not isinstance(recipe.get("data") or {}, dict):
        raise UsageError(f"{file}: expected a mapping with a `data` section, as `vggnet train` writes")
    return recipe


def eval_images(run: PathLike | None, data: PathLike | None = None, split: str = "val", *,
                classes: Sequence[str] | None = None,
                limit: int | None = None) -> tuple[Sequence[Any], list[int], list[str]]:
    """(images, labels, class names) of a run's ``split`` (``val`` or ``train``).

    ``run`` is a run folder or checkpoint path whose ``recipe.yaml`` gives ``data.val_fraction`` and
    ``data.split_seed``, so an ImageFolder ``data`` tree without ``val/`` is split exactly as in training;
    with no ``data`` the recipe's own dataset is used (the embedded digits, or its ``data.path``).
    ``classes`` (the checkpoint's) must equal the data's class names. ``limit`` keeps that many images
    evenly spread over the split (deterministic, every class represented when sorted by class).
    """
    if split not in ("val", "train"):
        raise UsageError(f"split must be 'val' or 'train', got {split!r}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    recipe_file = find_recipe(run) if run is not None else None
    recipe = _read_recipe(recipe_file) if recipe_file else {}
    d = {**_DEFAULT_SPLIT, **(recipe.get("data") or {})}
    val_fraction, seed = float(d["val_fraction"]), int(d["split_seed"])
    kind = d.get("dataset", "folder")
    images: Sequence[Any]
    if data is None and kind == "digits":
        x, y = digits_tensors(split, size=int(d.get("image_size", 32)), channels=3, val_fraction=val_fraction,
                              seed=seed)
        images, labels, found, where = x, y.tolist(), [str(i) for i in range(10)], "the embedded digits"
    else:
        root = data if data is not None else d.get("path")
        if kind in ("cifar10", "fashion_mnist") and data is None:
            root = download_builtin(kind, Path(root or "data"), download=False)
        if not root:
            where = f"{run} has no recipe.yaml" if recipe_file is None else f"{recipe_file} names no data.path"
            raise UsageError(f"{where}; pass --data PATH (an ImageFolder tree: one folder per class)")
        train, val, found = load_image_folder(root, val_fraction=val_fraction, seed=seed)
        chosen = val if split == "val" else train
        if chosen is None or not len(chosen):
            raise DataError(f"{root}: no validation images (data.val_fraction={val_fraction}); "
                             "use --split train or a tree with train/ and val/ folders")
        images, labels, where = FolderImages([p for p, _ in chosen.samples]), list(chosen.targets), str(root)
    if classes is not None and list(classes) != list(found):
        raise UsageError(f"the checkpoint's classes {_short(list(classes))} differ from those of {where} "
                         f"{_short(list(found))}; evaluate on the data the model was trained for")
    if limit is not None and limit < len(labels):
        keep = np.unique(np.linspace(0, len(labels) - 1, limit).round().astype(np.int64))
        labels = [labels[i] for i in keep]
        if isinstance(images, torch.Tensor):
            images = images[torch.from_numpy(keep)]
        else:
            images = FolderImages([images.paths[i] for i in keep])  # type: ignore[attr-defined]
    return images, labels, list(found)
