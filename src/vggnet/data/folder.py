"""ImageFolder trees (one sub-folder per class) as train/val datasets that survive bad files.

File scanning is torchvision's ``make_dataset``; what is added here is what a training run needs
on real, messy folders: a fixed-seed stratified split when the tree has no ``val/``, errors that
say which path is wrong and how to fix it, folders starting with ``.`` ignored (our decode cache
lives in one), and corrupt images skipped and counted instead of killing an epoch hours in.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from vggnet.errors import VggnetError

from .split import stratified_split

log = logging.getLogger(__name__)
Sample = tuple[str, int]
# What PIL raises for a file that is not a decodable image (truncated, bad header or chunk, decompression bomb);
# anything else raised while reading one is a bug and keeps its traceback.
IMAGE_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, ValueError, EOFError, struct.error,
                                             Image.DecompressionBombError)


class DataError(VggnetError, ValueError):
    """A data path that cannot be used as given; the message names the path and what to do."""


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 RGB (3, H, W) via PIL (torchvision.io decoding is deprecated in 0.29 and warns per call)."""
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


def find_classes(root: Path) -> list[str]:
    """Class folder names, sorted; hidden folders (``.vggnet-cache``) are not classes."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(root: str | Path,
                      classes: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """(path, label) for every image under ``root/<class>/``, checked so mistakes surface before training."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass a folder holding one sub-folder of images per class "
                        "(for an archive, run `vggnet data prepare ARCHIVE --out DIR` first)")
    classes = list(classes) if classes is not None else find_classes(root)
    if not classes:
        raise DataError(f"{root}: no class sub-folders; put each class's images in its own folder, "
                        f"e.g. {root / 'cat' / '0001.jpg'}")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = Counter(label for _, label in samples)
    empty = [name for name, i in class_to_idx.items() if counts[i] == 0]
    if empty:
        raise DataError(f"{root}: class folder(s) {', '.join(empty)} hold no images "
                        f"({' '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)")
    return samples, classes


class ImageFolderDataset(Dataset):
    """(image, label) pairs; an unreadable file yields ``None`` (dropped by :func:`collate_skip_none`).

    Train and val are separate objects so each can get its own ``transform``. ``skipped_files`` is
    per process: with DataLoader workers each worker counts its own, and each logs a warning once per file.
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str],
                 transform: Callable[[Any], Any] | None = None) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.skipped_files: set[str] = set()

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        try:
            image = tv_tensors.Image(read_image(path))
        except IMAGE_ERRORS as exc:
            if path not in self.skipped_files:
                self.skipped_files.add(path)
                log.warning("skipping unreadable image %s (%s)", path, exc)
            return None
        return (self.transform(image) if self.transform else image), label


def collate_skip_none(batch: list[Any]) -> Any:
    """``default_collate`` minus the ``None`` of skipped files; a batch of only bad files gives ``None``."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


def load_image_folder(root: str | Path, val_fraction: float = 0.1,
                      seed: int = 0) -> tuple[ImageFolderDataset, ImageFolderDataset | None, list[str]]:
    """(train, val, classes) from ``root``; val is ``None`` when there is no validation data.

    ``root/train`` + ``root/val`` (or ``root/validation``) are used as given; otherwise the class
    folders of ``root`` (or of ``root/train`` when that is all there is, as in the CIFAR-10 archive)
    are split per class with a fixed seed, so every run holds out the same images.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such path; pass a folder holding one sub-folder of images per class "
                        "(for an archive, run `vggnet data prepare ARCHIVE --out DIR` first)")
    train_dir = root / "train"
    val_dir = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    if train_dir.is_dir() and val_dir is not None:
        train_samples, classes = scan_image_folder(train_dir)
        val_classes = find_classes(val_dir)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise DataError(f"{train_dir} and {val_dir} have different class folders (only in train: "
                            f"{only_train}, only in val: {only_val}); both splits need the same classes")
        val_samples, _ = scan_image_folder(val_dir, classes)
        return ImageFolderDataset(train_samples, classes), ImageFolderDataset(val_samples, classes), classes
    samples, classes = scan_image_folder(train_dir if train_dir.is_dir() else root)
    train_idx, val_idx = stratified_split([label for _, label in samples], val_fraction, seed)
    train = ImageFolderDataset([samples[i] for i in train_idx], classes)
    val = ImageFolderDataset([samples[i] for i in val_idx], classes) if val_idx else None
    return train, val, classes
