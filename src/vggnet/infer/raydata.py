"""Batch inference on Ray Data: the same predictions as ``vggnet predict``, from a pool of actors on a cluster.

One machine runs out long before a collection of millions of images does; Ray Data spreads the decoding and the
forward passes over every node while the driver only lists the inputs. Each actor of the pool builds one
:class:`~vggnet.infer.Predictor` (one model per actor, loaded once, reused for every batch) and maps
``map_batches`` batches of image paths to rows, decoding each file with :func:`vggnet.infer.load_image` and
preprocessing it with :func:`vggnet.infer.preprocess`: the code ``vggnet predict`` runs, not a copy, so the numbers
are the same. An unreadable file becomes a row with its error, not a failed job.

Python API::

    from vggnet.infer.raydata import connect, predict_ray, write_predictions

    connect()                                   # local Ray; connect("ray://head:10001") for a cluster
    rows = predict_ray(["photos/"], "runs/cifar10", topk=3, batch_size=64, concurrency=4)  # or ["s3://bucket/x/"]
    write_predictions(rows, "labels.parquet")   # path, top-k labels / indices / probabilities, error

:func:`predict_dataset` returns the lazy :class:`ray.data.Dataset` instead (write it with ``write_parquet`` to a
bucket without collecting it on the driver); :func:`map_images` is the generic actor pool the features command
(``vggnet.transfer.ray_features``) uses too.

Ray is optional (the ``ray`` extra); without it every entry point raises a one-line :class:`UsageError`.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vggnet.errors import UsageError

from .images import IMAGE_EXTENSIONS, ImageLoadError, expand_image_paths, load_image
from .predictor import Predictor, Preprocessing, preprocess

__all__ = ["MISSING", "ImageWorker", "collect", "connect", "decode", "image_dataset", "is_uri", "map_images",
           "predict_dataset", "predict_ray", "predictor_from_model", "require_ray", "rows_from_table",
           "write_predictions"]

MISSING = "the Ray engine needs the ray extra: pip install 'vggnet[ray]' (Ray Data and pyarrow)"
# Columns of a prediction row (Parquet and the Dataset): input order, file, error ("" when read), top-k.
PREDICTION_COLUMNS = ("index", "path", "error", "labels", "indices", "probabilities")


def require_ray() -> Any:
    """The ``ray`` module, or a one-line UsageError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"{MISSING} ({exc})") from None
    return ray


def connect(address: str | None = None, **init_options: Any) -> None:
    """Join (``address``: ``auto``, ``ray://head:10001``, ``HOST:6379``) or start (``None``: a local Ray on this
    machine's cores) a Ray cluster, unless this process is connected already; quiet (no dashboard, no progress
    bars) so a command prints what ``vggnet predict`` prints."""
    ray = require_ray()
    if ray.is_initialized():
        return
    init_options.setdefault("include_dashboard", False)
    init_options.setdefault("log_to_driver", False)
    init_options.setdefault("logging_level", logging.ERROR)
    try:
        ray.init(address=address, **init_options)
    except ConnectionError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {' '.join(str(exc).split())}") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # per-dataset INFO lines; failures still raise
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def is_uri(spec: str) -> bool:
    """A remote or scheme-qualified input (``s3://``, ``gs://``, ``file://``), read by Ray's filesystems."""
    return "://" in spec


def image_dataset(specs: Sequence[str | os.PathLike]) -> tuple[Any, int | None]:
    """(Dataset of ``{index, path}`` rows, count) for files, folders and globs as ``vggnet predict`` expands them
    (on the driver: a typo fails before any actor starts), or a lazy ``ray.data.read_binary_files`` Dataset of
    ``{index, path, bytes}`` rows for URIs (a bucket the workers read; the driver lists nothing), whose ``index``
    is -1 and count ``None``: those rows come back ordered by path. Not both kinds at once."""
    ray = require_ray()
    texts = [os.fspath(s) for s in specs]
    uris = [t for t in texts if is_uri(t)]
    if uris and len(uris) != len(texts):
        raise UsageError("give either local files, folders and globs or URIs (s3://, gs://, file://), not both")
    if not uris:
        paths = expand_image_paths(texts)
        rows = [{"index": i, "path": str(p)} for i, p in enumerate(paths)]
        return ray.data.from_items(rows), len(rows)
    # Reading bytes is I/O, not compute: 0 CPUs, so a pool holding every core cannot starve its own reads
    # (with the default 1 CPU a local run with --concurrency = cores never gets its input).
    exts = [e.lstrip(".") for e in IMAGE_EXTENSIONS]
    return ray.data.read_binary_files(uris, include_paths=True, file_extensions=exts + [e.upper() for e in exts],
                                      num_cpus=0), None


