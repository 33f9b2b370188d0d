"""A checkpoint turned into something that answers "what is in these images?".

:class:`Predictor` owns the three things every deployment path shares — the checkpoint's preprocessing
(shorter side to the checkpoint's test scale, centre crop of the training crop, mean/std), a :class:`Runtime`
that maps a normalised float32 NCHW batch to logits, and the class names — so ``vggnet predict``, the
exporters and the HTTP service give the same answer for the same image. Runtimes are interchangeable
callables; the eager one is here (on the CPU, or on a CUDA device with bf16 / fp16 autocast), faster CPU
ones register themselves in :data:`RUNTIMES`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vggnet.errors import UsageError
from vggnet.hardware import inference_dtype, resolve_device
from vggnet.models import VGG, checkpoint_file, checkpoint_meta, load_checkpoint

__all__ = ["RUNTIMES", "Preprocessing", "Predictor", "Runtime", "check_cpu_only", "make_runtime", "placement",
           "preprocess", "register_runtime"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Preprocessing:
    """What travels with every exported model: how to turn an image into the network's input.

    ``test_scale`` is the shorter side (px) an image is resized to before the centre ``image_size`` crop: the
    view the checkpoint was validated at (the middle of a scale-jitter range, torchvision's 256 for 224 crops).
    ``None`` (checkpoints and exports from before it was recorded) means ``image_size``.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_channels: int
    num_classes: int
    classes: tuple[str, ...] | None = None
    test_scale: int | None = None

    def __post_init__(self) -> None:
        scale = self.image_size if self.test_scale is None else int(self.test_scale)
        if scale < self.image_size:
            raise UsageError(f"test_scale {scale} px is smaller than the {self.image_size}-px crop")
        object.__setattr__(self, "test_scale", scale)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocessing:
        classes, scale = meta.get("classes"), meta.get("test_scale")
        return cls(mean=tuple(meta["mean"]), std=tuple(meta["std"]), image_size=int(meta["image_size"]),
                   in_channels=int(meta["in_channels"]), num_classes=int(meta["num_classes"]),
                   classes=None if classes is None else tuple(classes),
                   test_scale=None if scale is None else int(scale))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def label(self, index: int) -> str:
        return self.classes[index] if self.classes else str(index)


def _as_uint8_chw(image: Image.Image | torch.Tensor, channels: int) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    elif not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"expected a PIL image or a C×H×W tensor, got {type(image).__name__}")
    if image.shape[0] == 1 and channels == 3:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 3 and channels == 1:
        image = TF.rgb_to_grayscale(image)
    if image.shape[0] != channels:
        raise UsageError(f"an image with {image.shape[0]} channels for a {channels}-channel model")
    return image


def preprocess(images: Sequence[Image.Image | torch.Tensor], prep: Preprocessing) -> torch.Tensor:
    """The paper's single-scale test view: shorter side to Q = ``test_scale`` (the training crop for checkpoints
    that do not record one), centre crop of ``image_size``, [0, 1], minus mean over std; ``vggnet eval``'s
    ``single@Q`` protocol. uint8 tensors and PIL images give identical inputs."""
    out = []
    for image in images:
        x = _as_uint8_chw(image, prep.in_channels)
        x = TF.resize(x, prep.test_scale, antialias=True)
        x = TF.center_crop(x, [prep.image_size, prep.image_size])
        x = TF.to_dtype(x, torch.float32, scale=True)
        out.append(TF.normalize(x, list(prep.mean), list(prep.std)))
    if not out:
        raise UsageError("no images to preprocess")
    return torch.stack(out)


class Runtime(Protocol):
    """Maps a normalised float32 N×C×H×W CPU batch to float32 logits N×classes on the CPU."""

    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def placement(device: str | torch.device | None = None,
              precision: str | None = None) -> tuple[torch.device, torch.dtype | None]:
    """Where and in what the eager runtime runs: (device, autocast dtype or None for fp32), checked up front by
    :mod:`vggnet.hardware`, the rule ``vggnet eval`` and training use. ``device=None`` is the CPU here (the
    inference default, unlike ``eval``'s "CUDA when available"); ``precision=None`` is fp32."""
    dev = resolve_device(device or "cpu")
    return dev, inference_dtype(precision, dev)


