"""A checkpoint turned into something that answers "what is in these images?".

:class:`Predictor` owns the three things every deployment path shares — the checkpoint's preprocessing
(shorter side to the training crop, centre crop, mean/std), a :class:`Runtime` that maps a normalised
float32 NCHW batch to logits, and the class names — so ``vggnet predict``, the exporters and the HTTP
service give the same answer for the same image. Runtimes are interchangeable callables; the eager one
is here, faster ones register themselves in :data:`RUNTIMES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vggnet.models import VGG, checkpoint_file, checkpoint_meta, load_checkpoint

__all__ = ["RUNTIMES", "Preprocessing", "Predictor", "Runtime", "make_runtime", "preprocess", "register_runtime"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Preprocessing:
    """What travels with every exported model: how to turn an image into the network's input."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_channels: int
    num_classes: int
    classes: tuple[str, ...] | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocessing:
        classes = meta.get("classes")
        return cls(mean=tuple(meta["mean"]), std=tuple(meta["std"]), image_size=int(meta["image_size"]),
                   in_channels=int(meta["in_channels"]), num_classes=int(meta["num_classes"]),
                   classes=None if classes is None else tuple(classes))

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
        raise ValueError(f"an image with {image.shape[0]} channels for a {channels}-channel model")
    return image


def preprocess(images: Sequence[Image.Image | torch.Tensor], prep: Preprocessing) -> torch.Tensor:
    """The paper's single-scale test view (Q = training crop): shorter side to ``image_size``, centre
    crop, [0, 1], minus mean over std. uint8 tensors and PIL images give identical inputs."""
    out = []
    for image in images:
        x = _as_uint8_chw(image, prep.in_channels)
        x = TF.resize(x, prep.image_size, antialias=True)
        x = TF.center_crop(x, [prep.image_size, prep.image_size])
        x = TF.to_dtype(x, torch.float32, scale=True)
        out.append(TF.normalize(x, list(prep.mean), list(prep.std)))
    if not out:
        raise ValueError("no images to preprocess")
    return torch.stack(out)


class Runtime(Protocol):
    """Maps a normalised float32 N×C×H×W CPU batch to float32 logits N×classes on the CPU."""

    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class EagerRuntime:
    """The reference: the model as trained, fp32, NCHW, no graph capture."""

    name = "eager"

    def __init__(self, model: VGG) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


# name -> factory(model, prep, calibration batch or None, **options) -> Runtime
RuntimeFactory = Callable[..., Runtime]
RUNTIMES: dict[str, RuntimeFactory] = {"eager": lambda model, prep, calib=None, **_: EagerRuntime(model)}


def register_runtime(name: str, factory: RuntimeFactory) -> None:
    RUNTIMES[name] = factory


def make_runtime(name: str, model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None,
                 **options: Any) -> Runtime:
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(sorted(RUNTIMES))}")
    return RUNTIMES[name](model, prep, calib, **options)


class Predictor:
    """Preprocessing + runtime + labels. ``max_batch`` bounds one forward pass (memory, latency)."""

    def __init__(self, model: VGG | None, prep: Preprocessing, runtime: Runtime | str = "eager",
                 calib: torch.Tensor | None = None, max_batch: int = 32, **options: Any) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
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
            raise ValueError(f"expected a batch of shape N×{'×'.join(map(str, expected))}, got {tuple(x.shape)}")
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
