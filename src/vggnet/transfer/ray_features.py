"""Appendix B descriptors on Ray Data: ``vggnet features --engine ray``, the same numbers from a pool of actors.

Each actor holds one model (sent once through Ray's object store) and runs :func:`extract_features`, the function
the single-process command runs, on its batches of images; the driver puts the rows back in input order. Images are
file paths (an ImageFolder tree: each actor reads its own files, as ``FolderImages`` would) or, for a run whose data
lives in memory (the demo's digits), the uint8 tensors themselves. An unreadable file is masked out, as in the
single-process command.

Python API::

    from vggnet.infer.raydata import connect
    from vggnet.transfer.ray_features import features_ray

    connect()                                     # or connect("ray://head:10001")
    feats, ok = features_ray(model, images, layer="relu7", scales=[256, 384], crop=224, mean=..., std=...,
                             batch_size=32, concurrency=4)

returns what :func:`vggnet.transfer.features.extract_features` returns: (N × D float32 unit rows, readable mask).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vggnet.data import DataError
from vggnet.errors import UsageError
from vggnet.evaluate import FolderImages
from vggnet.infer.raydata import collect, require_ray
from vggnet.models import VGG

from .features import extract_features

__all__ = ["features_ray"]


def _describer(model_ref: list[Any], options: dict[str, Any]) -> Callable[..., Any]:
    """The per-actor callable: the model fetched once, then descriptors for each batch (empty for an unreadable
    image), as a pyarrow table of ``index``, ``ok``, ``features`` (list<float32>)."""
    import pyarrow as pa
    import ray

    model = ray.get(model_ref[0])

    def run(indices: list[int], paths: list[str], arrays: list[np.ndarray] | None) -> Any:
        batch: Sequence[Any] = (FolderImages(paths) if arrays is None
                                else [torch.from_numpy(np.array(a)) for a in arrays])
        try:
            feats, ok = extract_features(model, batch, batch_size=len(paths), progress=False, **options)
        except DataError:  # every image of this batch unreadable: all masked, as the whole-run function masks them
            feats, ok = torch.zeros(len(paths), 0), torch.zeros(len(paths), dtype=torch.bool)
        keep = ok.numpy()
        values = feats.numpy()[keep].astype(np.float32).reshape(-1)
        offsets = np.concatenate([[0], np.cumsum(np.where(keep, feats.shape[1], 0))]).astype(np.int32)
        return pa.table({"index": pa.array(indices, pa.int64()), "ok": pa.array(keep),
                         "features": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))})

    return run


class _FeatureWorker:
    """One actor: the describer built once, then batches of ``{index, path}`` rows (files, read by
    ``FolderImages`` in the describer: its rule for an unreadable file) or ``{index, path, image}`` rows
    (in-memory uint8 images)."""

    def __init__(self, factory: Callable[[], Callable[..., Any]], threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.fn = factory()

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        arrays = batch.get("image")
        return self.fn([int(i) for i in batch["index"]], [str(p) for p in batch["path"]],
                       None if arrays is None else list(arrays))


def features_ray(model: VGG, images: Sequence[Any], *, batch_size: int = 32, concurrency: int = 2,
                 num_cpus: float = 1, num_gpus: float = 0, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` on the connected Ray cluster: same keywords (``layer``, ``scales``, ``crop``,
    ``mean``, ``std``, ``stack``, ``flip``, ``device``, ``amp_bf16``), same result, computed by ``concurrency``
    actors of ``num_cpus`` cores / ``num_gpus`` GPUs, ``batch_size`` images per call. Files (``images.paths``,
    an ImageFolder's ``FolderImages``) must be readable by every node; other images travel as arrays."""
    ray = require_ray()
    if batch_size < 1 or concurrency < 1:
        raise UsageError(f"--batch-size and --concurrency must be at least 1, got {batch_size} and {concurrency}")
    options.pop("progress", None)
    paths = getattr(images, "paths", None)
    if paths is not None:
        rows = [{"index": i, "path": str(p)} for i, p in enumerate(paths)]
    else:
        rows = [{"index": i, "path": str(i), "image": torch.as_tensor(images[i]).numpy()} for i in range(len(images))]
    factory = functools.partial(_describer, [ray.put(model.eval())], options)
    result = ray.data.from_items(rows).map_batches(
        _FeatureWorker, fn_constructor_kwargs={"factory": factory, "threads": max(1, int(num_cpus))},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus, num_gpus=num_gpus or None)
    return _assemble(collect(result), len(images))


def _assemble(table: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows back in input order: (N × D, mask), zero rows for the unreadable, as extract_features returns."""
    index = table.column("index").to_numpy()
    ok = table.column("ok").to_numpy(zero_copy_only=False).astype(bool)
    if len(index) != n or sorted(index.tolist()) != list(range(n)):
        raise RuntimeError(f"the Ray job returned {len(index)} rows for {n} images")
    if not ok.any():
        raise DataError("no image could be read")
    values = table.column("features").combine_chunks().flatten().to_numpy()  # the readable rows, in table order
    dim = len(values) // int(ok.sum())
    feats = torch.zeros(n, dim)
    readable = torch.zeros(n, dtype=torch.bool)
    feats[torch.from_numpy(index[ok])] = torch.from_numpy(values.reshape(-1, dim).astype(np.float32))
    readable[torch.from_numpy(index[ok])] = True
    return feats, readable
