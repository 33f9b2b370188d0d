"""The paper's augmentation on top of ``torchvision.transforms.v2``: only what v2 lacks is written here.

VGG trains on a random 224 crop of an image whose *shorter side* is rescaled to S, with S fixed
(256 or 384) or jittered per image in [256, 512] (Sec. 3.1), plus flips and AlexNet's PCA colour
shift. v2 has crops, flips and normalisation but neither the isotropic scale jitter nor the PCA
lighting. A scale below 16 is a multiple of the crop and one from 16 up is pixels (the rule the test
protocols use too), so the same recipe works for 32-px images: ``scale=(1, 2)`` with ``crop=32`` is
S in [32, 64], ``scale=(256, 512)`` is pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vggnet.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNIT_STD = (1.0, 1.0, 1.0)  # the paper only subtracts the mean RGB
# AlexNet's eigen-decomposition of the ImageNet RGB covariance (pixels in [0, 1]).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
Scale = int | float | tuple[int | float, int | float]


class RandomIsotropicRescale(v2.Transform):
    """Resize so the shorter side is S ~ U{smin..smax} per call, keeping the aspect ratio (scale jitter)."""

    def __init__(self, smin: int, smax: int | None = None) -> None:
        super().__init__()
        smax = smin if smax is None else smax
        if not 0 < smin <= smax:
            raise UsageError(f"need 0 < smin <= smax, got smin={smin}, smax={smax}")
        self.smin, self.smax = int(smin), int(smax)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"size": int(torch.randint(self.smin, self.smax + 1, ()))}  # one S for image, boxes, masks

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=[params["size"]], antialias=True)


def _is_plain_tensor(x: Any) -> bool:
    return type(x) is torch.Tensor


class PCALighting(v2.Transform):
    """AlexNet's colour shift: add ``eigvec @ (alpha * eigval)``, alpha ~ N(0, alphastd), to every pixel.

    Expects a float image in [0, 1] (after ``v2.ToDtype(torch.float32, scale=True)``) because the
    eigenvalues were measured on that scale; uint8 input is refused rather than silently wrapped.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Video, PIL.Image.Image, _is_plain_tensor)

    def __init__(self, alphastd: float = 0.1, eigval: Sequence[float] = IMAGENET_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC) -> None:
        super().__init__()
        self.alphastd = float(alphastd)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        alpha = torch.randn(3) * self.alphastd
        return {"shift": self.eigvec @ (alpha * self.eigval)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point() or inpt.shape[-3] != 3:
            raise TypeError("PCALighting needs a float RGB tensor in [0, 1]; put "
                            "v2.ToDtype(torch.float32, scale=True) before it")
        out = inpt + params["shift"].to(inpt.device, inpt.dtype).view(3, 1, 1)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


RELATIVE_BELOW = 16  # a scale below this is a multiple of the crop; from it up, pixels


def scale_pixels(value: int | float, crop: int) -> int:
    """A scale in pixels. One rule for recipes, the tensor loader and the test protocols: a value below
    16 is a multiple of ``crop`` (no VGG input is under 32 px, so no real pixel count is lost), a value
    from 16 up is a whole number of pixels."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"scale {value!r} must be a positive finite number")
    if value < RELATIVE_BELOW:
        return max(1, round(value * crop))
    if value != int(value):
        raise UsageError(f"scale {value!r}: values of {RELATIVE_BELOW} and more are pixels and must be whole; "
                         f"values below {RELATIVE_BELOW} are multiples of the crop")
    return int(value)


def paper_train_transform(scale: Scale, crop: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = UNIT_STD, lighting: float = 0.1,
                          flip: bool = True) -> v2.Compose:
    """Sec. 3.1: shorter side S (fixed or jittered), random ``crop``, flip, PCA lighting, minus mean RGB."""
    smin, smax = scale if isinstance(scale, tuple | list) else (scale, scale)
    smin, smax = scale_pixels(smin, crop), scale_pixels(smax, crop)
    if smin < crop:
        raise UsageError(f"the smallest scale ({smin}) must be at least the crop ({crop})")
    steps: list[Any] = [v2.ToImage(), RandomIsotropicRescale(smin, smax), v2.RandomCrop(crop)]
    steps += [v2.RandomHorizontalFlip()] if flip else []
    steps += [v2.ToDtype(torch.float32, scale=True)]
    steps += [PCALighting(lighting)] if lighting > 0 else []
    return v2.Compose([*steps, v2.Normalize(list(mean), list(std))])


def eval_transform(q: int | float, crop: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = UNIT_STD) -> v2.Compose:
    """Test scale Q: shorter side to Q, then a centre ``crop`` (``None``: the whole image, for dense eval)."""
    steps: list[Any] = [v2.ToImage(), v2.Resize(scale_pixels(q, crop or 1), antialias=True)]
    steps += [v2.CenterCrop(crop)] if crop else []
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def small_image_train_transform(size: int = 32, pad: int = 4, cutout: int = 0,
                                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                                flip: bool = True) -> v2.Compose:
    """CIFAR-style: reflect-pad and crop back to ``size``, flip, normalise, then a ``cutout`` square."""
    crop = v2.RandomCrop(size, padding=pad, padding_mode="reflect", pad_if_needed=True)
    steps: list[Any] = [v2.ToImage(), crop]
    steps += [v2.RandomHorizontalFlip()] if flip else []
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if cutout:  # fixed area and ratio 1: RandomErasing then cuts a cutout x cutout square
        area = (cutout / size) ** 2
        steps.append(v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0))
    return v2.Compose(steps)
