"""Turn a recipe's ``data`` section into train/val iterables for the loop.

Two paths: tiny images (digits, CIFAR-10) are decoded once into a uint8 tensor and augmented in
batches on tensors (no worker processes: on two cores, workers would fight the model for them);
anything else streams through an ImageFolder + ``DataLoader`` with the torchvision v2 transforms.
Both expose ``set_epoch``, ``state_dict``/``load_state_dict`` and DDP sharding, so the loop and
resume do not care which one they got.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggnet import data as vdata
from vggnet.data.transforms import scale_pixels
from vggnet.errors import UsageError

from .distributed import Dist
from .recipe import DataConfig, Recipe

TINY = 64  # px: crops up to this size are tiny images (CIFAR-sized): held in memory, pad-crop augmented
AUTO_VAL_FRACTION = 0.1  # data.val_fraction: auto holds out this share ...
AUTO_VAL_MIN_PER_CLASS = 200  # ... when every class has at least this many images (20 held out per class)


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
    #: the recipe as run: its data-dependent values (``auto``, ``optim.min_batches``, ``schedule.min_steps``) resolved
    recipe: Recipe | None = None
    #: one line per resolved value: what it became and why (printed at the start of the run)
    notes: list[str] = field(default_factory=list)
    #: no validation split because the folder is small (``data.val_fraction: auto``): the last epoch is the best one
    keep_last: bool = False


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
    """The run's training and validation loaders (a recipe mapping, as recipe.yaml holds, is checked first).

    Values that depend on the data (``auto``, the ``optim.min_batches`` and ``schedule.min_steps`` floors) are
    resolved here, where the data is first seen: ``Inputs.recipe`` is the recipe as run, ``Inputs.notes`` says why.
    The caller's recipe is not changed.
    """
    recipe = copy.deepcopy(recipe) if isinstance(recipe, Recipe) else Recipe.of(recipe)
    d = recipe.data
    if d.image_size is None or d.mean is None or d.std is None:
        raise UsageError("data.image_size, data.mean and data.std are null: they come from model.weights (--weights)")
    notes: list[str] = []
    if d.augment == "auto":
        notes.append(_auto_augment(d, d.image_size))
    inputs = _build(recipe, env, notes)
    if len(inputs.train) == 0:  # full batches only: a training set smaller than one batch makes no step
        images = _count(inputs.train)
        raise UsageError(f"{images} training images make no full batch of {recipe.optim.batch_size} per process: "
                         f"pass a smaller --batch-size (at most {max(1, images // env.world)}) or add images")
    notes.extend(fit_epochs(recipe, len(inputs.train)))
    inputs.recipe, inputs.notes = recipe, notes
    return inputs


def _count(loader: Any) -> int:
    """Images behind a training loader (the tensor loader's, or a DataLoader's dataset)."""
    if isinstance(getattr(loader, "images", None), int):  # shards: a count of this process's training images (the
        return loader.images                                # tensor loader's ``images`` is the tensor itself)
    return len(loader.labels) if hasattr(loader, "labels") else len(loader.dataset)


def _build(recipe: Recipe, env: Dist, notes: list[str]) -> Inputs:
    """The loaders of :func:`build_inputs`; resolves ``data.val_fraction`` and the batch into ``recipe``."""
    d, seed = recipe.data, recipe.train.seed
    assert d.image_size is not None and d.mean is not None and d.std is not None  # checked by build_inputs
    size, mean, std = d.image_size, list(d.mean), list(d.std)
    keep_last = False
    if d.format == "shards":
        return _shards(recipe, env, notes)
    if d.dataset == "digits":
        if d.val_fraction == "auto":  # a complete dataset, not a small folder of one's own
            d.val_fraction = AUTO_VAL_FRACTION
        train_x, train_y = vdata.digits_tensors("train", size=size, channels=3, val_fraction=d.val_fraction,
                                                seed=d.split_seed)
        val_x, val_y = vdata.digits_tensors("val", size=size, channels=3, val_fraction=d.val_fraction,
                                            seed=d.split_seed)
        classes = [str(i) for i in range(10)]
        batch = _per_rank_batch(fit_batch(recipe, len(train_y), env.world, notes), env)
    else:
        if d.dataset != "folder":
            root = vdata.download_builtin(d.dataset, Path(d.path or "data"), download=d.download)
        elif not d.path:
            raise UsageError("this recipe needs --data PATH (an ImageFolder tree: one folder per class)")
        else:
            root = Path(d.path)
        train_ds, val_ds, classes, keep_last = _split_folder(root, d, notes)
        batch = _per_rank_batch(fit_batch(recipe, len(train_ds), env.world, notes), env)
        in_memory = d.in_memory
        if in_memory == "auto":
            in_memory = size <= TINY and len(train_ds) <= 200_000
        if not in_memory:
            inputs = _streaming(recipe, train_ds, val_ds, classes, batch, env)
            inputs.keep_last = keep_last
            return inputs
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
    return Inputs(train, val, classes, 3, size, mean, std, test_scale, keep_last=keep_last)


def _transforms(d: DataConfig) -> tuple[Any, Any, Any]:
    """(train transform, validation transform, Q) of the streamed paths (folder and shards): one decode + augment."""
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
    return train_tf, vdata.eval_transform(q, size, mean=mean, std=std), q


def _streaming(recipe: Recipe, train_ds: Any, val_ds: Any, classes: list[str], batch: int, env: Dist) -> Inputs:
    d = recipe.data
    assert d.image_size is not None and d.mean is not None and d.std is not None  # checked by build_inputs
    size, mean, std = d.image_size, list(d.mean), list(d.std)
    train_ds.transform, val_tf, q = _transforms(d)
    seed = recipe.train.seed
    train = StreamingLoader(train_ds, batch, True, seed, d.workers, env)
    val = None
    if val_ds is not None and len(val_ds):
        val_ds.transform = val_tf
        val = StreamingLoader(val_ds, batch, False, seed, d.workers, env)
    return Inputs(train, val, classes, 3, size, mean, std, scale_pixels(q, size))


def _shards(recipe: Recipe, env: Dist, notes: list[str]) -> Inputs:
    """``data.format: shards``: stream ``data.path`` (a folder or fsspec URL) as :mod:`vggnet.data.shards` wrote it.

    The validation split is the one written into ``val-*.tar`` (``vggnet data shard --val-fraction``): the recipe's
    ``data.val_fraction`` records it and is not applied again.
    """
    from vggnet.data import shards  # webdataset-style reading: only runs that stream shards import it

    d = recipe.data
    assert d.image_size is not None and d.mean is not None and d.std is not None  # checked by build_inputs
    if not d.path:
        raise UsageError("data.format: shards needs --data DIR_OR_URL (the --out of `vggnet data shard`)")
    manifest = shards.read_manifest(d.path)
    shards.check_shards(d.path, manifest)
    classes = list(manifest["classes"])
    split = manifest["split"]
    has_val = bool(manifest["splits"].get("val", {}).get("shards"))
    d.val_fraction, d.split_seed = float(split["val_fraction"]), int(split["split_seed"])
    notes.append(f"data.val_fraction={d.val_fraction:g}: the split written into the shards ({split['rule']}); "
                 + ("validation streams val-*.tar" if has_val else "no validation shards"))
    batch = _per_rank_batch(fit_batch(recipe, manifest["splits"]["train"]["count"], env.world, notes), env)
    workers = min(2, os.cpu_count() or 1) if d.workers is None else d.workers
    train_tf, val_tf, q = _transforms(d)
    common = {"seed": recipe.train.seed, "rank": env.rank, "world": env.world, "workers": workers}
    train = shards.ShardLoader(d.path, manifest, "train", batch, True, train_tf, buffer=d.shuffle_buffer, **common)
    val = (shards.ShardLoader(d.path, manifest, "val", batch, False, val_tf, buffer=0, **common)
           if has_val else None)
    size = d.image_size
    return Inputs(train, val, classes, 3, size, list(d.mean), list(d.std), scale_pixels(q, size),
                  keep_last=not has_val)


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


def _auto_augment(d: DataConfig, size: int) -> str:
    """``data.augment: auto``: pad-crop + flip for tiny crops, the paper's isotropic rescale for photos."""
    if size <= TINY:
        d.augment, d.scale = "flip_crop", None
        return (f"data.augment=flip_crop (auto): {size}-px crops are tiny (<= {TINY} px): reflect-pad {d.pad} + "
                "random crop + flip, as for CIFAR; the rescale jitter is for photos")
    d.augment = "paper"
    scale = _scale(d, size)
    low, high = (scale_pixels(v, size) for v in (scale if isinstance(scale, tuple) else (scale, scale)))
    return (f"data.augment=paper (auto): {size}-px crops: the paper's isotropic rescale, shorter side in "
            f"[{low}, {high}] px, random {size}-px crop + flip")


