"""Turn a dataset archive into a training-ready folder, and tiny images into one decoded array.

Extraction is the step most likely to be interrupted or re-run, so it is idempotent (a marker
records which archive made the folder) and atomic (:func:`vggnet.atomic.atomic_dir`), and it refuses
archives that would write outside the target. Decoding 50,000 tiny JPEGs costs more than an epoch of
training on them, so :func:`decode_to_cache` does it once into an ``.npz``. Both take minutes on CIFAR-10 sized
sets, so both report progress (:func:`vggnet.progress.progress_bar`): a bar on a terminal, a line every 30 s with the
time left in a log, whatever a training run's ``--progress`` says, unless ``progress=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from vggnet import progress as vprogress
from vggnet.atomic import atomic_dir, atomic_path

from .folder import IMAGE_ERRORS, DataError, ImageFolderDataset, Sample, read_image, scan_image_folder

log = logging.getLogger(__name__)
MARKER = ".vggnet-prepared.json"


def _escapes(path: str) -> bool:
    """Absolute (POSIX or Windows) or climbing above its starting folder once normalised."""
    path = path.replace("\\", "/")
    return path.startswith("/") or path[1:2] == ":" or posixpath.normpath(path).split("/")[0] == ".."


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why extracting ``member`` could write outside the target folder, or None when it cannot."""
    if _escapes(member.name) or ".." in member.name.replace("\\", "/").split("/"):
        return "its path is absolute or contains '..'"
    if member.issym() and _escapes(posixpath.join(posixpath.dirname(member.name), member.linkname)):
        return f"it links outside the archive ({member.linkname})"
    if member.islnk() and _escapes(member.linkname):
        return f"it hard-links outside the archive ({member.linkname})"
    return None


def _bar(iterable: Any, total: int, desc: str, unit: str, progress: bool | None) -> Any:
    """Progress over ``iterable``; off a terminal the first line comes, unless ``progress`` is True, only once the
    work has taken ``LOG_INTERVAL_S``, so the small folders of tests and demos stay quiet."""
    return vprogress.progress_bar(iterable, total=total, desc=desc, unit=unit, progress=progress, mininterval=0.5)


def _find_root(folder: Path) -> Path:
    """The folder holding the class folders: unwrap lone top folders, prefer ``train/`` (+ ``val/``)."""
    while True:
        kids = [p for p in folder.iterdir() if not p.name.startswith(".")]
        names = {p.name for p in kids if p.is_dir()}
        if "train" in names:
            return folder if names & {"val", "validation"} else folder / "train"
        if len(kids) == 1 and kids[0].is_dir() and all(p.is_dir() for p in kids[0].iterdir()):
            folder = kids[0]
            continue
        return folder


