"""The paper's Appendix B descriptors: the net applied densely at several scales, as features for a
linear model.

For each test scale Q the image's shorter side is rescaled to Q and the whole image goes through the
network made fully convolutional (the fc head as convolutions, same weights), up to the requested
layer; that layer's map is averaged over positions, averaged with the map of the mirrored image, and
L2-normalised. Over scales the descriptors are averaged (the paper's choice for VOC) or stacked (its
choice for Caltech: a longer vector that lets the classifier weigh the scales), then L2-normalised
again so every descriptor has unit length. Conv layers work the same way (their maps are average
pooled); the paper used the penultimate layer, 4096-D ``relu7`` (Caffe's ``fc7`` blob, rectified in
place; here ``fc7`` is the layer's own, unrectified output).

Like ``evaluate``'s dense protocol, each rescaled image is trimmed to a multiple of 32 px around its
centre so max-pool flooring does not favour the top-left; images of the same rescaled size share a
forward pass.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vggnet.data import DataError, eval_transform, load_image_folder
from vggnet.errors import UsageError
from vggnet.evaluate import FolderImages, eval_images
from vggnet.evaluate.protocols import MIN_SIDE, image_tensor, resolve_scale, trim_to_stride
from vggnet.hardware import native_bf16
from vggnet.models import VGG, VGGConfig, checkpoint_file, checkpoint_meta, load_checkpoint, load_weights
from vggnet.models.pretrained import inspect_weights
from vggnet.progress import progress_bar

__all__ = ["dense_net", "extract_features", "feature_images", "fingerprint", "load_source"]


def dense_net(model: VGG, device: torch.device) -> VGG:
    """A private eval-mode copy with the fc head made convolutional (the caller's model is untouched)."""
    net = copy.deepcopy(model)
    if net.config.head == "fc":
        net.convert_head("conv")
    return net.eval().to(device)


def _descriptor(net: VGG, x: torch.Tensor, layer: str, flip: bool, bf16: bool) -> torch.Tensor:
    """The spatially averaged ``layer`` output of a batch (and of its mirror, averaged in), L2-normalised."""
    batch = torch.cat([x, x.flip(-1)]) if flip else x
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = net.forward_intermediates(batch, [layer])[layer].float()
    if out.dim() == 4:
        out = out.mean(dim=(2, 3))
    elif out.dim() != 2:
        raise UsageError(f"layer {layer!r} gives {out.dim()}-D outputs; pick a conv or head layer")
    if flip:
        out = (out[: len(x)] + out[len(x):]) / 2
    return F.normalize(out, dim=1)


def pixel_scales(scales: Sequence[float | int], crop: int) -> list[int]:
    """Test scales in pixels (below 16: multiples of ``crop``), each at least the 32 px a VGG needs."""
    if not scales:
        raise UsageError("give at least one scale")
    qs = [resolve_scale(q, int(crop)) for q in scales]
    small = [q for q in qs if q < MIN_SIDE]
    if small:
        raise UsageError(f"test scales {small} px are below the {MIN_SIDE} px a VGG needs")
    return qs


def extract_features(
    model: VGG,
    images: Sequence[Any],
    *,
    layer: str = "relu7",
    scales: Sequence[float | int] = (1.0,),
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    stack: bool = False,
    flip: bool = True,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp_bf16: bool | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors (N × D float32, unit rows) of ``images`` and a mask of the images that could be read.

    ``images`` are uint8 C×H×W tensors of any size (``None`` for an unreadable file: its row stays zero
    and its mask entry False). ``scales`` are test scales Q: below 16 a multiple of ``crop`` (the
    model's training crop), from 16 up pixels. ``stack`` concatenates the per-scale descriptors
    (D = layer width × scales) instead of averaging them.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    qs = pixel_scales(scales, crop)
    device = torch.device(device)
    net = dense_net(model, device)
    layer = net.resolve_layer(layer)  # an unknown name fails here, before any image is read
    bf16 = native_bf16(device) if amp_bf16 is None else bool(amp_bf16)
    transforms = {q: eval_transform(q, None, mean=list(mean), std=list(std)) for q in set(qs)}
    n, channels = len(images), len(mean)
    per_scale: list[torch.Tensor | None] = [None] * len(qs)
    readable = torch.zeros(n, dtype=torch.bool)
    with torch.inference_mode(), progress_bar(total=n, desc=f"features {layer}", unit="img", progress=progress,
                                              mininterval=0.5) as bar:
        for start in range(0, n, batch_size):
            window = [(i, image_tensor(images[i], channels)) for i in range(start, min(n, start + batch_size))]
            window = [(i, image) for i, image in window if image is not None]
            for i, _ in window:
                readable[i] = True
            for s, q in enumerate(qs):
                groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
                for i, image in window:
                    view = trim_to_stride(transforms[q](image).as_subclass(torch.Tensor), MIN_SIDE)
                    groups.setdefault(tuple(view.shape), []).append((i, view))
                for members in groups.values():
                    index = torch.tensor([i for i, _ in members])
                    x = torch.stack([v for _, v in members]).to(device)
                    out = _descriptor(net, x, layer, flip, bf16).cpu()
                    if per_scale[s] is None:
                        per_scale[s] = torch.zeros(n, out.shape[1])
                    per_scale[s][index] = out  # type: ignore[index]
            bar.update(min(n, start + batch_size) - start)
    if per_scale[0] is None:
        raise DataError("no image could be read")
    parts = [p for p in per_scale if p is not None]
    combined = torch.cat(parts, dim=1) if stack else torch.stack(parts).mean(0)
    return F.normalize(combined, dim=1) * readable.unsqueeze(1), readable


def load_source(ckpt: str | None = None, weights: str | None = None,
                name: str | None = None) -> tuple[VGG, dict[str, Any], str]:
    """The network to take features from, its preprocessing (``mean``, ``std``, ``image_size``) and the
    file it came from: a vggnet run folder / checkpoint (``ckpt``), or any VGG weights file (``weights``;
    the architecture is read from the tensors, or given as ``name``, e.g. ``vgg16``)."""
    if (ckpt is None) == (weights is None):
        raise UsageError("give either a vggnet checkpoint (--ckpt) or a weights file (--weights)")
    if ckpt is not None:
        if name is not None:
            raise UsageError("--model goes with --weights; a vggnet checkpoint names its own architecture")
        file = checkpoint_file(ckpt)
        model, extra = load_checkpoint(file)
        meta = checkpoint_meta(file, model, extra)
        return model, {k: meta[k] for k in ("mean", "std", "image_size")}, str(file)
    file = checkpoint_file(weights)
    state, info = inspect_weights(file)
    prep = info.preprocessing(str(file))
    config = {**info.config, "name": name or info.config["name"]}
    model = VGG(VGGConfig.from_dict(config))
    load_weights(model, state)
    return model.eval(), prep, str(file)


def fingerprint(model: VGG) -> str:
    """A short hash of the weights, so features of two different networks of one architecture (ImageNet
    VGG-16 and a fine-tuned VGG-16) are never mixed in one linear model, wherever their files lie."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _join(parts: list[Sequence[Any]]) -> Sequence[Any]:
    """Several image sequences as one, still read lazily: images are decoded only when described."""
    if all(isinstance(p, FolderImages) for p in parts):
        return FolderImages([path for p in parts for path in p.paths])  # type: ignore[attr-defined]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)  # type: ignore[arg-type]
    return [image for p in parts for image in p]


def feature_images(data: str | None, run: str | None, split: str = "all", val_fraction: float = 0.1,
                   seed: int = 0) -> tuple[Sequence[Any], list[int], list[str], list[str], list[str]]:
    """(images, labels, class names, paths, split names) to describe; files are read only when used.

    ``data`` is an ImageFolder tree: its own ``train/`` and ``val/`` folders when it has them, otherwise a
    stratified ``val_fraction`` split with ``seed`` (the rule training uses). Without ``data`` the run's
    own data (for the demo run, the embedded digits, split as in training). ``split`` is ``train``,
    ``val`` or ``all``.
    """
    if split not in ("train", "val", "all"):
        raise UsageError(f"split must be train, val or all, got {split!r}")
    wanted = ("train", "val") if split == "all" else (split,)
    parts: list[Sequence[Any]] = []
    labels: list[int] = []
    paths: list[str] = []
    names: list[str] = []
    classes: list[str] = []
    if data is None:
        if run is None:
            raise UsageError("give --data DIR (an ImageFolder tree: one folder per class)")
        for part in wanted:
            try:
                found, part_labels, classes = eval_images(run, None, part)
            except ValueError:
                if part == "val" and split == "all":
                    continue  # the run has no validation split: train rows only
                raise
            parts.append(found)
            labels += list(part_labels)
            paths += list(getattr(found, "paths", [f"{run}:{part}:{i}" for i in range(len(part_labels))]))
            names += [part] * len(part_labels)
        return _join(parts), labels, classes, paths, names
    train, val, classes = load_image_folder(data, val_fraction=val_fraction, seed=seed)
    for part, ds in (("train", train), ("val", val)):
        if part in wanted and ds is not None:
            part_paths = [p for p, _ in ds.samples]
            parts.append(FolderImages(part_paths))
            labels += list(ds.targets)
            paths += part_paths
            names += [part] * len(part_paths)
    if not labels:
        raise DataError(f"{data}: no {split} images (no val/ folder and val_fraction={val_fraction})")
    return _join(parts), labels, classes, paths, names
