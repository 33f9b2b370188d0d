"""WebDataset tar shards: written from an ImageFolder tree, streamed back for training with exact resume.

Writing (:func:`write_shards`): every image's original bytes go into ``{key}.<ext>`` beside ``{key}.cls`` (the class
index) and ``{key}.json`` (source path, class name), never re-encoded, so any WebDataset reader gets the same files.
Images are shuffled once (``shuffle_seed``) before they are cut into shards: an ImageFolder lists one class after
another, and a shard of one class is something no shuffle buffer can fix. The validation split is made here, with
the folder path's rule (``train/`` + ``val/`` folders as given, else :func:`~vggnet.data.split.stratified_split`
with ``val_fraction`` and ``split_seed``), into ``val-*.tar``: every run then holds out the same images and training
shards hold training images only. A shard is written whole (temp file, fsync, rename) and a rerun keeps the shards
already complete; ``manifest.json`` (classes, shards with counts and sha256, the split rule) comes last.

Reading (:class:`ShardLoader`): shards are dealt once to (rank, stream) pairs, a stream being one DataLoader worker;
each epoch a stream reorders its shards and shuffles samples through a buffer, both from (seed, epoch, rank,
stream), and augments sample ``i`` of its stream under a torch seed of its own. A position is therefore just the
count of samples each stream has handed out: a resumed run replays the buffer over the raw records (no decode) up to
it and goes on with exactly the batches the uninterrupted run would have made (same number of workers).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from vggnet.atomic import atomic_path, file_sha256, write_json
from vggnet.progress import progress_bar

from .folder import IMAGE_ERRORS, DataError, load_image_folder

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "vggnet-webdataset-shards"
DEFAULT_SHARD_MB = 256.0  # WebDataset's advice: shards of 100 MB to a few GB (few opens, long sequential reads)
Record = tuple[str, int, str, bytes]  # key, class index, extension, original bytes


# ---------------------------------------------------------------------------------------------------- writing


def _plan(samples: Sequence[tuple[str, int]], shard_size: int | None, shard_mb: float,
          seed: int) -> list[list[tuple[str, int]]]:
    """``samples`` shuffled with ``seed`` and cut into shards of ``shard_size`` images or about ``shard_mb`` MB."""
    order = np.random.default_rng(seed).permutation(len(samples)).tolist()
    shards: list[list[tuple[str, int]]] = [[]]
    size, limit = 0, shard_mb * 2**20
    for i in order:
        path, label = samples[i]
        nbytes = os.path.getsize(path)
        full = len(shards[-1]) >= shard_size if shard_size else (shards[-1] and size + nbytes > limit)
        if full:
            shards.append([])
            size = 0
        shards[-1].append((path, label))
        size += nbytes
    return [s for s in shards if s]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member with fixed owner, mode and time: the same images give byte-identical shards on every run."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    tar.addfile(info, io.BytesIO(data))


def _entries(items: Sequence[tuple[str, int]], first: int) -> list[tuple[str, str, int, str]]:
    """(key, extension, class, path) of a shard's images; keys are the image's place in the split (no dots)."""
    out = []
    for n, (path, label) in enumerate(items):
        ext = Path(path).suffix.lower().lstrip(".") or "img"
        out.append((f"{first + n:09d}", ext, label, path))
    return out


def _complete(path: Path, entries: list[tuple[str, str, int, str]]) -> bool:
    """Whether ``path`` is already this shard (a rerun): same members, same image sizes."""
    if not path.is_file():
        return False
    try:
        with tarfile.open(path) as tar:
            sizes = {m.name: m.size for m in tar.getmembers()}
    except (OSError, tarfile.TarError):
        return False
    want = {f"{key}.{ext}": os.path.getsize(src) for key, ext, _, src in entries}
    return all(sizes.get(name) == size for name, size in want.items()) and len(sizes) == 3 * len(entries)


def _write_shard(path: Path, entries: list[tuple[str, str, int, str]], root: Path, classes: Sequence[str],
                 bar: Any) -> None:
    with atomic_path(path, suffix=".tar") as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, label, src in entries:
            _member(tar, f"{key}.cls", str(label).encode())
            _member(tar, f"{key}.{ext}", Path(src).read_bytes())
            meta = {"path": os.path.relpath(src, root), "class": classes[label]}
            _member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            bar.update()


def _readable(samples: Sequence[tuple[str, int]], skipped: list[str]) -> list[tuple[str, int]]:
    """Samples whose header PIL can read (``Image.verify``, no full decode); the others named and left out."""
    kept = []
    for path, label in samples:
        try:
            with Image.open(path) as image:
                image.verify()
        except IMAGE_ERRORS as exc:
            log.warning("skipping unreadable image %s (%s)", path, exc)
            skipped.append(path)
            continue
        kept.append((path, label))
    return kept


def write_shards(folder: str | Path, out: str | Path, shard_size: int | None = None,
                 shard_mb: float | None = None, val_fraction: float = 0.0, split_seed: int = 0,
                 shuffle_seed: int = 0, progress: bool | None = None) -> dict[str, Any]:
    """Write ``folder`` (an ImageFolder tree) as WebDataset shards under ``out``; returns the manifest."""
    if shard_size is not None and shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if shard_mb is not None and shard_mb <= 0:
        raise DataError(f"--shard-mb must be positive, got {shard_mb}")
    root, out = Path(folder), Path(out)
    train, val, classes = load_image_folder(root, val_fraction=val_fraction, seed=split_seed)
    given = (root / "train").is_dir() and any((root / n).is_dir() for n in ("val", "validation"))
    skipped: list[str] = []
    splits = {"train": _readable(train.samples, skipped)}
    if val is not None:
        splits["val"] = _readable(val.samples, skipped)
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": 1, "source": str(root), "classes": classes, "shuffle_seed": shuffle_seed,
        "split": {"rule": "train/ and val/ folders as given" if given else
                  "vggnet.data.split.stratified_split(labels, val_fraction, split_seed): per class "
                  "round(n * val_fraction) images, at least one when the fraction is > 0, never all",
                  "val_fraction": 0.0 if given else val_fraction, "split_seed": split_seed},
        "skipped": [os.path.relpath(p, root) for p in skipped], "splits": {}}
    plans = {name: _plan(items, shard_size, shard_mb or DEFAULT_SHARD_MB, shuffle_seed)
             for name, items in splits.items()}
    total = sum(len(items) for items in splits.values())
    kept = 0
    with progress_bar(total=total, desc="shards", unit="img", progress=progress) as bar:
        for name, plan in plans.items():
            shards, first = [], 0
            for n, items in enumerate(plan):
                path = out / f"{name}-{n:06d}.tar"
                entries = _entries(items, first)
                first += len(items)
                if _complete(path, entries):
                    kept += 1
                    bar.update(len(items))
                else:
                    _write_shard(path, entries, root, classes, bar)
                shards.append({"name": path.name, "count": len(items), "bytes": path.stat().st_size,
                               "sha256": file_sha256(path)})
            manifest["splits"][name] = {"count": first, "shards": shards}
    manifest["total"] = total
    manifest["kept_from_earlier_run"] = kept
    write_json(out / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------- reading


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def _open(url: str) -> BinaryIO:
    """A local file, or any fsspec URL (``file://``, ``s3://``, ``gs://``, ``https://`` ...)."""
    if "://" not in url:
        return open(url, "rb")
    try:
        import fsspec
    except ImportError as exc:
        raise DataError(f"{url}: reading shards from a URL needs fsspec (pip install 'vggnet[shards]')") from exc
    return fsspec.open(url, "rb").open()


def _exists(url: str) -> bool | None:
    """Whether ``url`` exists; None when the filesystem cannot say (a listing refused)."""
    if "://" not in url:
        return Path(url).is_file()
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path))
    except Exception:  # noqa: BLE001 - any backend error means "cannot tell now"; the read will say more
        return None