def _split_folder(root: Path, d: DataConfig, notes: list[str]) -> tuple[Any, Any, list[str], bool]:
    """(train, val, classes, keep_last) of an image folder; ``data.val_fraction: auto`` resolved into ``d``.

    The auto split is the one :func:`vggnet.data.load_image_folder` makes with the resolved fraction and
    ``data.split_seed``, so evaluation, which reads the fraction from the run's recipe.yaml, finds the same images.
    """
    if d.val_fraction != "auto":
        return (*vdata.load_image_folder(root, val_fraction=d.val_fraction, seed=d.split_seed), False)
    every, given_val, classes = vdata.load_image_folder(root, val_fraction=0.0, seed=d.split_seed)
    labels = [label for _, label in every.samples]
    counts = Counter(labels)
    fewest = min(counts.get(i, 0) for i in range(len(classes)))
    d.val_fraction = AUTO_VAL_FRACTION if fewest >= AUTO_VAL_MIN_PER_CLASS else 0.0
    if given_val is not None:
        notes.append(f"data.val_fraction={d.val_fraction:g} (auto), unused: validation on the val/ folder "
                     f"({len(given_val)} images)")
        return every, given_val, classes, False
    if not d.val_fraction:
        notes.append(f"data.val_fraction=0 (auto): no validation split: {fewest} images in the smallest class "
                     f"(< {AUTO_VAL_MIN_PER_CLASS}), so every image trains and the last epoch is kept as best; "
                     f"--set data.val_fraction={AUTO_VAL_FRACTION:g} to hold some out")
        return every, None, classes, True
    train_idx, val_idx = vdata.stratified_split(labels, d.val_fraction, d.split_seed)
    notes.append(f"data.val_fraction={d.val_fraction:g} (auto): {len(val_idx)} images held out for validation "
                 f"(every class has >= {AUTO_VAL_MIN_PER_CLASS} images)")
    return (vdata.ImageFolderDataset([every.samples[i] for i in train_idx], classes),
            vdata.ImageFolderDataset([every.samples[i] for i in val_idx], classes), classes, False)


