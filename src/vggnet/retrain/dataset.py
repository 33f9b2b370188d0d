"""Step 3: the fine-tuning data as one ImageFolder tree, ``train/`` and ``val/``, of links to the images.

Why a tree with an explicit ``val/``: the engine then validates on exactly those images and trains on exactly the
others, with no split of its own to get wrong. ``val/`` is the champion's own validation split, rebuilt from its
run's ``recipe.yaml`` (``data.val_fraction`` and ``data.split_seed`` through the same
:func:`vggnet.data.load_image_folder` training used), so the gate compares both models on the images the champion
was validated on and the new model never trains on one of them (checked: no file is on both sides).
``train/`` is the champion's training split plus the reviewed training part, each reviewed image linked
``weight`` times: repetition rather than a weighted sampler, because the engine's two data paths (in memory and
streamed) and its exact resume then need nothing new, and each copy gets its own augmentation.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vggnet.atomic import atomic_dir
from vggnet.data import load_image_folder
from vggnet.errors import UsageError

__all__ = ["build_training_folder", "champion_recipe", "original_split"]

Sample = tuple[str, int]


def champion_recipe(run: Path | None) -> dict[str, Any]:
    """The champion run's ``recipe.yaml`` as a mapping; without it the split it was validated on is unknown."""
    file = None if run is None else Path(run) / "recipe.yaml"
    if file is None or not file.is_file():
        raise UsageError(f"the champion's run folder {run} has no recipe.yaml: its validation split cannot be "
                         "rebuilt, so the gate would not know which images it was validated on")
    recipe = yaml.safe_load(file.read_text()) or {}
    if not isinstance(recipe, dict) or not isinstance(recipe.get("data"), dict):
        raise UsageError(f"{file}: expected a mapping with a `data` section, as `vggnet train` writes")
    return recipe


def original_split(recipe: dict[str, Any], data: Path, classes: Sequence[str]) -> tuple[list[Sample], list[Sample]]:
    """(train, val) samples of ``data`` exactly as the champion's training split them."""
    d = recipe["data"]
    if d.get("dataset", "folder") == "digits":
        raise UsageError("the champion was trained on the embedded digits (data.dataset: digits), whose split "
                         "cannot be rebuilt from a folder: train it with --data FOLDER to retrain it")
    fraction = d.get("val_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise UsageError(f"the champion's recipe.yaml has data.val_fraction={fraction!r}, not the number its run "
                         "resolved: its validation split cannot be rebuilt")
    train, val, found = load_image_folder(data, val_fraction=float(fraction), seed=int(d.get("split_seed", 0)))
    if val is None or not len(val):
        raise UsageError(f"the champion was trained without a validation split (data.val_fraction={fraction} and "
                         f"no val/ folder in {data}): the gate needs the images it was validated on; train the "
                         "champion with a validation split (e.g. --set data.val_fraction=0.1)")
    if list(found) != list(classes):
        raise UsageError(f"{data} has classes {list(found)}, the champion {list(classes)}: pass the data it was "
                         "trained on")
    return list(train.samples), list(val.samples)


def _link(target: Path, link: Path) -> None:
    """A symbolic link (no copy of a large dataset); a copy where the file system has no links."""
    try:
        os.symlink(target, link)
    except OSError:
        shutil.copyfile(target, link)


def build_training_folder(out: Path, classes: Sequence[str], train: list[Sample], val: list[Sample],
                          reviewed: Path, reviewed_train: list[dict[str, Any]], weight: int) -> dict[str, Any]:
    """Write ``out/train`` and ``out/val`` (whole or not at all); returns the counts and the val files."""
    if weight < 1:
        raise UsageError(f"--reviewed-weight must be a whole number >= 1, got {weight}")
    val_real = {os.path.realpath(p) for p, _ in val}
    shared = [p for p, _ in train if os.path.realpath(p) in val_real]
    if shared:
        raise UsageError(f"{len(shared)} images are in both the training and the validation split of the original "
                         f"data (e.g. {shared[0]}): the gate's validation images must never be trained on")
    with atomic_dir(out) as tmp:
        for part in ("train", "val"):
            for name in classes:
                (tmp / part / name).mkdir(parents=True)
        val_files = []
        for part, samples in (("train", train), ("val", val)):
            for i, (path, label) in enumerate(samples):
                link = tmp / part / classes[label] / f"{i:07d}-{Path(path).name}"
                _link(Path(path).resolve(), link)
                if part == "val":
                    val_files.append((link.relative_to(tmp).as_posix(), label))
        for sample in reviewed_train:
            source = reviewed / sample["file"]
            if os.path.realpath(source) in val_real:
                raise UsageError(f"reviewed sample {source} is one of the validation images")
            for k in range(weight):
                link = tmp / "train" / sample["label"] / f"reviewed-{sample['sha256'][:16]}-{k}.png"
                _link(Path(os.path.relpath(source.resolve(), link.parent.resolve())), link)
    return {"original_train": len(train), "original_val": len(val), "reviewed_train": len(reviewed_train),
            "reviewed_weight": weight, "train_images": len(train) + weight * len(reviewed_train),
            "val_files": val_files}
