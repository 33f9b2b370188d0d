"""The features file: one ``.npz`` holding descriptors, labels and where they came from.

Written by ``vggnet features`` and read by ``vggnet probe``. Everything is a plain array (strings as
unicode arrays), so it loads with ``allow_pickle=False``: a features file from someone else cannot run
code. Files are written through :func:`vggnet.atomic.atomic_path`, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from vggnet.atomic import atomic_path
from vggnet.errors import VggnetError

SPLITS = ("train", "val")
_REQUIRED = ("features", "labels", "classes", "paths", "split", "layer", "scales", "stack", "model")


class FeatureFileError(VggnetError, ValueError):
    """A features file that is malformed, or does not fit the file it is compared with."""


class FeatureFileNotFoundError(VggnetError, FileNotFoundError):
    """A features file the user named that is not there (still a FileNotFoundError)."""


@dataclasses.dataclass
class FeatureFile:
    """Descriptors of N images: ``features`` (N × D float32, each row L2-normalised), ``labels`` (N),
    ``classes`` (names of the label indices), ``paths`` (one per image), ``split`` ("train"/"val" per image),
    and the extraction settings: ``layer``, ``scales`` (pixels), ``stack`` (scales concatenated rather
    than averaged), ``model`` (architecture name), ``source`` (the checkpoint or weights file) and
    ``fingerprint`` (a hash of the weights: features of different networks must not meet in one model)."""

    features: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str]
    split: np.ndarray
    layer: str
    scales: list[int]
    stack: bool
    model: str
    source: str = ""
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.split = np.asarray(self.split, dtype=str).reshape(-1)
        n = len(self.features)
        if self.features.ndim != 2:
            raise FeatureFileError(f"features must be N x D, got shape {self.features.shape}")
        if not (len(self.labels) == len(self.paths) == len(self.split) == n):
            raise FeatureFileError(f"{n} feature rows but {len(self.labels)} labels, {len(self.paths)} paths and "
                                   f"{len(self.split)} split entries")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise FeatureFileError(f"labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes")
        bad = sorted(set(self.split.tolist()) - set(SPLITS))
        if bad:
            raise FeatureFileError(f"unknown split names {bad}; expected {', '.join(SPLITS)}")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def subset(self, split: str) -> FeatureFile:
        """The rows of one split (``train`` or ``val``)."""
        keep = self.split == split
        return dataclasses.replace(self, features=self.features[keep], labels=self.labels[keep],
                                   paths=[p for p, k in zip(self.paths, keep, strict=True) if k],
                                   split=self.split[keep])

    def describe(self) -> str:
        how = "stacked" if self.stack else "averaged"
        return f"{self.model} {self.layer} @ {','.join(map(str, self.scales))} px ({how}), {self.dim}-D"


def save_features(ff: FeatureFile, path: str | os.PathLike) -> Path:
    """Write ``ff`` to ``path`` (``.npz``) atomically."""
    path = Path(path)
    arrays = {
        "features": ff.features, "labels": ff.labels, "classes": np.asarray(ff.classes, dtype=str),
        "paths": np.asarray(ff.paths, dtype=str), "split": ff.split, "layer": np.asarray(ff.layer),
        "scales": np.asarray(ff.scales, dtype=np.int64), "stack": np.asarray(bool(ff.stack)),
        "model": np.asarray(ff.model), "source": np.asarray(ff.source), "fingerprint": np.asarray(ff.fingerprint),
    }
    with atomic_path(path, suffix=".tmp.npz") as tmp, open(tmp, "wb") as fh:  # a file object: no ".npz" added
        np.savez(fh, **arrays)
    return path


def load_features(path: str | os.PathLike) -> FeatureFile:
    """Read a features file written by :func:`save_features`; anything else is a :class:`FeatureFileError`."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileNotFoundError(f"features file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise FeatureFileError(f"{path} is not a readable .npz features file ({exc})") from exc
    missing = [key for key in _REQUIRED if key not in arrays]
    if missing:
        what = "labels" if "labels" in missing else ", ".join(missing)
        raise FeatureFileError(f"{path} lacks {what}: it was not written by `vggnet features` "
                               f"(needs {', '.join(_REQUIRED)})")
    try:
        return FeatureFile(
            features=arrays["features"], labels=arrays["labels"], classes=[str(c) for c in arrays["classes"]],
            paths=[str(p) for p in arrays["paths"]], split=arrays["split"], layer=str(arrays["layer"]),
            scales=[int(s) for s in arrays["scales"]], stack=bool(arrays["stack"]), model=str(arrays["model"]),
            source=str(arrays.get("source", "")), fingerprint=str(arrays.get("fingerprint", "")))
    except FeatureFileError as exc:
        raise FeatureFileError(f"{path}: {exc}") from exc