def decode(row_path: str, data: bytes | None, max_pixels: int | None = None) -> Any:
    """One input decoded exactly as ``vggnet predict`` decodes a file (:func:`load_image`: full decode, EXIF
    orientation, the pixel bound); bytes from a URI go through a temporary file so the same function reads them.
    An unreadable input is returned as its :class:`ImageLoadError` naming ``row_path``."""
    try:
        if data is None:
            return load_image(row_path, max_pixels)
        with tempfile.NamedTemporaryFile(suffix=Path(row_path).suffix) as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                return load_image(tmp.name, max_pixels)
            except ImageLoadError as exc:
                raise ImageLoadError(row_path, exc.reason) from None
    except ImageLoadError as exc:
        return exc
    except FileNotFoundError as exc:  # gone between listing and reading
        return ImageLoadError(row_path, f"not found ({exc.strerror or exc})")


class ImageWorker:
    """One actor of the pool: ``factory()`` runs once (the model loads once per actor), then every batch of
    ``{index, path[, bytes]}`` rows is decoded and handed to the callable it returned as ``(indices, paths,
    images)``, with an :class:`ImageLoadError` in place of each unreadable image; that callable returns the output
    columns (a dict of equal-length lists or arrays, or a ``pyarrow.Table``)."""

    def __init__(self, factory: Callable[[], Callable[..., Any]], threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.fn = factory()

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        paths = [str(p) for p in batch["path"]]
        data = batch.get("bytes")
        images = [decode(p, None if data is None else bytes(data[i])) for i, p in enumerate(paths)]
        index = batch.get("index")
        return self.fn([-1] * len(paths) if index is None else [int(i) for i in index], paths, images)


def map_images(dataset: Any, factory: Callable[[], Callable[..., Any]], *, batch_size: int = 32,
               concurrency: int = 2, num_cpus: float = 1, num_gpus: float = 0) -> Any:
    """``dataset`` (from :func:`image_dataset` or any with ``index`` / ``path`` columns) mapped by a fixed pool of
    ``concurrency`` :class:`ImageWorker` actors, each given ``num_cpus`` cores (its torch threads) and
    ``num_gpus`` GPUs, ``batch_size`` rows per call. Lazy: nothing runs until the result is consumed."""
    ray = require_ray()
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {concurrency}")
    if num_cpus <= 0 or num_gpus < 0:
        raise UsageError(f"an actor needs more than 0 CPUs and at least 0 GPUs, got {num_cpus} and {num_gpus}")
    return dataset.map_batches(
        ImageWorker, fn_constructor_kwargs={"factory": factory, "threads": max(1, int(num_cpus))},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus, num_gpus=num_gpus or None)


def predictor_from_model(model_ref: list[Any], prep: Preprocessing, runtime: str, calib: Any,
                         max_batch: int, options: dict[str, Any]) -> Predictor:
    """An actor's own :class:`Predictor` for a checkpoint's model (held once in Ray's object store:
    ``model_ref`` is ``[ObjectRef]``); the runtime (``eager``, ``int8``...) is built inside the actor, with the
    driver's calibration batch when it needs one."""
    import ray

    return Predictor(ray.get(model_ref[0]), prep, runtime, calib=calib, max_batch=max_batch, **options)


def _top_k_rows(make_predictor: Callable[[], Predictor], topk: int) -> Callable[..., Any]:
    """The per-actor callable of :func:`predict_dataset`: top-k of the readable images, errors for the rest."""
    import pyarrow as pa

    predictor = make_predictor()
    k = min(topk, predictor.prep.num_classes)

    def run(indices: list[int], paths: list[str], images: list[Any]) -> Any:
        good = [n for n, image in enumerate(images) if not isinstance(image, ImageLoadError)]
        labels: list[list[str]] = [[] for _ in paths]
        ids: list[list[int]] = [[] for _ in paths]
        probs: list[list[float]] = [[] for _ in paths]
        if good:
            p = predictor.logits(preprocess([images[n] for n in good], predictor.prep)).softmax(1)
            values, top = p.topk(k, dim=1)
            for n, vs, ts in zip(good, values.tolist(), top.tolist(), strict=True):
                labels[n], ids[n], probs[n] = [predictor.prep.label(i) for i in ts], ts, vs
        errors = [image.reason if isinstance(image, ImageLoadError) else "" for image in images]
        return pa.table({"index": pa.array(indices, pa.int64()), "path": pa.array(paths, pa.string()),
                         "error": pa.array(errors, pa.string()), "labels": pa.array(labels, pa.list_(pa.string())),
                         "indices": pa.array(ids, pa.list_(pa.int64())),
                         "probabilities": pa.array(probs, pa.list_(pa.float64()))})

    return run


def predict_dataset(images: Sequence[str | os.PathLike], make_predictor: Callable[[], Predictor], *,
                    topk: int = 5, batch_size: int = 32, concurrency: int = 2, num_cpus: float = 1,
                    num_gpus: float = 0) -> tuple[Any, int]:
    """(lazy Dataset of prediction rows, number of inputs). ``make_predictor`` is a picklable zero-argument
    callable run once per actor (:func:`predictor_from_model` via ``functools.partial``, or one loading an exported
    file the workers can read). Rows: ``index`` (input order), ``path``, ``error`` ("" when read), ``labels``,
    ``indices``, ``probabilities`` (top-k, most likely first; empty for an unreadable image)."""
    if topk < 1:
        raise UsageError(f"--topk must be at least 1, got {topk}")
    dataset, count = image_dataset(images)
    factory = functools.partial(_top_k_rows, make_predictor, topk)
    return map_images(dataset, factory, batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus,
                      num_gpus=num_gpus), count


def rows_from_table(table: Any) -> list[dict[str, Any]]:
    """Prediction rows in input order as ``vggnet predict --json`` prints them: ``{"image", "top": [{"label",
    "index", "probability"}]}`` or ``{"image", "error"}``."""
    out: list[dict[str, Any]] = []
    for r in sorted(table.to_pylist(), key=lambda r: (r["index"], r["path"])):
        if r["error"]:
            out.append({"image": r["path"], "error": r["error"]})
        else:
            out.append({"image": r["path"], "top": [
                {"label": label, "index": i, "probability": p}
                for label, i, p in zip(r["labels"], r["indices"], r["probabilities"], strict=True)]})
    return out


def predict_ray(images: Sequence[str | os.PathLike], ckpt: str | os.PathLike, *, runtime: str = "eager",
                topk: int = 5, batch_size: int = 32, concurrency: int = 2, num_cpus: float = 1,
                num_gpus: float = 0, **options: Any) -> list[dict[str, Any]]:
    """Top-k predictions of a checkpoint (run folder or ``.safetensors``) for files, folders, globs or URIs, on
    the connected Ray cluster (:func:`connect` first, or a local one starts), in input order, as
    :func:`rows_from_table` describes. ``options`` (``device``, ``precision``) go to each actor's Predictor."""
    ray = require_ray()
    from vggnet.models import checkpoint_file, checkpoint_meta, load_checkpoint

    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    make = functools.partial(predictor_from_model, [ray.put(model.eval())], prep, runtime, None, batch_size, options)
    dataset, _ = predict_dataset(images, make, topk=topk, batch_size=batch_size, concurrency=concurrency,
                                 num_cpus=num_cpus, num_gpus=num_gpus)
    return rows_from_table(collect(dataset))


def collect(dataset: Any) -> Any:
    """All rows of a (small) result Dataset as one ``pyarrow.Table`` on the driver."""
    ray = require_ray()
    import pyarrow as pa

    tables = ray.get(dataset.to_arrow_refs())
    return pa.concat_tables([t for t in tables if t.num_rows]) if any(t.num_rows for t in tables) else tables[0]


def write_predictions(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Prediction rows (:func:`rows_from_table`'s, or ``vggnet predict``'s) as one Parquet file, written atomically:
    ``path``, ``error`` (null when read), ``labels``, ``indices``, ``probabilities`` (top-k lists)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UsageError(f"--out writes Parquet, which needs pyarrow (pip install 'vggnet[ray]'): {exc}") from None
    from vggnet.atomic import atomic_path

    def column(key: str) -> list[Any]:
        return [[t[key] for t in r.get("top", [])] for r in rows]

    table = pa.table({"path": pa.array([r["image"] for r in rows], pa.string()),
                      "error": pa.array([r.get("error") for r in rows], pa.string()),
                      "labels": pa.array(column("label"), pa.list_(pa.string())),
                      "indices": pa.array(column("index"), pa.list_(pa.int64())),
                      "probabilities": pa.array(column("probability"), pa.list_(pa.float64()))})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(path)
