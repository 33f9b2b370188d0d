"""Turn a recipe's ``data`` section into train/val iterables for the loop.

Two paths: tiny images (digits, CIFAR-10) are decoded once into a uint8 tensor and augmented in
batches on tensors (no worker processes: on two cores, workers would fight the model for them);
anything else streams through an ImageFolder + ``DataLoader`` with the torchvision v2 transforms.
Both expose ``set_epoch``, ``state_dict``/``load_state_dict`` and DDP sharding, so the loop and
resume do not care which one they got.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vggnet import data as vdata
from vggnet.data.transforms import scale_pixels
from vggnet.errors import UsageError

from .distributed import Dist
from .recipe import DataConfig, Recipe


@dataclass
class Inputs:
    train: Any
    val: Any | None
    classes: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    #: the validation view's shorter side in px (the paper's single test scale Q), recorded in checkpoints
    test_scale: int | None = None


class StreamingLoader:
    """A DataLoader over an ImageFolder with the epoch/state interface of the tensor loader."""

    def __init__(self, dataset, batch_size: int, train: bool, seed: int, workers: int | None, env: Dist) -> None:
        self.dataset, self.batch_size, self.train, self.seed, self.env = dataset, batch_size, train, seed, env
        self.epoch = 0
        self.loader = vdata.build_dataloader(dataset, batch_size, train=train, workers=workers, seed=seed,
                                             distributed=env.enabled)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(self.seed * 1000 + epoch)

    def epoch_indices(self) -> torch.Tensor:
        return torch.tensor(list(iter(self.loader.sampler)))

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]))


def _per_rank_batch(batch_size: int, env: Dist) -> int:
    if batch_size % env.world:
        raise UsageError(f"optim.batch_size={batch_size} is not divisible by the {env.world} processes")
    return batch_size // env.world


def build_inputs(recipe: Recipe | Mapping[str, Any], env: Dist) -> Inputs:
    """The run's training and validation loaders (a recipe mapping, as recipe.yaml holds, is checked first)."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.of(recipe)
    d, seed = recipe.data, recipe.train.seed
    batch = _per_rank_batch(recipe.optim.batch_size, env)
    if d.image_size is None or d.mean is None or d.std is None:
        raise UsageError("data.image_size, data.mean and data.std are null: they come from model.weights (--weights)")
    size, mean, std = d.image_size, list(d.mean), list(d.std)
    if d.dataset == "digits":
        train_x, train_y = vdata.digits_tensors("train", size=size, channels=3, val_fraction=d.val_fraction,
                                                seed=d.split_seed)
        val_x, val_y = vdata.digits_tensors("val", size=size, channels=3, val_fraction=d.val_fraction,
                                            seed=d.split_seed)
        classes = [str(i) for i in range(10)]
    else:
        if d.dataset != "folder":
            root = vdata.download_builtin(d.dataset, Path(d.path or "data"), download=d.download)
        elif not d.path:
            raise UsageError("this recipe needs --data PATH (an ImageFolder tree: one folder per class)")
        else:
            root = Path(d.path)
        train_ds, val_ds, classes = vdata.load_image_folder(root, val_fraction=d.val_fraction, seed=d.split_seed)
        in_memory = d.in_memory
        if in_memory == "auto":
            in_memory = size <= 64 and len(train_ds) <= 200_000
        if not in_memory:
            return _streaming(recipe, train_ds, val_ds, classes, batch, env)
        cache = Path(d.cache_dir or root) / ".vggnet-cache"
        train_x, train_y = vdata.decode_subset(train_ds, cache / f"train-{d.split_seed}-{d.val_fraction}.npz",
                                               size=size)
        val_x, val_y = (vdata.decode_subset(val_ds, cache / f"val-{d.split_seed}-{d.val_fraction}.npz", size=size)
                        if val_ds is not None else (None, None))
    common = {"mean": mean, "std": std, "rank": env.rank, "world_size": env.world, "crop": size}
    paper = d.augment == "paper"  # scale jitter + crop + flip + PCA lighting, batched on tensors
    scale = _scale(d, size)
    train = vdata.TensorLoader(train_x, train_y, batch_size=batch, shuffle=True, drop_last=True, seed=seed,
                               augment=d.augment, pad=d.pad, flip=d.flip, cutout=d.cutout,
                               scale=scale, lighting=d.lighting if paper else 0.0, **common)
    val = None
    if val_x is not None and len(val_x):
        val = vdata.TensorLoader(val_x, val_y, batch_size=batch, shuffle=False, drop_last=False, seed=seed,
                                 augment="center" if paper else "none", scale=_test_scale(scale), **common)
    # in memory, only the paper's views rescale: the others see the images as decoded, at the crop
    test_scale = scale_pixels(_test_scale(scale), size) if paper else size
    return Inputs(train, val, classes, 3, size, mean, std, test_scale)


def _streaming(recipe: Recipe, train_ds: Any, val_ds: Any, classes: list[str], batch: int, env: Dist) -> Inputs:
    d = recipe.data
    assert d.image_size is not None and d.mean is not None and d.std is not None  # checked by build_inputs
    size, mean, std = d.image_size, list(d.mean), list(d.std)
    if d.flip == "alternate":
        raise UsageError("data.flip: alternate needs images held in memory (tiny images, data.in_memory); "
                         "use true for streamed datasets")
    scale = _scale(d, size)
    if d.augment == "paper":
        train_tf = vdata.paper_train_transform(scale, crop=size, mean=mean, std=std, lighting=d.lighting, flip=d.flip)
    else:
        train_tf = vdata.small_image_train_transform(size=size, pad=d.pad, cutout=d.cutout, mean=mean, std=std,
                                                     flip=d.flip)
    q = _test_scale(scale)
    train_ds.transform = train_tf
    seed = recipe.train.seed
    train = StreamingLoader(train_ds, batch, True, seed, d.workers, env)
    val = None
    if val_ds is not None and len(val_ds):
        val_ds.transform = vdata.eval_transform(q, size, mean=mean, std=std)
        val = StreamingLoader(val_ds, batch, False, seed, d.workers, env)
    return Inputs(train, val, classes, 3, size, mean, std, scale_pixels(q, size))


def _scale(d: DataConfig, size: int) -> Any:
    """The recipe's training scale S: an int/float or a [Smin, Smax] jitter range (default: the crop)."""
    scale = d.scale or size
    return tuple(scale) if isinstance(scale, list | tuple) else scale


def _test_scale(scale: Any) -> Any:
    """Single-scale testing as in the paper: Q = S for a fixed S, the middle of [Smin, Smax] when jittered."""
    if isinstance(scale, tuple):
        both_int = all(isinstance(v, int) for v in scale)
        return (scale[0] + scale[1]) // 2 if both_int else (scale[0] + scale[1]) / 2
    return scale