def fit_batch(recipe: Recipe, images: int, world: int, notes: list[str]) -> int:
    """The global batch: ``optim.batch_size``, cut so ``images`` training images make at least
    ``optim.min_batches`` steps an epoch (a multiple of the processes), with ``optim.lr`` scaled by the same
    factor (the linear scaling rule). Without the cut a batch larger than a small folder makes no step at all."""
    o = recipe.optim
    if not o.min_batches or images // o.batch_size >= o.min_batches:
        return o.batch_size
    batch = max(world, images // o.min_batches // world * world)
    if batch >= o.batch_size:
        return o.batch_size
    lr = o.lr * batch / o.batch_size
    notes.append(f"optim.batch_size={batch}, optim.lr={lr:.3g}: {images} training images make fewer than "
                 f"optim.min_batches={o.min_batches} batches of {o.batch_size}; the lr follows the batch "
                 f"({o.lr:g} at {o.batch_size})")
    o.batch_size, o.lr = batch, lr
    return batch


def fit_epochs(recipe: Recipe, steps_per_epoch: int) -> list[str]:
    """``schedule.epochs`` raised, when needed, so the run makes at least ``schedule.min_steps`` optimizer steps:
    a small folder gets as many updates as a large one, not ten epochs of a few steps each."""
    s = recipe.schedule
    steps = max(1, steps_per_epoch)
    if not s.min_steps or s.epochs * steps >= s.min_steps:
        return []
    epochs = math.ceil(s.min_steps / steps)
    note = (f"schedule.epochs={epochs}: {s.epochs} epochs x {steps} steps = {s.epochs * steps} steps, under "
            f"schedule.min_steps={s.min_steps}; {epochs} epochs make {epochs * steps} "
            f"(--set schedule.min_steps=0 keeps {s.epochs})")
    s.epochs = epochs
    return [note]
