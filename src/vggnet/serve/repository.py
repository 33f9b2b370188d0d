"""The model repository: which models and versions a server offers, and how each is batched and routed.

The layout follows Triton's, so whoever runs Triton knows it, and a checkpoint needs no conversion —
a version folder is simply a vggnet run folder (or any folder holding one ``.safetensors``), or a folder
holding one file written by ``vggnet export``::

    DIR/
      cifar10/                  model name = folder name (or ``name:`` in config.yaml)
        config.yaml             optional, see below
        1/                      version "1": best.safetensors, else last.safetensors, else the one *.safetensors
        2/                      version "2": model.int8.onnx (an exported file, run as exported)
      digits/
        3/

A version folder holds exactly one model: a run's checkpoint (best, else last), one ``.safetensors`` file,
or one exported file (``.onnx``, ``.pt2``, TorchScript ``.pt``, ExecuTorch ``.pte``, LiteRT ``.tflite``). Two of
them is an error rather than a guess, since which one the server picked would otherwise be known only from its
log. An exported file carries its own preprocessing and runtime (INT8 ones their calibration), so ``runtime`` and
``calib_data`` do not apply to it.

``config.yaml`` (every key optional; an unknown key is an error, so a misspelt one is never ignored)::

    name: cifar10               # served name, default: the folder name
    default_version: "1"        # used when a request names no version; default: the highest version
    ab: {"1": 0.9, "2": 0.1}    # weighted A/B split of unversioned requests (replaces default_version)
    shadow: ["3"]               # versions that also run on every answered request without answering: their
                                # predictions are stored (--store) beside the served one, for paired comparison
    max_batch_size: 16          # rows per forward pass, also the largest batch one request may send
    max_delay_ms: 5             # how long the first queued request waits for others to join its batch
    batching: true              # false: one request per forward pass
    max_queue: 256              # rows waiting before requests are refused with 503
    runtime: eager              # a name in vggnet.infer.RUNTIMES (eager, channels_last, bf16, onnx, auto...);
                                # checkpoints only: an exported file runs as exported
    calib_data: _calib/         # calibration images for int8, onnx-int8, auto (relative to the model folder)

Versions are folder names of letters, digits, ``._-``; all-numeric names sort numerically (so 10 > 9).
Folders starting with ``.`` or ``_`` are not versions (a model's ``_calib/`` images can live beside them).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vggnet.errors import UsageError
from vggnet.models import CHECKPOINT_NAMES, checkpoint_file

__all__ = ["EXPORTED_SUFFIXES", "ModelConfig", "ModelRepository", "VersionRouter", "exported_kind", "model_name_for",
           "sort_versions"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONFIG_KEYS = {"name", "default_version", "ab", "shadow", "max_batch_size", "max_delay_ms", "batching",
                "max_queue", "runtime", "calib_data"}
# What `vggnet export` writes, by suffix (vggnet.export.format_for's rule; the .int8.* files end the same).
_EXPORTED = {".onnx": "onnx", ".pt2": "pt2", ".pte": "executorch", ".tflite": "tflite"}
_TORCHSCRIPT = (".pt", ".ts", ".torchscript", ".jit")
EXPORTED_SUFFIXES = (*_EXPORTED, *_TORCHSCRIPT)


def sort_versions(versions: Iterable[str]) -> list[str]:
    """Numeric order when every version is an integer (Triton's convention), else lexicographic."""
    versions = list(versions)
    if all(v.isdigit() for v in versions):
        return sorted(versions, key=int)
    return sorted(versions)


def _check_name(kind: str, value: str, where: str) -> str:
    if not _NAME.match(value):
        raise UsageError(f"{where}: {kind} {value!r} must be letters, digits and . _ - (not starting with . _ -)")
    return value


def exported_kind(path: str | os.PathLike) -> str | None:
    """``"onnx"``, ``"pt2"``, ``"executorch"``, ``"tflite"`` or ``"torchscript"`` for a file of ``vggnet export``
    (INT8 or not: that is in its metadata, known once loaded), ``None`` for a checkpoint.

    ``.pt`` is both TorchScript's suffix and a common one for ``torch.save`` weights, which serve has always
    loaded as a checkpoint (weights only): only an archive holding TorchScript code counts as exported, so
    such a checkpoint keeps loading as before instead of being handed to ``torch.jit.load``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _EXPORTED:
        return _EXPORTED[suffix]
    if suffix in _TORCHSCRIPT and _holds_torchscript(path):
        return "torchscript"
    return None


def _holds_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/__torch__/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _version_checkpoint(folder: Path) -> Path:
    """A version folder's one model: a run folder's best/last, else its only ``.safetensors`` file, else its
    only exported file."""
    visible = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    exported = [p for p in visible if exported_kind(p)]
    # a run folder: best, else last, is one checkpoint; an export beside it makes two models
    if any((folder / name).is_file() for name in CHECKPOINT_NAMES):
        if not exported:
            return checkpoint_file(folder)
        candidates = [checkpoint_file(folder), *exported]
    else:
        candidates = [p for p in visible if p.suffix == ".safetensors"] + exported
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        hint = "; keep one, e.g. move an exported file into a version folder of its own" if candidates else ""
        raise UsageError(f"{folder}: a version folder needs {' or '.join(CHECKPOINT_NAMES)}, or exactly one "
                         f".safetensors file or exported model file ({', '.join(EXPORTED_SUFFIXES)}); "
                         f"found: {found}{hint}")
    return candidates[0]


def model_name_for(path: str | os.PathLike) -> str:
    """The name a single checkpoint is served under: its run folder's name (``runs/cifar10`` and
    ``runs/cifar10/best.safetensors`` are both ``cifar10``), else the file's stem."""
    path = Path(path).resolve()
    if path.is_file() and path.name in CHECKPOINT_NAMES:
        path = path.parent
    name = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name).lstrip("._-") or "model"