def check_cpu_only(what: str, device: str | torch.device | None, precision: str | None) -> None:
    """Refuse a device or precision for something that runs on the CPU in its own precision (a CPU runtime such
    as int8 or onnx, an exported file): a flag that would be silently ignored is an error instead."""
    dev = torch.device(device or "cpu")
    if dev.type != "cpu":
        raise UsageError(f"{what} runs on the CPU only, so --device {device} cannot apply; use the eager runtime "
                         "of a checkpoint (.safetensors or run folder) to run on a GPU")
    if precision not in (None, "fp32"):
        raise UsageError(f"{what} runs in its own precision, so --precision {precision} cannot apply; on the CPU "
                         "use --runtime bf16 (a checkpoint), or the eager runtime with --precision")


class EagerRuntime:
    """The reference: the model as trained, NCHW, no graph capture; fp32 on the CPU by default, or on ``device``
    (a CUDA GPU) under ``autocast`` (bf16 / fp16). Takes and returns CPU tensors, as every runtime does. Off the
    CPU it runs a copy, so the caller's model stays where it was (Grad-CAM and the like keep working on it)."""

    name = "eager"

    def __init__(self, model: VGG, device: str | torch.device = "cpu", autocast: torch.dtype | None = None) -> None:
        self.device, self.autocast = torch.device(device), autocast
        on_device = all(p.device == self.device for p in model.parameters())
        self.model = (model if on_device else copy.deepcopy(model).to(self.device)).eval()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        amp = contextlib.nullcontext() if self.autocast is None else torch.autocast(self.device.type, self.autocast)
        with amp:
            out = self.model(x)
        return out.float().cpu()


def _eager(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, *,
           device: str | torch.device | None = None, precision: str | None = None, **_: Any) -> Runtime:
    return EagerRuntime(model, *placement(device, precision))


# name -> factory(model, prep, calibration batch or None, **options) -> Runtime
RuntimeFactory = Callable[..., Runtime]
RUNTIMES: dict[str, RuntimeFactory] = {"eager": _eager}


def register_runtime(name: str, factory: RuntimeFactory) -> None:
    RUNTIMES[name] = factory


def make_runtime(name: str, model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None,
                 **options: Any) -> Runtime:
    """The runtime ``name`` for ``model``. ``device`` / ``precision`` options (see :func:`placement`) are for the
    eager runtime; the others run on the CPU and refuse them."""
    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {name!r}; choose from {', '.join(sorted(RUNTIMES))}")
    if name != "eager":
        check_cpu_only(f"runtime {name}", options.pop("device", None), options.pop("precision", None))
    return RUNTIMES[name](model, prep, calib, **options)


class Predictor:
    """Preprocessing + runtime + labels. ``max_batch`` bounds one forward pass (memory, latency)."""

    def __init__(self, model: VGG | None, prep: Preprocessing, runtime: Runtime | str = "eager",
                 calib: torch.Tensor | None = None, max_batch: int = 32, **options: Any) -> None:
        if max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {max_batch}")
        if model is None and isinstance(runtime, str):  # an exported file: a Runtime object and no nn.Module
            raise ValueError("a runtime given by name needs the model; pass a Runtime object to run without one")
        self.model, self.prep, self.max_batch = None if model is None else model.eval(), prep, max_batch
        self.runtime = make_runtime(runtime, model, prep, calib, **options) if isinstance(runtime, str) else runtime
        self.source: Path | None = None

    @classmethod
    def from_checkpoint(cls, path: PathLike, runtime: Runtime | str = "eager", **kwargs: Any) -> Predictor:
        """From a run folder (best, else last checkpoint) or a ``.safetensors`` file."""
        file = checkpoint_file(path)
        model, extra = load_checkpoint(file)
        predictor = cls(model, Preprocessing.from_meta(checkpoint_meta(file, model, extra)), runtime, **kwargs)
        predictor.source = file
        return predictor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an already preprocessed batch, run in chunks of ``max_batch``."""
        expected = (self.prep.in_channels, self.prep.image_size, self.prep.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise UsageError(f"expected a batch of shape N×{'×'.join(map(str, expected))}, got {tuple(x.shape)}")
        x = x.float().contiguous()
        return torch.cat([self.runtime(chunk) for chunk in x.split(self.max_batch)])

    def probabilities(self, images: Sequence[Image.Image | torch.Tensor]) -> torch.Tensor:
        return self.logits(preprocess(images, self.prep)).softmax(1)

    def predict(self, images: Sequence[Image.Image | torch.Tensor], topk: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k ``(label, probability)`` per image, most likely first."""
        probs = self.probabilities(images)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        return [[(self.prep.label(int(i)), float(v)) for v, i in zip(vs, ids, strict=True)]
                for vs, ids in zip(values, indices, strict=True)]