def prepare_archive(tar_path: str | Path, out_dir: str | Path, *, progress: bool | None = None) -> Path:
    """Extract ``tar_path`` (.tar, .tar.gz, ...) into ``out_dir`` once; returns the ImageFolder root.
    ``progress``: None or True, the files extracted so far (see the module's note); False, nothing."""
    tar_path, out_dir = Path(tar_path), Path(out_dir)
    if not tar_path.is_file():
        raise DataError(f"{tar_path}: no such archive; pass the path of a .tar.gz of class folders")
    stat = tar_path.stat()
    stamp = {"archive": str(tar_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = out_dir / MARKER
    if marker.is_file():
        done = _read_marker(marker)
        same = done.get("size") == stamp["size"] and done.get("mtime_ns") == stamp["mtime_ns"]
        if same and (out_dir / done["root"]).is_dir():
            return out_dir / done["root"]
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: exists and was not made by `vggnet data prepare`; "
                        "choose a new or empty --out folder")
    # Extracted beside the target and published whole (replacing an earlier extraction, of another archive or
    # of the same one touched since): a reader never sees half an archive.
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
        try:
            with tarfile.open(tar_path) as tar:
                members = tar.getmembers()
                for member in members:
                    if reason := _unsafe_member(member):
                        raise DataError(f"{tar_path}: refusing to extract member {member.name!r}: {reason}")
                # counted as extractall asks for each member; filter: no devices, no escaping links (second defence)
                with _bar(members, len(members), f"extracting {tar_path.name}", "file", progress) as bar:
                    tar.extractall(tmp, members=bar, filter="data")
        except tarfile.TarError as exc:
            raise DataError(f"{tar_path}: not a readable tar archive ({exc})") from exc
        root = _find_root(tmp).relative_to(tmp)
        (tmp / MARKER).write_text(json.dumps({**stamp, "root": root.as_posix()}, indent=1))
    return out_dir / root


def _read_marker(marker: Path) -> dict[str, Any]:
    """The stamp an earlier extraction left; a damaged one is the user's to remove, not a traceback."""
    try:
        done = json.loads(marker.read_text())
        if isinstance(done, dict) and isinstance(done.get("root"), str):
            return done
    except (OSError, ValueError) as exc:
        raise DataError(f"{marker}: unreadable ({exc}); remove {marker.parent} and prepare again") from exc
    raise DataError(f"{marker}: not a `vggnet data prepare` marker; remove {marker.parent} and prepare again")


def _square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` then centre crop: one shape for every image without distorting any."""
    if image.shape[-2:] != (size, size):
        image = TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])
    return image


def _decode(samples: Sequence[Sample], size: int | None, desc: str,
            progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels, bad = [], [], 0
    for path, label in _bar(samples, len(samples), desc, "img", progress):
        try:
            image = read_image(path)
        except IMAGE_ERRORS as exc:  # a corrupt file must not cost the other 49,999
            bad += 1
            log.warning("skipping unreadable image %s (%s)", path, exc)
            continue
        images.append((_square(image, size) if size else image).permute(1, 2, 0).numpy())
        labels.append(label)
    if bad:
        log.warning("%d unreadable image(s) left out of the decoded cache", bad)
    shapes = sorted({im.shape for im in images})
    if len(shapes) > 1:
        raise DataError(f"images come in {len(shapes)} sizes ({shapes[0]}, {shapes[-1]}, ...); "
                        "pass a size to resize them all to one square")
    if not images:
        return np.zeros((0, size or 0, size or 0, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack(images), np.asarray(labels, np.int64)


def _cached_decode(samples: Sequence[Sample], classes: Sequence[str], cache_file: Path,
                   size: int | None, progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """Decoded (N x H x W x 3 uint8, labels), from ``cache_file`` when it matches these files and is fresh."""
    key = hashlib.sha1(f"{size}|{list(classes)}|{list(samples)}".encode()).hexdigest()
    folders = {os.path.dirname(path) for path, _ in samples}
    newest = max((os.stat(d).st_mtime for d in folders), default=0.0)
    if cache_file.is_file() and cache_file.stat().st_mtime >= newest:
        with np.load(cache_file) as cached:
            if str(cached["key"]) == key:
                return cached["images"], cached["labels"]
    images, labels = _decode(samples, size, f"decoding {cache_file.name}", progress)
    with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:  # a file object: numpy appends no ".npz"
        np.savez(f, images=images, labels=labels, classes=np.array(list(classes)), key=np.array(key))
    return images, labels


def decode_to_cache(root: str | Path, cache_file: str | Path, size: int | None = None, *,
                    progress: bool | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image of the ImageFolder ``root`` as (uint8 N x H x W x 3, int64 labels, class names).
    ``progress``: None or True, the images decoded so far (see the module's note); False, nothing."""
    samples, classes = scan_image_folder(root)
    images, labels = _cached_decode(samples, classes, Path(cache_file), size, progress)
    return images, labels, classes


def decode_subset(dataset: ImageFolderDataset, cache_file: str | Path, size: int | None = None, *,
                  progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A split from :func:`load_image_folder` as (uint8 N x C x H x W, int64 labels) for TensorLoader: what a
    training run on tiny images decodes first (~90 s for CIFAR-10), so it reports progress unless
    ``progress=False``, whatever the run's own ``--progress``."""
    images, labels = _cached_decode(dataset.samples, dataset.classes, Path(cache_file), size, progress)
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)