@dataclass(frozen=True)
class ModelConfig:
    """One served model: its versions (version → checkpoint or exported file), routing and batching overrides.

    ``None`` in a batching field means "the server's default" (:class:`~vggnet.serve.settings.ServeSettings`).
    """

    name: str
    versions: dict[str, Path]
    default_version: str
    ab: dict[str, float] = field(default_factory=dict)
    #: versions run on the same inputs as the answering one, never answering (shadow mode)
    shadow: tuple[str, ...] = ()
    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    batching: bool | None = None
    max_queue: int | None = None
    runtime: str | None = None
    calib_data: Path | None = None
    #: the model folder it was read from (None for a --ckpt model): a load through the API reads it again
    folder: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if not self.versions:
            raise UsageError(f"{where}: no versions")
        if self.default_version not in self.versions:
            raise UsageError(f"{where}: default_version {self.default_version!r} is not one of "
                             f"{', '.join(sort_versions(self.versions))}")
        for version, weight in self.ab.items():
            if version not in self.versions:
                raise UsageError(f"{where}: ab names version {version!r}, which is not one of "
                                 f"{', '.join(sort_versions(self.versions))}")
            if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
                raise UsageError(f"{where}: ab weight of version {version!r} must be a number >= 0, got {weight!r}")
        if self.ab and sum(self.ab.values()) <= 0:
            raise UsageError(f"{where}: ab weights sum to 0")
        for version in self.shadow:
            if version not in self.versions:
                raise UsageError(f"{where}: shadow names version {version!r}, which is not one of "
                                 f"{', '.join(sort_versions(self.versions))}")
            if version == self.default_version and not self.ab or self.ab.get(version, 0) > 0:
                raise UsageError(f"{where}: version {version!r} both answers and shadows; a shadow version must "
                                 "not be the default_version or have an ab weight")
        if self.max_batch_size is not None and (not isinstance(self.max_batch_size, int) or self.max_batch_size < 1):
            raise UsageError(f"{where}: max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if self.max_delay_ms is not None and (not isinstance(self.max_delay_ms, int | float) or self.max_delay_ms < 0):
            raise UsageError(f"{where}: max_delay_ms must be a number >= 0, got {self.max_delay_ms!r}")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 1):
            raise UsageError(f"{where}: max_queue must be an integer >= 1, got {self.max_queue!r}")
        if self.batching is not None and not isinstance(self.batching, bool):
            raise UsageError(f"{where}: batching must be true or false, got {self.batching!r}")

    @property
    def ordered_versions(self) -> list[str]:
        return sort_versions(self.versions)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> ModelConfig:
        """Read ``folder/config.yaml`` (optional) and every version sub-folder."""
        folder = Path(folder)
        config: dict[str, Any] = {}
        config_file = folder / "config.yaml"
        if config_file.is_file():
            try:
                loaded = yaml.safe_load(config_file.read_text()) or {}
            except yaml.YAMLError as exc:
                raise UsageError(f"{config_file}: not valid YAML: {exc}") from None
            if not isinstance(loaded, Mapping):
                raise UsageError(f"{config_file}: expected a mapping of settings")
            unknown = sorted(set(loaded) - _CONFIG_KEYS)
            if unknown:
                raise UsageError(f"{config_file}: unknown key(s) {', '.join(unknown)}; allowed: "
                                 f"{', '.join(sorted(_CONFIG_KEYS))}")
            config = dict(loaded)
        name = _check_name("model name", str(config.pop("name", folder.name)), str(folder))
        versions = {
            _check_name("version", sub.name, str(folder)): _version_checkpoint(sub)
            for sub in sorted(folder.iterdir()) if sub.is_dir() and not sub.name.startswith((".", "_"))
        }
        if not versions:
            raise UsageError(f"{folder}: model folder without version folders (e.g. {folder}/1/best.safetensors)")
        ab = config.pop("ab", None) or {}
        if not isinstance(ab, Mapping):
            raise UsageError(f"{config_file}: ab must map versions to weights, e.g. {{\"1\": 0.9, \"2\": 0.1}}")
        ab = {str(k): v for k, v in ab.items()}
        shadow = config.pop("shadow", None) or ()
        shadow = (shadow,) if isinstance(shadow, str | int) else shadow
        if not isinstance(shadow, list | tuple):
            raise UsageError(f"{config_file}: shadow must list versions, e.g. [\"2\"]")
        shadow = tuple(str(v) for v in shadow)
        if config.get("calib_data") is not None:
            config["calib_data"] = folder / str(config["calib_data"])  # relative paths: to the model folder
        default = config.pop("default_version", None)
        if default is None:  # the highest version that is not a shadow
            default = ([v for v in sort_versions(versions) if v not in shadow] or sort_versions(versions))[-1]
        return cls(name=name, versions=versions, default_version=str(default), ab=ab, shadow=shadow, folder=folder,
                   **config)

    @classmethod
    def single(cls, checkpoint: str | os.PathLike, name: str | None = None, version: str = "1",
               **overrides: Any) -> ModelConfig:
        """One checkpoint (run folder or file) or exported file as a one-version model, named after its run
        folder or file. A run folder means its checkpoint, even with exports beside it (``vggnet export``
        writes them there by default)."""
        file = checkpoint_file(checkpoint)
        name = _check_name("model name", name or model_name_for(checkpoint), str(checkpoint))
        return cls(name=name, versions={version: file}, default_version=version, **overrides)


