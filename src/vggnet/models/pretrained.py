"""What a weights file holds, read before any model is built: the starting point of fine-tuning.

A vggnet checkpoint carries its config and preprocessing. A torchvision or timm VGG state dict does
not, but its tensors do: the sequence of conv shapes names the configuration (A, B, C, D or E) and
the width, BN running statistics say ``_bn``, and the first head layer gives the head kind and the
FC width. Those files were trained on ImageNet at 224 px with ImageNet's mean and std, which is
what a fine-tune should feed them, and validated at torchvision's view (shorter side 256, centre 224).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .configs import CONFIGS, NAME_TO_CONFIG
from .vgg import VGG, VGGConfig, scaled
from .weights import FORMAT, StateDict, WeightsError, detect_format, load_weights, read_weights

# torchvision's and timm's VGG weights were trained on ImageNet crops of 224 px, normalised thus (the
# same figures as vggnet.data.IMAGENET_MEAN/STD, repeated because the model zoo imports nothing of data), and
# evaluated at Resize(256) -> CenterCrop(224): test_scale 256 (torchvision's IMAGENET1K_V1 transforms, timm's
# crop_pct 0.875 = 224 / 256)
IMAGENET_PREPROCESSING = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "image_size": 224,
                          "test_scale": 256}
_LETTER_TO_NAME = {letter: name for name, letter in reversed(NAME_TO_CONFIG.items())}  # A -> vgg11, not vgg11_lrn


@dataclasses.dataclass
class WeightsInfo:
    """The architecture and preprocessing a weights file implies.

    ``config`` holds VGGConfig fields (``name``, ``width``, ``head``, ``fc_width``, ``in_channels``,
    ``num_classes``; a vggnet checkpoint gives all of them). ``classes`` is None when the file does not
    name its classes (torchvision, timm). ``mean``, ``std`` and ``image_size`` are None for a vggnet
    checkpoint saved without them: guessing ImageNet's would silently feed the net the wrong inputs.
    ``test_scale`` is the shorter side (px) of the view the weights were validated at (256 for torchvision /
    timm, the checkpoint's record for vggnet; None when a checkpoint does not record it: then the crop).
    A-LRN and A have the same tensors: a foreign file is read as A.
    """

    format: str
    config: dict[str, Any]
    mean: list[float] | None
    std: list[float] | None
    image_size: int | None
    classes: list[str] | None = None
    test_scale: int | None = None

    def preprocessing(self, where: str) -> dict[str, Any]:
        """``mean``, ``std`` and ``image_size``; an error naming ``where`` when the file lacks them."""
        pre = {"mean": self.mean, "std": self.std, "image_size": self.image_size}
        missing = [k for k, v in pre.items() if v is None]
        if missing:
            raise WeightsError(f"{where} does not record its {', '.join(missing)}; save it with "
                               "vggnet.save_checkpoint(model, path, {'mean': [...], 'std': [...], 'image_size': N})")
        return pre

    def describe(self) -> str:
        c = self.config
        width = "" if c.get("width", 1.0) == 1.0 else f" width {c['width']:g}"
        return f"{self.format} {c['name']}{width} (head {c['head']}, {c['num_classes']} classes)"


def inspect_weights(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[StateDict, WeightsInfo]:
    """The state dict of ``source`` and what it implies; a file that is no VGG raises :class:`WeightsError`."""
    state, metadata = read_weights(source)
    fmt = detect_format(state)
    if fmt == FORMAT and metadata.get("format") == FORMAT and "config" in metadata:
        try:
            config = VGGConfig.from_dict(json.loads(metadata["config"])).to_dict()
            extra = json.loads(metadata.get("extra", "{}"))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise WeightsError(f"{source}: corrupt vggnet metadata ({exc})") from exc
        classes = extra.get("classes")
        mean, std, size, scale = extra.get("mean"), extra.get("std"), extra.get("image_size"), extra.get("test_scale")
        return state, WeightsInfo(fmt, config, None if mean is None else [float(v) for v in mean],
                                  None if std is None else [float(v) for v in std], None if size is None else int(size),
                                  None if classes is None else [str(c) for c in classes],
                                  None if scale is None else int(scale))
    config = _infer_config(state, fmt)
    pre = IMAGENET_PREPROCESSING
    return state, WeightsInfo(fmt, config, list(pre["mean"]), list(pre["std"]), int(pre["image_size"]),
                              test_scale=int(pre["test_scale"]))


def _conv_weights(state: StateDict, fmt: str) -> list[torch.Tensor]:
    """The conv kernels of the feature extractor in execution order."""
    if fmt == FORMAT:
        pattern = re.compile(r"features\.block(\d+)_conv(\d+)\.weight")
        found = [(tuple(map(int, m.groups())), v) for k, v in state.items() if (m := pattern.fullmatch(k))]
    else:
        pattern = re.compile(r"features\.(\d+)\.weight")
        found = [((int(m.group(1)),), v) for k, v in state.items() if (m := pattern.fullmatch(k)) and v.dim() == 4]
    return [v for _, v in sorted(found, key=lambda item: item[0])]


def _infer_config(state: StateDict, fmt: str) -> dict[str, Any]:
    convs = _conv_weights(state, fmt)
    if not convs:
        raise WeightsError(f"no conv layers found in the {fmt} weights")
    shapes = [(int(w.shape[0]), int(w.shape[-1])) for w in convs]
    width = shapes[0][0] / 64
    letter = None
    for candidate, table in CONFIGS.items():
        entries = [e if isinstance(e, tuple) else (e, 3) for e in table if e not in ("M", "LRN")]
        if [(scaled(int(c), width), k) for c, k in entries] == shapes and candidate in _LETTER_TO_NAME:
            letter = candidate
            break
    if letter is None:
        raise WeightsError(f"the {fmt} weights' conv layers {shapes} match none of the paper's configurations "
                           "(A, B, C, D, E) at any width")
    bn = any(k.endswith("running_mean") for k in state)
    name = _LETTER_TO_NAME[letter] + ("_bn" if bn else "")
    in_channels = int(convs[0].shape[1])
    if fmt == "torchvision":
        fc6, fc8 = state.get("classifier.0.weight"), state.get("classifier.6.weight")
        head = "fc"
    elif fmt == "timm":
        fc6, fc8 = state.get("pre_logits.fc1.weight"), state.get("head.fc.weight")
        head = "conv"
    else:  # a bare vggnet state dict (no metadata): the head's own keys say which it is
        fc6 = state.get("head.fc6.weight")
        fc8 = state.get("head.fc8.weight", state.get("head.fc.weight"))
        head = "gap" if fc6 is None else ("conv" if fc6.dim() == 4 else "fc")
    if fc8 is None:
        raise WeightsError(f"the {fmt} weights have no classifier layer")
    config = {"name": name, "width": width, "head": head, "in_channels": in_channels,
              "num_classes": int(fc8.shape[0])}
    if fc6 is not None:
        config["fc_width"] = int(fc6.shape[0])
    return config


def load_backbone(model: VGG, state: Mapping[str, torch.Tensor], keep_classifier: bool = True) -> bool:
    """Load every layer of ``state`` into ``model``; the last layer too when ``keep_classifier`` and its
    shape fits (same class count), otherwise it is re-initialised as :meth:`VGG.reset_classifier` does.
    Returns whether the classifier was loaded. A backbone that does not match is a :class:`WeightsError`
    naming the layer."""
    if keep_classifier:
        try:
            load_weights(model, state)
            return True
        except WeightsError:
            pass  # the classifier does not fit (other class count), or the backbone does not: see below
    load_weights(model, state, skip_classifier=True)
    model.reset_classifier(model.config.num_classes)
    return False
