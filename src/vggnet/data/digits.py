"""The embedded default dataset: scikit-learn's 1,797 handwritten 8x8 digits.

It ships inside scikit-learn, so the demo trains on real images with no download and no data
folder. The digits are upscaled once (bilinear) to a size a VGG can take (five 2x2 poolings need
at least 32 px) and optionally replicated to three channels so ImageNet-shaped models accept them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors

from vggnet.errors import UsageError

from .split import stratified_split

Split = Literal["train", "val", "all"]
CLASSES = [str(i) for i in range(10)]


@lru_cache(maxsize=8)
def _upscaled(size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 N x C x size x size; cached because every split and epoch reuses them."""
    from sklearn.datasets import load_digits  # imported late: sklearn costs ~1 s and only digits needs it

    if channels not in (1, 3):
        raise UsageError(f"channels must be 1 or 3, got {channels}")
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)  # 0..16 -> 0..255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1).contiguous()
    return x, torch.from_numpy(digits.target).long()


def _split_indices(split: Split, targets: torch.Tensor, val_fraction: float, seed: int) -> list[int]:
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if split == "all":
        return list(range(len(targets)))
    train, val = stratified_split(targets.tolist(), val_fraction, seed)
    return train if split == "train" else val


def digits_tensors(split: Split = "train", size: int = 32, channels: int = 3, val_fraction: float = 0.2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as (uint8 N x C x H x W images, int64 labels), ready for :class:`TensorLoader`."""
    x, y = _upscaled(size, channels)
    idx = torch.tensor(_split_indices(split, y, val_fraction, seed), dtype=torch.long)
    return x[idx], y[idx]  # indexing copies, so callers cannot corrupt the cache


class DigitsDataset(Dataset):
    """Per-sample view of the digits for the streaming path and torchvision v2 transforms."""

    classes = CLASSES

    def __init__(self, split: Split = "train", size: int = 32, channels: int = 3, val_fraction: float = 0.2,
                 seed: int = 0, transform: Callable[[Any], Any] | None = None) -> None:
        self.images, labels = digits_tensors(split, size, channels, val_fraction, seed)
        self.targets: list[int] = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = tv_tensors.Image(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]