def read_manifest(root: str) -> dict[str, Any]:
    """``root/manifest.json`` (root: a folder or an fsspec URL), checked to be one :func:`write_shards` wrote."""
    url = _join(root, MANIFEST)
    try:
        with _open(url) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"{url}: no shard manifest; write shards with `vggnet data shard FOLDER --out DIR` "
                        "and pass DIR (or its URL) as --data") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{url}: cannot read the shard manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{url}: not a vggnet shard manifest (written by `vggnet data shard`)")
    return manifest


def check_shards(root: str, manifest: dict[str, Any]) -> None:
    """Every shard the manifest lists exists (where the filesystem can list); the first missing one named."""
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            url = _join(root, shard["name"])
            if _exists(url) is False:
                raise DataError(f"{url}: shard listed in {_join(root, MANIFEST)} is missing")


def records(url: str) -> Iterator[Record]:
    """(key, class, extension, bytes) per sample of one shard, in tar order; nothing decoded."""
    try:
        stream = _open(url)
    except FileNotFoundError:
        raise DataError(f"{url}: shard listed in the manifest is missing") from None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            yield from _grouped(tar)
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise DataError(f"{url}: cannot read shard ({exc})") from None


def _grouped(tar: tarfile.TarFile) -> Iterator[Record]:
    """Consecutive members with one key (``KEY.cls``, ``KEY.jpg``, ``KEY.json``) as one record."""
    key, label, ext, data = None, None, None, None
    for member in tar:
        base, _, suffix = member.name.partition(".")
        if base != key:
            if key is not None and label is not None and data is not None:
                yield key, label, ext or "", data
            key, label, ext, data = base, None, None, None
        payload = tar.extractfile(member)
        if payload is None:
            continue
        if suffix == "cls":
            label = int(payload.read())
        elif suffix != "json":
            ext, data = suffix, payload.read()
    if key is not None and label is not None and data is not None:
        yield key, label, ext or "", data


