"""Grad-CAM (Selvaraju et al., ICCV 2017): where in the image a VGG found the evidence for a class.

A layer's activations ``A`` (N×K×h×w) are weighted by the spatial mean of d(score)/dA per channel and summed;
ReLU keeps only what speaks *for* the class. The layers are run here one by one, rather than through hooks,
because VGG's ``ReLU(inplace=True)`` overwrites a conv's output tensor after a forward hook has seen it (the
"conv" activation silently becomes the rectified one, and so does its gradient), and a module backward hook
fails outright ("Output 0 of BackwardHookFunction is a view and is being modified inplace"). Running
the prefix without a graph and restarting autograd from a private leaf at the chosen layer avoids both, costs
no backward pass through the early layers, and leaves the model exactly as it was given (no inplace flags
flipped, no ``.grad`` on any parameter, every module's train/eval flag restored).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vggnet.errors import UsageError
from vggnet.models import VGG

__all__ = ["CAMResult", "cam_box", "default_cam_layer", "evaluating", "grad_cam", "grad_cam_raw", "no_evidence",
           "no_evidence_text", "spatial_layers", "upsample_cam"]

Target = int | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class CAMResult:
    """What one Grad-CAM pass knows: the maps at the layer's own resolution plus the logits it computed anyway,
    so a caller that also wants top-k labels does not pay for a second forward pass."""

    maps: torch.Tensor  # N×h×w, ReLU(Σ_k w_k A_k), not normalised
    targets: torch.Tensor  # N class indices that were explained
    logits: torch.Tensor  # N×classes, equal to model(x) in eval mode (detached)
    layer: str  # canonical layer name


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every module's own flag back: a model mid-training may hold some
    modules (frozen BN) in eval on purpose, so restoring ``model.train()`` wholesale would be wrong."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def spatial_layers(model: VGG) -> list[str]:
    """Canonical names of the layers whose output is still an image-shaped grid (N×C×h×w).

    Everything after a ``Flatten`` or ``Linear`` (the fc and gap heads' vectors) has no positions to
    highlight; the conv head keeps a grid all the way to its score map.
    """
    names = []
    for name, module in model.named_layers():
        if isinstance(module, (nn.Flatten, nn.Linear)):
            break
        names.append(name)
    return names


#: the smallest Grad-CAM grid the default layer may have: a 2x2 map (block 5 of a 32-px crop) is one blob
MIN_CAM_GRID = 4


def default_cam_layer(model: VGG, image_size: int | None = None) -> str:
    """The deepest conv ReLU whose map at ``image_size`` is at least :data:`MIN_CAM_GRID` a side.

    The last conv's ReLU (``block5_relu3`` for VGG-16) is the most class-specific grid, and rectified, as a Caffe
    VGG's ``conv5_3`` blob is (its ReLU runs in place): at 224 px it is 14x14 and is the default. At CIFAR's
    32 px block 5 is 2x2, one blob over the whole crop, so the default steps back to the last block whose map
    is 4x4 or finer (``block4_relu2`` for VGG-11 at 32 px). Without ``image_size`` it is the last ReLU. Named by
    position rather than as ``block5_conv3`` because VGG-11/13 end block 5 at ``conv2`` and VGG-19 at ``conv4``.
    """
    children = list(model.features.named_children())
    relus, pools = [], 0
    for name, module in children:
        if isinstance(module, nn.MaxPool2d):
            pools += 1
        elif isinstance(module, nn.ReLU):
            relus.append((name, pools))
    if not relus:  # not a VGG built by vggnet; the last feature layer is still a grid
        return children[-1][0]
    if image_size:
        fine = [name for name, before in relus if image_size >> before >= MIN_CAM_GRID]
        if fine:
            return fine[-1]
    return relus[-1][0]


def _resolve_spatial(model: VGG, layer: str | None, image_size: int | None = None) -> str:
    name = default_cam_layer(model, image_size) if layer is None else model.resolve_layer(layer)
    spatial = spatial_layers(model)
    if name not in spatial:
        raise UsageError(f"layer {name!r} gives a vector per image, not a grid of positions; Grad-CAM needs one "
                         f"of: {', '.join(spatial)}")
    return name


def _explicit_targets(target: Target, n: int, num_classes: int) -> torch.Tensor | None:
    """The asked-for classes as a LongTensor, checked before any compute so a typo costs nothing."""
    if target is None:
        return None
    if isinstance(target, (torch.Tensor, np.ndarray)):
        values = target.ravel().tolist() if target.ndim else [target.item()] * n
    elif isinstance(target, Sequence) and not isinstance(target, str):
        values = list(target)
    else:
        values = [target] * n
    if len(values) != n:
        raise UsageError(f"{len(values)} target classes for {n} images; give one per image, one int, or None")
    checked = []
    for value in values:
        try:
            if isinstance(value, bool):
                raise TypeError
            index = operator.index(value)
        except TypeError:
            raise UsageError(f"target class {value!r} is not an integer class index") from None
        if not 0 <= index < num_classes:
            raise UsageError(f"target class {index} is out of range: the model has {num_classes} classes "
                             f"(valid indices 0..{num_classes - 1})")
        checked.append(index)
    return torch.tensor(checked, dtype=torch.long)


def _as_batch(model: VGG, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError("images must be a preprocessed N×C×H×W (or C×H×W) tensor")
    x = images if images.dim() == 4 else images.unsqueeze(0)
    if x.shape[1] != model.config.in_channels:
        raise ValueError(f"images with {x.shape[1]} channels for a {model.config.in_channels}-channel model")
    param = next(model.parameters())
    return x.to(device=param.device, dtype=param.dtype)


def _logits_from(model: VGG, rest: list[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    """Finish the forward pass from the output of ``rest[0]`` (already applied) to the logits, with what the
    head's own ``forward`` adds: the conv head's spatial mean after its classifier, and ``logit_scale``."""
    head = model.head
    for i, (name, module) in enumerate(rest):
        if i:
            x = module(x)
        if name == head.classifier:
            x = head.reduce(x)
    scale = model.config.logit_scale
    return x if scale == 1 else x * scale


def grad_cam_raw(model: VGG, images: torch.Tensor, layer: str | None = None, target: Target = None) -> CAMResult:
    """Grad-CAM maps at ``layer``'s own resolution, unnormalised, with the logits and the explained classes.

    ``layer`` is any name :meth:`VGG.resolve_layer` accepts whose output is a grid (default:
    :func:`default_cam_layer` for the images' size);
    ``target`` is None (each image's top-1 class), one class index for all images, or one per image.
    """
    x = _as_batch(model, images)
    name = _resolve_spatial(model, layer, min(x.shape[-2:]))
    explicit = _explicit_targets(target, x.shape[0], model.config.num_classes)
    layers = model.named_layers()
    index = [n for n, _ in layers].index(name)
    # inference_mode(False): a caller inside torch.inference_mode() still gets gradients here.
    with evaluating(model), torch.inference_mode(False), torch.enable_grad():
        x = x.clone()  # an inference-mode tensor from the caller cannot enter autograd; a clone made here can
        with torch.no_grad():
            for _, module in layers[: index + 1]:
                x = module(x)
        activations = x.detach().requires_grad_(True)
        # The clone is what the next (possibly in-place) layer overwrites; ``activations`` stays as produced.
        logits = _logits_from(model, layers[index:], activations.clone())
        targets = explicit.to(logits.device) if explicit is not None else logits.argmax(1)
        score = logits.gather(1, targets[:, None]).sum()  # images are independent in eval mode
        (grads,) = torch.autograd.grad(score, activations)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    maps = F.relu((weights * activations.detach()).sum(1))
    return CAMResult(maps=maps, targets=targets.detach(), logits=logits.detach(), layer=name)


def upsample_cam(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Layer-resolution maps (N×h×w) bilinearly resized to ``size`` and divided by each map's maximum.

    Dividing by the peak (not min-max) keeps zero meaning "no evidence for the class here"; a map with no
    positive evidence anywhere stays all zero rather than becoming noise stretched to [0, 1].
    """
    up = F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    peak = up.amax(dim=(1, 2), keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.where(peak > 0, up / safe, torch.zeros_like(up)).clamp(0, 1)


def grad_cam(model: VGG, images: torch.Tensor, layer: str | None = None, target: Target = None) -> torch.Tensor:
    """Grad-CAM heat maps (N×H×W in [0, 1], peak 1, at the input's size) for preprocessed ``images``.

    ``layer`` defaults to :func:`default_cam_layer` for the images' size (VGG-16 at 224 px: ``block5_relu3`` =
    ``relu5_3``; any alias works,
    ``block5_conv3`` gives the pre-ReLU output). ``target``: None explains each image's top-1 class, an int
    the same class for all, a sequence one class per image. The model is left untouched.
    """
    result = grad_cam_raw(model, images, layer, target)
    return upsample_cam(result.maps, images.shape[-2:])


def no_evidence(cam_map: torch.Tensor | np.ndarray) -> bool:
    """True when a map holds no positive value: at that layer nothing in the image speaks *for* the class
    (every position's weighted evidence is against it or nil). Drawn as is, such a map is a blank overlay that
    looks like a failure to draw, so callers say it in words (:func:`no_evidence_text`)."""
    m = cam_map.detach() if isinstance(cam_map, torch.Tensor) else torch.as_tensor(np.asarray(cam_map))
    return not bool((m > 0).any())


def no_evidence_text(explained: str | None, layer: str | None) -> str:
    """The words for an all-zero map: "no positive evidence for CLASS at LAYER"."""
    return "no positive evidence" + (f" for {explained}" if explained else "") + (f" at {layer}" if layer else "")


def cam_box(cam_map: torch.Tensor | np.ndarray, fraction: float = 0.5) -> tuple[int, int, int, int]:
    """The box around the largest 4-connected region where the map is at least ``fraction`` × its maximum.

    Returned as pixel-edge ``(x0, y0, x1, y1)``: x1/y1 are exclusive, so the whole image is ``(0, 0, W, H)``
    and the width is ``x1 - x0``. The Grad-CAM paper's weak localisation uses such a box at 15 % of the peak;
    the largest region, not the one holding the peak, because one hot pixel is less of an object than a blob.
    Equal sizes go to the region met first in raster order. A map with no positive value gives the whole image.
    """
    from scipy import ndimage

    m = np.asarray(cam_map.detach().cpu() if isinstance(cam_map, torch.Tensor) else cam_map, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"cam_box needs one non-empty H×W map, got shape {m.shape}")
    if not 0 < fraction <= 1:
        raise UsageError(f"fraction must be in (0, 1], got {fraction}")
    if not np.isfinite(m).all():
        raise ValueError("the map holds NaN or infinite values")
    h, w = m.shape
    peak = m.max()
    if peak <= 0:
        return 0, 0, w, h
    labels, _ = ndimage.label(m >= fraction * peak)  # the default structure in 2-D is 4-connectivity
    best = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    ys, xs = np.nonzero(labels == best)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
