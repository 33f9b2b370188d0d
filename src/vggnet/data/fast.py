"""Batched in-memory loading for tiny images: the whole epoch's augmentation is a few tensor ops.

On two CPU cores, per-image transforms in worker processes cost more than a small VGG's step and
steal the cores the model needs. Here the uint8 images sit in one N x H x W x C tensor; each batch
is one gather (random crop with reflect padding and the flip folded into the gather's indices),
one float conversion with normalisation, and an optional cutout mask. The paper's augmentation
(``augment="paper"``: shorter side rescaled to a per-image S, random crop, flip, PCA colour shift)
is one batched ``grid_sample`` whose sampling grid folds the rescale, the crop and the flip together;
``augment="center"`` is the paper's single-scale test view (shorter side to Q, centre crop). The order
depends only on (seed, epoch), like ``DistributedSampler``, so resumed and multi-process runs see the
same data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from vggnet.errors import UsageError

from .transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, IMAGENET_STD, Scale, scale_pixels

AUGMENTS = ("none", "flip_crop", "paper", "center")


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
                 drop_last: bool = False, seed: int = 0,
                 augment: Literal["none", "flip_crop", "paper", "center"] = "none",
                 pad: int = 4, flip: bool | Literal["alternate"] = True, cutout: int = 0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 device: str | torch.device = "cpu",
                 channels_last: bool = False, rank: int = 0, world_size: int = 1,
                 crop: int | None = None, scale: Scale | None = None, lighting: float = 0.0) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise ValueError(f"need uint8 images N x C x H x W and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        if augment not in AUGMENTS:
            raise UsageError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        if flip not in (True, False, "alternate"):
            raise UsageError(f"flip must be true, false or 'alternate', got {flip!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        _, c, h, w = images.shape
        if augment == "flip_crop" and not 0 <= pad < min(h, w):
            raise UsageError(f"pad must be in [0, {min(h, w)}) to reflect-pad {h}x{w} images, got {pad}")
        self.device = torch.device(device)
        self.images = images.permute(0, 2, 3, 1).contiguous().to(self.device)  # NHWC: one gather per pixel
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.augment, self.pad, self.flip, self.cutout = augment, pad, flip, cutout
        self.channels_last, self.rank, self.world_size = channels_last, rank, world_size
        # paper / center: crop side and the range of the rescaled shorter side, in pixels
        self.crop = int(crop or min(h, w))
        smin, smax = scale if isinstance(scale, tuple | list) else (scale or self.crop,) * 2
        self.smin, self.smax = scale_pixels(smin, self.crop), scale_pixels(smax, self.crop)
        if augment in ("paper", "center") and not self.crop <= self.smin <= self.smax:
            raise UsageError(f"need crop <= Smin <= Smax, got crop {self.crop}, S in [{self.smin}, {self.smax}]")
        if lighting and c != 3:
            raise UsageError("PCA lighting needs RGB images")
        self.lighting = float(lighting)
        mean_t = torch.tensor(mean, dtype=torch.float32).expand(c)
        std_t = torch.tensor(std, dtype=torch.float32).expand(c)
        self.scale = (1.0 / (255.0 * std_t)).view(c, 1, 1).to(self.device)  # (x / 255 - mean) / std
        self.inv_std = (1.0 / std_t).to(self.device)
        self.shift = (mean_t / std_t).view(c, 1, 1).to(self.device)  # ... as x * scale - shift
        self.epoch = 0
        # flip="alternate" (airbench): a fixed random half of the images starts mirrored and every image
        # switches each epoch, so no image is seen in the same orientation twice running
        self.first_flip = (torch.rand(len(images), generator=_generator(seed, 2)) < 0.5
                           if flip == "alternate" else None)

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
        if self.augment in ("paper", "center"):
            return self._rescaled(idx, rng)
        n, h, w, c = self.images.shape
        b = len(idx)
        if self.augment == "flip_crop":
            rows = torch.arange(h) + torch.randint(-self.pad, self.pad + 1, (b, 1), generator=rng)
            cols = torch.arange(w) + torch.randint(-self.pad, self.pad + 1, (b, 1), generator=rng)
            rows = torch.where(rows >= h, 2 * (h - 1) - rows, rows.abs())  # reflect padding via indices
            cols = torch.where(cols >= w, 2 * (w - 1) - cols, cols.abs())
            if self.flip:
                cols = torch.where(self._mirrored(idx, rng).view(b, 1), w - 1 - cols, cols)
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

    def _mirrored(self, idx: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Which images of the batch to mirror: at random, or alternating by epoch."""
        if self.flip == "alternate":
            return self.first_flip[idx] ^ (self.epoch % 2 == 0)
        return torch.rand(len(idx), generator=rng) < 0.5

    def _rescaled(self, idx: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Shorter side to S (per image), a crop x crop window, optional flip: one bilinear grid_sample.

        Output pixel (i, j) of a crop at (top, left) in the image rescaled by s = S / min(H, W) reads
        the source at ((top + i + 0.5) / s, (left + j + 0.5) / s), pixel centres at k + 0.5, which is
        ``align_corners=False`` in normalised units. Upscaling (S >= the source side, the usual case
        for tiny images) needs no antialiasing.
        """
        _, h, w, c = self.images.shape
        b, k, train = len(idx), self.crop, self.augment == "paper"
        x = self.images.index_select(0, idx.to(self.device)).permute(0, 3, 1, 2).float()
        if train:
            s = torch.randint(self.smin, self.smax + 1, (b,), generator=rng).float()
        else:
            s = torch.full((b,), float(self.smin))
        factor = s / min(h, w)
        span_h, span_w = (h * factor).floor() - k, (w * factor).floor() - k  # room for the crop's corner
        if train:
            top, left = (torch.rand(b, generator=rng) * (span_h + 1)).floor(), (torch.rand(b, generator=rng)
                                                                               * (span_w + 1)).floor()
        else:
            top, left = (span_h / 2).round(), (span_w / 2).round()
        steps = torch.arange(k, dtype=torch.float32) + 0.5
        cols = (left.view(b, 1) + steps) / factor.view(b, 1)  # source x of each output column
        if train and self.flip:
            cols = torch.where(self._mirrored(idx, rng).view(b, 1), cols.flip(1), cols)
        rows = (top.view(b, 1) + steps) / factor.view(b, 1)
        grid = torch.stack(torch.broadcast_tensors((2 * cols / w - 1).view(b, 1, k), (2 * rows / h - 1).view(b, k, 1)),
                           dim=-1)
        x = F.grid_sample(x, grid.to(self.device), mode="bilinear", padding_mode="border", align_corners=False)
        x = x.mul_(self.scale).sub_(self.shift)
        if train and self.lighting:  # AlexNet's PCA colour shift, in [0, 1] pixel units, per image
            eigvec, eigval = torch.tensor(IMAGENET_EIGVEC), torch.tensor(IMAGENET_EIGVAL)
            alpha = torch.randn(b, 3, generator=rng) * self.lighting
            shift = (alpha * eigval) @ eigvec.T  # row b: eigvec @ (alpha_b * eigval)
            x += (shift.to(self.device) * self.inv_std).view(b, c, 1, 1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