def shuffled(items: Iterator[Any], buffer: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer (WebDataset's rule): fill ``buffer`` items, then hand out a random one per item read."""
    if buffer < 1:
        yield from items
        return
    pool: list[Any] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        j = int(rng.integers(len(pool)))
        pool[j], item = item, pool[j]
        yield item
    for j in rng.permutation(len(pool)).tolist():
        yield pool[j]


def decode(data: bytes) -> tv_tensors.Image:
    """uint8 RGB (3, H, W), as :func:`vggnet.data.folder.read_image` reads a file."""
    with Image.open(io.BytesIO(data)) as image:
        return tv_tensors.Image(pil_to_tensor(image.convert("RGB")))


def deal(shards: Sequence[dict[str, Any]], world: int, streams: int) -> list[list[list[int]]]:
    """Shard indices per [rank][stream]: shard i to rank i % world, then that rank's j-th to stream j % streams."""
    out: list[list[list[int]]] = [[[] for _ in range(streams)] for _ in range(world)]
    for rank in range(world):
        for j, i in enumerate(range(rank, len(shards), world)):
            out[rank][j % streams].append(i)
    return out


def _seed(*parts: int) -> int:
    """One 63-bit seed from several integers (SeedSequence mixes them: nearby tuples give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class ShardStream(IterableDataset):
    """The batches of one rank's streams; in a DataLoader worker, of the stream that worker serves.

    Yields tagged tuples, so the main process (:class:`ShardLoader`) knows where each stream stands and can say
    what went wrong in one line: ``("batch", stream, position, images, labels, skipped)`` and
    ``("error", stream, message)``. ``position``: samples the stream has handed out, unreadable ones included.
    """

    def __init__(self, root: str, shards: Sequence[dict[str, Any]], plan: list[list[int]], batch_size: int,
                 train: bool, transform: Callable[[Any], Any] | None, seed: int, rank: int, buffer: int) -> None:
        self.root, self.shards, self.plan, self.batch_size = root, list(shards), plan, batch_size
        self.train, self.transform, self.seed, self.rank, self.buffer = train, transform, seed, rank, buffer
        self.epoch = 0
        self.offset = 0  # DataLoader worker w serves stream (w + offset) % streams: a resume starts mid-cycle
        self.skip: list[int] = [0] * len(plan)

    def stream_ids(self) -> list[int]:
        info = get_worker_info()
        if info is None:
            return list(range(len(self.plan)))
        return [(info.id + self.offset) % len(self.plan)]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if get_worker_info() is not None:
            yield from self._stream(self.stream_ids()[0])
            return
        # no workers: the streams' batches in the order the workers' would come (round-robin, ended ones dropped)
        order = [(self.offset + k) % len(self.plan) for k in range(len(self.plan))]
        live = {s: self._stream(s) for s in order}
        while live:
            for s in order:
                if s in live:
                    item = next(live[s], None)
                    if item is None:
                        del live[s]
                    else:
                        yield item

    def _samples(self, stream: int) -> Iterator[Record | tuple[str, str]]:
        """The stream's records in this epoch's order (shuffled for training); the shard url ahead of each."""
        rng = np.random.default_rng(_seed(self.seed, self.epoch, self.rank, stream))
        order = list(self.plan[stream])
        if self.train:
            order = [order[i] for i in rng.permutation(len(order))]

        def read() -> Iterator[tuple[str, Record]]:
            for i in order:
                url = _join(self.root, self.shards[i]["name"])
                for record in records(url):
                    yield url, record

        yield from (shuffled(read(), self.buffer, rng) if self.train else read())  # type: ignore[misc]

    def _stream(self, stream: int) -> Iterator[tuple[Any, ...]]:
        """:meth:`_batches`, with the caller's torch RNG kept out of reach when there are no workers: each sample is
        augmented under a seed of its own, and the training loop's dropout stream must not see that."""
        main = get_worker_info() is None
        batches = self._batches(stream)
        while True:
            saved = torch.get_rng_state() if main else None
            try:
                item = next(batches, None)
            finally:
                if saved is not None:
                    torch.set_rng_state(saved)
            if item is None:
                return
            yield item

    def _batches(self, stream: int) -> Iterator[tuple[Any, ...]]:
        images: list[Any] = []
        labels: list[int] = []
        skipped: list[str] = []
        position = self.skip[stream]
        try:
            for i, (url, (key, label, _, data)) in enumerate(self._samples(stream)):  # type: ignore[misc]
                if i < position:
                    continue  # consumed before the resume: replayed through the buffer, never decoded
                position = i + 1
                # the CPU generator alone: torch.manual_seed would also queue a CUDA seeding (with a stack trace)
                torch.default_generator.manual_seed(_seed(self.seed, self.epoch, self.rank, stream, i))
                try:
                    image = decode(data)
                    image = self.transform(image) if self.transform is not None else image
                except IMAGE_ERRORS as exc:
                    log.warning("skipping unreadable image %s in shard %s (%s)", key, url, exc)
                    skipped.append(f"{url}#{key}")
                    continue
                images.append(image)
                labels.append(label)
                if len(images) == self.batch_size:
                    yield "batch", stream, position, default_collate(images), torch.tensor(labels), skipped
                    images, labels, skipped = [], [], []
        except DataError as exc:
            yield "error", stream, str(exc)
            return
        if images and not self.train:
            yield "batch", stream, position, default_collate(images), torch.tensor(labels), skipped


class ShardLoader:
    """Batches from WebDataset shards with the loop's loader interface (``set_epoch``, ``state_dict``, ``len``).

    Every rank makes the same number of batches (``len``: the fewest any rank's shards fill), as DDP needs.
    ``state_dict`` holds the position inside the epoch; :meth:`load_state_dict` makes the next pass of that epoch
    start exactly there. ``skipped`` counts unreadable images (each named once in a warning line).
    """

    def __init__(self, root: str, manifest: dict[str, Any], split: str, batch_size: int, train: bool,
                 transform: Callable[[Any], Any] | None, seed: int, rank: int, world: int, workers: int,
                 buffer: int) -> None:
        shards = manifest["splits"][split]["shards"]
        self.streams = max(1, workers)
        dealt = deal(shards, world, self.streams)
        if train and any(not any(plan) for plan in dealt):
            raise DataError(f"{_join(root, split + '-*.tar')}: {len(shards)} shard(s) for {world} process(es): "
                            "every process needs at least one; write smaller shards (vggnet data shard --shard-size)")
        self.dataset = ShardStream(root, shards, dealt[rank], batch_size, train, transform, seed, rank, buffer)
        self.workers, self.train, self.seed, self.rank = workers, train, seed, rank
        counts = [[sum(shards[i]["count"] for i in plan) for plan in ranks] for ranks in dealt]
        if train:
            self.length = min(sum(n // batch_size for n in ranks) for ranks in counts)
        else:
            self.length = sum(-(-n // batch_size) for n in counts[rank])
        self.images = sum(counts[rank])
        self.epoch, self.skipped, self.skipped_images = 0, 0, []  # type: ignore[var-annotated]
        self._pending: dict[str, Any] | None = None
        self._position: dict[str, Any] = self._fresh()

    def _fresh(self) -> dict[str, Any]:
        return {"positions": [0] * self.streams, "next": 0, "batches": 0}

    def set_epoch(self, epoch: int) -> None:
        """The next pass is epoch ``epoch``: from its start, or from a loaded position inside it."""
        pending, self._pending = self._pending, None
        self.epoch = epoch
        self._position = pending if pending is not None and pending["epoch"] == epoch else self._fresh()

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._position["batches"] >= self.length or not self.train:  # a pass done: the next starts afresh
            self._position = self._fresh()
        pos = self._position
        self.dataset.epoch, self.dataset.offset, self.dataset.skip = self.epoch, pos["next"], list(pos["positions"])
        # its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, and a resumed
        # run, which opens it mid-epoch, would then see another dropout stream than the uninterrupted one
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank)))
        for item in loader:
            if pos["batches"] >= self.length:
                break
            if item[0] == "error":
                raise DataError(item[2])
            _, stream, position, images, labels, skipped = item
            self.skipped += len(skipped)
            self.skipped_images.extend(skipped)
            pos["positions"][stream], pos["next"] = position, (stream + 1) % self.streams
            pos["batches"] += 1
            yield images, labels

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "streams": self.streams, "rank": self.rank,
                "positions": list(self._position["positions"]), "next": self._position["next"],
                "batches": self._position["batches"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume inside epoch ``state['epoch']`` (at its end: the next epoch starts from its beginning)."""
        batches = int(state.get("batches", 0))
        if 0 < batches < self.length:
            if int(state.get("streams", self.streams)) != self.streams:
                raise DataError(f"this run stopped mid-epoch with data.workers={state['streams']} stream(s); "
                                f"resume it with --set data.workers={state['streams']} to continue exactly")
            self._pending = {"epoch": int(state["epoch"]), "positions": list(state["positions"]),
                             "next": int(state["next"]), "batches": batches}
        self.epoch = int(state["epoch"])  # the loop's set_epoch(epoch) then takes the pending position
