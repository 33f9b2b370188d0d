"""Checkpoints (safetensors + the model's config) and loading of torchvision / timm VGG weights.

A vggnet checkpoint is a ``.safetensors`` file whose metadata holds the :class:`VGGConfig`
as JSON, so ``load_checkpoint(path)`` rebuilds the model without the user repeating the
architecture. Foreign state dicts are matched to our named layers by order of weighted
layer, which is how torchvision's ``features.N``/``classifier.N`` and timm's
``pre_logits.fc1``/``head.fc`` line up with ``block1_conv1`` … ``fc8``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vggnet.atomic import atomic_path
from vggnet.errors import VggnetError

from .heads import as_head_shape
from .vgg import VGG, VGGConfig

FORMAT = "vggnet"
FORMAT_VERSION = "1"
StateDict = dict[str, torch.Tensor]


# What torch.load raises for bytes that are not a weights-only torch file (fuzzed: truncated zips, random bytes,
# text, pickled code); anything else is a bug and keeps its traceback.
_TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, LookupError, ValueError, OSError, struct.error,
                      AssertionError)


class WeightsError(VggnetError, ValueError):
    """A weights file that cannot be read, or that does not fit the model."""


class WeightsNotFoundError(VggnetError, FileNotFoundError):
    """A weights file, checkpoint or run folder the user named that is not there (still a FileNotFoundError)."""


def save_checkpoint(model: VGG, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` through :func:`vggnet.atomic.atomic_path`: an interrupted save never corrupts ``path``.

    ``metadata`` (class names, preprocessing, training info...) must be JSON-serialisable.
    """
    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict())}
    meta["extra"] = json.dumps(dict(metadata or {}))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_weights(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[StateDict, dict[str, str]]:
    """A state dict and the file's metadata from a path (.safetensors, or a torch file read with
    ``weights_only=True``) or an in-memory mapping. Wrapped dicts (``{"state_dict": ...}``) are unwrapped."""
    if isinstance(source, Mapping):
        return _unwrap(dict(source), "<state dict>"), {}
    path = Path(source)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_LOAD_ERRORS as exc:
        try:  # a safetensors file under another suffix
            return _read_safetensors(path)
        except WeightsError:
            pass
        raise WeightsError(
            f"{path} is neither a safetensors file nor a weights-only torch file ({type(exc).__name__}: {exc})"
        ) from exc
    return _unwrap(obj, str(path)), {}


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from exc


def _unwrap(obj: Any, where: str) -> StateDict:
    for key in ("state_dict", "model", "model_state", "ema"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{where} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DDP-saved dicts


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """``vggnet``, ``torchvision`` or ``timm``, from the key names alone."""
    keys = set(state)
    if any(k.startswith("features.block1_conv1.") for k in keys):
        return "vggnet"
    if any(k.startswith("pre_logits.fc1.") for k in keys) and any(k.startswith("head.fc.") for k in keys):
        return "timm"
    if any(re.match(r"features\.\d+\.weight$", k) for k in keys) and any(k.startswith("classifier.") for k in keys):
        return "torchvision"
    raise WeightsError("unrecognised state dict: expected vggnet, torchvision or timm VGG keys "
                       f"(first keys: {sorted(keys)[:4]})")


_ORDER = {"features": 0, "classifier": 1, "pre_logits.fc1": 1, "pre_logits.fc2": 2, "head.fc": 3}


def _layer_order(prefix: str) -> tuple[int, int]:
    """Sort key restoring execution order of foreign layer prefixes (files may sort keys as text)."""
    group, _, index = prefix.rpartition(".")
    if index.isdigit():
        return _ORDER[group], int(index)
    return _ORDER[prefix], 0


def _group(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        layers.setdefault(prefix, {})[leaf] = value
    return layers


def _translate(model: VGG, state: StateDict, fmt: str) -> StateDict:
    """Rename a foreign state dict to ``model``'s keys, pairing weighted layers in order."""
    if fmt == "vggnet":
        return state
    source = _group(state)
    try:
        source_order = sorted(source, key=_layer_order)
    except KeyError as exc:
        raise WeightsError(f"unexpected layer {exc} in a {fmt} state dict") from exc
    target = _group(model.state_dict())
    target_order = list(target)
    if len(source_order) != len(target_order):
        raise WeightsError(
            f"the {fmt} weights have {len(source_order)} weighted layers but {model.config.name} "
            f"(head={model.config.head}) has {len(target_order)}: wrong architecture or BN variant?"
        )
    out: StateDict = {}
    for src, dst in zip(source_order, target_order, strict=True):
        for leaf, value in source[src].items():
            out[f"{dst}.{leaf}"] = value
    return out


def load_weights(model: VGG, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                 skip_classifier: bool = False) -> str:
    """Load vggnet, torchvision or timm VGG weights into ``model`` (format detected); returns the format.

    The fc and conv heads accept each other's weights (fc6 viewed as c×7×7 kernels). Any missing
    layer or shape mismatch raises :class:`WeightsError` naming the layer; nothing is half-loaded.
    ``skip_classifier`` leaves the last layer as it is (fine-tuning onto other classes): the file's
    last layer is still paired by position, so the rest of the architecture must match exactly.
    """
    state, _ = read_weights(source)
    fmt = detect_format(state)
    state = _translate(model, state, fmt)
    target = model.state_dict()
    if skip_classifier:
        prefix = f"head.{model.head.classifier}."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        target = {k: v for k, v in target.items() if not k.startswith(prefix)}
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise WeightsError(f"{fmt} weights do not fit {model.config.name} (head={model.config.head}): "
                           f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    ready: StateDict = {}
    for key, value in state.items():
        want = target[key].shape
        if value.shape != want and not key.startswith("head."):
            raise WeightsError(f"{key}: weights have shape {tuple(value.shape)}, model needs {tuple(want)} "
                               "(another configuration or width?)")
        try:
            ready[key] = as_head_shape(key, value, want)
        except ValueError as exc:
            raise WeightsError(f"{exc} (num_classes, width or fc_width differ?)") from exc
    model.load_state_dict(ready, strict=False)
    return fmt


def read_checkpoint(path: str | os.PathLike) -> tuple[VGGConfig, StateDict, dict[str, Any]]:
    """Config, weights and extra metadata of a vggnet checkpoint."""
    state, metadata = read_weights(path)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise WeightsError(f"{path} is not a vggnet checkpoint (no vggnet config in its metadata); "
                           "use create_model(name, weights=path) for torchvision or timm weights")
    try:
        config = VGGConfig.from_dict(json.loads(metadata["config"]))
        extra = json.loads(metadata.get("extra", "{}"))
    except (json.JSONDecodeError, TypeError) as exc:
        raise WeightsError(f"{path}: corrupt vggnet metadata ({exc})") from exc
    return config, state, extra


def load_checkpoint(path: str | os.PathLike) -> tuple[VGG, dict[str, Any]]:
    """Rebuild a model from a vggnet checkpoint alone; returns it with the checkpoint's extra metadata."""
    config, state, extra = read_checkpoint(path)
    model = VGG(config)
    load_weights(model, state)
    return model.eval(), extra


CHECKPOINT_NAMES = ("best.safetensors", "last.safetensors")
_REQUIRED_META = ("mean", "std", "image_size")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint a path names: a run folder's ``best.safetensors`` (else ``last``), or the file itself.

    Every consumer (eval, predict, export, serve) accepts a run folder, so the rule lives here once.
    """
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise WeightsNotFoundError(f"{path}: run folder without {' or '.join(CHECKPOINT_NAMES)}")
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint not found: {path}")
    return path


def checkpoint_meta(file: str | os.PathLike, model: VGG, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing a checkpoint needs at test time, checked: ``classes`` (None if not recorded),
    ``mean``, ``std``, ``image_size`` (the training crop), ``test_scale`` (the shorter side in px an image is
    resized to before the centre crop: the view it was validated at; ``image_size`` for checkpoints that do not
    record it), ``num_classes`` and ``in_channels``.

    A checkpoint without mean/std/crop cannot be used on raw images, so that is an error, not a guess.
    """
    missing = [key for key in _REQUIRED_META if key not in extra]
    if missing:
        raise WeightsError(f"{file}: the checkpoint metadata lacks {', '.join(missing)}; save it with "
                           "vggnet.save_checkpoint(model, path, {'classes': [...], 'mean': [...], 'std': [...], "
                           "'image_size': N})")
    classes = extra.get("classes")
    if classes is not None and len(classes) != model.config.num_classes:
        raise WeightsError(f"{file}: {len(classes)} class names for a {model.config.num_classes}-class model")
    size = int(extra["image_size"])
    scale = extra.get("test_scale")
    scale = size if scale is None else int(scale)
    if scale < size:
        raise WeightsError(f"{file}: test_scale {scale} px is smaller than the {size}-px crop (image_size)")
    return {"classes": None if classes is None else [str(c) for c in classes],
            "mean": [float(v) for v in extra["mean"]], "std": [float(v) for v in extra["std"]],
            "image_size": size, "test_scale": scale, "num_classes": model.config.num_classes,
            "in_channels": model.config.in_channels}
