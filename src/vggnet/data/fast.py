"""Batched in-memory loading for tiny images: the whole epoch's augmentation is a few tensor ops.

On two CPU cores, per-image transforms in worker processes cost more than a small VGG's step and
steal the cores the model needs. Here the uint8 images sit in one N x H x W x C tensor; each batch
is one gather (random crop with reflect padding and the flip folded into the gather's indices),
one float conversion with normalisation, and an optional cutout mask. The order depends only on
(seed, epoch), like ``DistributedSampler``, so resumed and multi-process runs see the same data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from .transforms import IMAGENET_MEAN, IMAGENET_STD


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from several ints without collisions like seed + epoch would have."""
    state = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


class TensorLoader:
    """Iterates (float images B x C x H x W, int64 labels) batches of an in-memory uint8 dataset.

    With ``world_size > 1`` every rank permutes with the same (seed, epoch) and takes a disjoint
    strided shard: equal sizes when ``drop_last`` (training, so every rank runs the same number of
    steps), otherwise every image exactly once across ranks (evaluation, so metrics are exact).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0, augment: Literal["none", "flip_crop"] = "none",
                 pad: int = 4, flip: bool = True, cutout: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, device: str | torch.device = "cpu",
                 channels_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise ValueError(f"need uint8 images N x C x H x W and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        if augment not in ("none", "flip_crop"):
            raise ValueError(f"augment must be 'none' or 'flip_crop', got {augment!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        _, c, h, w = images.shape
        if augment == "flip_crop" and not 0 <= pad < min(h, w):
            raise ValueError(f"pad must be in [0, {min(h, w)}) to reflect-pad {h}x{w} images, got {pad}")
        self.device = torch.device(device)
        self.images = images.permute(0, 2, 3, 1).contiguous().to(self.device)  # NHWC: one gather per pixel
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.augment, self.pad, self.flip, self.cutout = augment, pad, flip, cutout
        self.channels_last, self.rank, self.world_size = channels_last, rank, world_size
        mean_t = torch.tensor(mean, dtype=torch.float32).expand(c)
        std_t = torch.tensor(std, dtype=torch.float32).expand(c)
        self.scale = (1.0 / (255.0 * std_t)).view(c, 1, 1).to(self.device)  # (x / 255 - mean) / std
        self.shift = (mean_t / std_t).view(c, 1, 1).to(self.device)  # ... as x * scale - shift
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])

    def epoch_indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        n = len(self.labels)
        order = torch.arange(n)
        if self.shuffle:  # the same permutation on every rank: shards are disjoint slices of it
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch))
        if self.drop_last:
            order = order[: n // self.world_size * self.world_size]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        total = len(self.labels)
        n = total // self.world_size if self.drop_last else len(range(self.rank, total, self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_indices()
        stop = len(self) * self.batch_size
        rng = _generator(self.seed, self.epoch, self.rank, 1)
        for start in range(0, min(stop, len(order)), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self._batch(idx, rng), self.labels[idx.to(self.device)]

    def _batch(self, idx: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        n, h, w, c = self.images.shape
        b = len(idx)
        if self.augment == "flip_crop":
            rows = torch.arange(h) + torch.randint(-self.pad, self.pad + 1, (b, 1), generator=rng)
            cols = torch.arange(w) + torch.randint(-self.pad, self.pad + 1, (b, 1), generator=rng)
            rows = torch.where(rows >= h, 2 * (h - 1) - rows, rows.abs())  # reflect padding via indices
            cols = torch.where(cols >= w, 2 * (w - 1) - cols, cols.abs())
            if self.flip:
                cols = torch.where(torch.rand(b, 1, generator=rng) < 0.5, w - 1 - cols, cols)
            pixel = (idx.view(b, 1, 1) * h + rows.view(b, h, 1)) * w + cols.view(b, 1, w)
            pixel = pixel.view(-1).to(self.device)
            x = self.images.view(n * h * w, c).index_select(0, pixel).view(b, h, w, c)
        else:
            x = self.images.index_select(0, idx.to(self.device))
        x = x.permute(0, 3, 1, 2)  # NCHW shape over NHWC memory, i.e. channels_last, without a copy
        if not self.channels_last:
            x = x.contiguous()  # change layout while still uint8: a quarter of the bytes of a float copy
        x = x.float().mul_(self.scale).sub_(self.shift)  # .float() keeps the memory layout
        if self.augment == "flip_crop" and self.cutout:
            top = torch.randint(0, h, (b, 1), generator=rng) - self.cutout // 2  # centre anywhere, clipped
            left = torch.randint(0, w, (b, 1), generator=rng) - self.cutout // 2
            r, q = torch.arange(h), torch.arange(w)
            inside_r = ((r >= top) & (r < top + self.cutout)).view(b, 1, h, 1)
            mask = inside_r & ((q >= left) & (q < left + self.cutout)).view(b, 1, 1, w)
            x.masked_fill_(mask.to(self.device), 0.0)
        return x