@dataclass(frozen=True)
class ModelRepository:
    """The models one server offers, by name. ``root`` is the repository folder, if there is one."""

    models: dict[str, ModelConfig]
    root: Path | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError(f"{self.root or 'repository'}: no models")

    def new_model_folder(self, name: str) -> Path | None:
        """The folder ``root/name`` of a model that is not served yet (a load through the API serves it), or
        None: no repository folder, a name that is not a model folder's (checked first: it comes from a URL)."""
        if self.root is None or not _NAME.match(name) or not (self.root / name).is_dir():
            return None
        return self.root / name

    @classmethod
    def from_dir(cls, root: str | os.PathLike) -> ModelRepository:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"model repository not found: {root}")
        models: dict[str, ModelConfig] = {}
        for folder in sorted(root.iterdir()):
            if not folder.is_dir() or folder.name.startswith((".", "_")):
                continue
            config = ModelConfig.from_dir(folder)
            if config.name in models:
                raise UsageError(f"{root}: two models named {config.name!r}")
            models[config.name] = config
        return cls(models, root)

    @classmethod
    def from_checkpoints(cls, checkpoints: Iterable[str | os.PathLike], names: Iterable[str] | None = None,
                         **overrides: Any) -> ModelRepository:
        """Each checkpoint (run folder or file) as a one-version model; names default to the run folders."""
        checkpoints = list(checkpoints)
        names = list(names or [])
        if len(names) > len(checkpoints):
            raise UsageError(f"{len(names)} names for {len(checkpoints)} checkpoints")
        models: dict[str, ModelConfig] = {}
        for i, ckpt in enumerate(checkpoints):
            config = ModelConfig.single(ckpt, names[i] if i < len(names) else None, **overrides)
            if config.name in models:
                raise UsageError(f"two checkpoints would both be served as {config.name!r}; name them with --name")
            models[config.name] = config
        return cls(models)


class VersionRouter:
    """Which version serves a request that names none: the default, or a weighted A/B split.

    Smooth weighted round-robin (nginx's rule) rather than random draws: every window of requests
    gets the configured shares as exactly as integers allow (0.9 / 0.1 → exactly 1 in every 10), so
    a small canary sees traffic from the first requests on and tests are deterministic.
    Not thread-safe; the service calls it from its event loop only.
    """

    def __init__(self, default: str, weights: Mapping[str, float] | None = None) -> None:
        self.default = default
        self.weights = {v: float(w) for v, w in (weights or {}).items() if w > 0}
        self._current = dict.fromkeys(self.weights, 0.0)

    def choose(self) -> str:
        if not self.weights:
            return self.default
        total = sum(self.weights.values())
        for version, weight in self.weights.items():
            self._current[version] += weight
        chosen = max(self._current, key=self._current.__getitem__)
        self._current[chosen] -= total
        return chosen
