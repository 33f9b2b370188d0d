"""Perceptual losses on a frozen VGG: feature (content) distances and Gram-matrix (style) distances.

Pixel losses punish a one-pixel shift as hard as a different image; distances between VGG activations
track what the image looks like instead (Johnson et al. 2016, "Perceptual Losses"), and distances between
the channel correlations of those activations (Gram matrices) track texture and style while ignoring where
things are (Gatys et al. 2016, "Image Style Transfer Using CNNs").
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vggnet.errors import UsageError

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models import VGG, checkpoint_file, load_checkpoint

__all__ = ["PerceptualLoss", "gram_matrix"]

INPUT_RANGES = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0)}
POOLS = ("max", "avg")
DISTANCES = {"mse": F.mse_loss, "l1": F.l1_loss}
DEFAULT_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """Channel correlations of a feature map: N×C×H×W -> N×C×C, ``F Fᵀ / (C·H·W)`` with F = f as N×C×(H·W).

    Summing over positions discards *where* a feature fires and keeps *which features fire together*,
    which is what style is. Dividing by C·H·W makes the entries means rather than sums, so a layer's
    style term does not grow with its width or with the image size: the same layer weights work at
    every resolution and layers of different widths contribute on one scale. Computed in at least fp32
    (autocast off) because the sum of H·W squared activations overflows fp16 on ordinary images.
    """
    if f.dim() != 4:
        raise ValueError(f"gram_matrix needs an N×C×H×W feature map, got shape {tuple(f.shape)}")
    n, c, h, w = f.shape
    with torch.autocast(f.device.type, enabled=False):
        flat = f.reshape(n, c, h * w)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def _parse_range(value: tuple[float, float] | str) -> tuple[float, float]:
    if isinstance(value, str):
        key = value.replace(" ", "").strip("()[]")
        if key not in INPUT_RANGES:
            raise UsageError(f"input_range {value!r} is not one of {', '.join(map(repr, INPUT_RANGES))} "
                             "(or a (low, high) pair)")
        return INPUT_RANGES[key]
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"input_range must be a (low, high) pair such as (0, 1) or (-1, 1), got {value!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"input_range needs finite low < high, got {value!r}")
    return low, high


def _as_names(names: Sequence[str] | str, what: str) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise UsageError(f"{what} must be layer names (strings), got {names!r}")
    return names


class PerceptualLoss(nn.Module):
    """``content_weight·Σ w_l d(F_l(x), F_l(t)) + style_weight·Σ v_l mean((G_l(x) − G_l(s))²)``.

    ``F_l`` is layer ``l`` of a frozen VGG (canonical names like ``block3_relu3`` or the aliases
    ``relu3_3`` / ``pool3`` / ``features.15`` / ``fc7``), ``d`` the mean squared (``mse``) or absolute
    (``l1``) difference and ``G_l`` the :func:`gram_matrix`. ``x`` is the input, ``t`` the target and
    ``s`` the style target (the target unless given; a batch of 1 is compared with every input).

    ``model`` is a :class:`VGG` (torchvision and timm weights load into one with ``create_model``) or the
    path of a vggnet checkpoint or run folder. Images come in ``input_range`` and are normalised here with
    ``mean``/``std``: a checkpoint's own when loaded from a path, else ImageNet's (what torchvision's
    weights expect). The network is a private, frozen copy of the layers up to the deepest one asked for.
    ``pool="avg"`` swaps every max-pool for an average pool, as Gatys et al. do for style transfer: a
    max-pool passes gradient to one pixel per window, an average pool to all four, so images optimised
    through it come out smoother, without the max-pool's grid artefacts.
    """

    def __init__(
        self,
        model: VGG | str | os.PathLike,
        layers: Sequence[str] = DEFAULT_LAYERS,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        style: Sequence[str] = (),
        style_weights: Sequence[float] | Mapping[str, float] | None = None,
        content_weight: float = 1.0,
        style_weight: float = 1.0,
        input_range: tuple[float, float] | str = (0, 1),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pool: str = "max",
        distance: str = "mse",
    ) -> None:
        super().__init__()
        extra: Mapping = {}
        if isinstance(model, (str, os.PathLike)):
            model, extra = load_checkpoint(checkpoint_file(model))
        elif not isinstance(model, VGG):
            raise TypeError(f"model must be a vggnet VGG or a checkpoint path, got {type(model).__name__}")
        if pool not in POOLS:
            raise UsageError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if distance not in DISTANCES:
            raise UsageError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.input_range = _parse_range(input_range)
        self.pool, self.distance = pool, distance
        self.content_weight, self.style_weight = float(content_weight), float(style_weight)
        self.in_channels = model.config.in_channels

        self.layers = _as_names(layers, "layers")
        self.style_layers = _as_names(style, "style")
        if not self.layers and not self.style_layers:
            raise UsageError("no layers: give content `layers`, `style` layers or both")
        order = [name for name, _ in model.named_layers()]
        feature_names = {name for name, _ in model.features.named_children()}
        self._canonical: dict[str, str] = {}  # name as asked -> canonical name
        for kind, names in (("layers", self.layers), ("style", self.style_layers)):
            seen: dict[str, str] = {}
            for name in names:
                canonical = model.resolve_layer(name)  # UsageError listing the valid names
                if canonical in seen:
                    raise UsageError(f"{kind}: {name!r} and {seen[canonical]!r} are the same layer ({canonical})")
                if kind == "style" and canonical not in feature_names:
                    raise UsageError(f"style layer {name!r} is in the head; a Gram matrix needs a conv feature "
                                     "map (pick a block layer such as relu3_3)")
                seen[canonical] = name
                self._canonical[name] = canonical
        self.layer_weights = self._weights(model, weights, self.layers, "weights")
        self.style_layer_weights = self._weights(model, style_weights, self.style_layers, "style_weights")

        # Only the layers up to the deepest one asked for: relu4_3 of VGG-16 needs 7.6M of its 138M
        # parameters (fc6 alone is 103M). Built from the caller's modules, then deep-copied, so the
        # caller's model is never touched and the rest of it is never copied.
        deepest = max(order.index(c) for c in self._canonical.values())
        self.net = copy.deepcopy(nn.Sequential(OrderedDict(model.named_layers()[:deepest + 1])))
        for name, module in list(self.net.named_children()):
            if pool == "avg" and isinstance(module, nn.MaxPool2d):
                setattr(self.net, name, nn.AvgPool2d(module.kernel_size, module.stride, module.padding,
                                                     ceil_mode=module.ceil_mode))
        for module in self.net.modules():
            if getattr(module, "inplace", False):  # a requested conv output must survive the next ReLU
                module.inplace = False
        self.net.requires_grad_(False)
        self.net.eval()

        mean = extra.get("mean", IMAGENET_MEAN) if mean is None else mean
        std = extra.get("std", IMAGENET_STD) if std is None else std
        param = next(self.net.parameters(), None)
        device = param.device if param is not None else None
        for key, value in (("mean", mean), ("std", std)):
            tensor = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
            if tensor.numel() != self.in_channels:
                raise UsageError(f"{key} has {tensor.numel()} values for a {self.in_channels}-channel model")
            if key == "std" and not bool((tensor > 0).all()):
                raise UsageError(f"std must be positive, got {value!r}")
            self.register_buffer(key, tensor.view(1, -1, 1, 1))

    def _weights(self, model: VGG, weights: Sequence[float] | Mapping[str, float] | None,
                 names: tuple[str, ...], what: str) -> tuple[float, ...]:
        if weights is None:
            return tuple(1.0 for _ in names)
        if isinstance(weights, Mapping):
            by_layer = {self._canonical[n]: n for n in names}
            out = dict.fromkeys(names, 1.0)  # layers left out of the mapping weigh 1
            for key, value in weights.items():
                canonical = model.resolve_layer(key)
                if canonical not in by_layer:
                    raise UsageError(f"{what} names {key!r}, which is not one of the layers {list(names)}")
                out[by_layer[canonical]] = float(value)
            return tuple(out[n] for n in names)
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(names):
            raise UsageError(f"{what} has {len(weights)} values for {len(names)} layers {list(names)}")
        return weights

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Switch the module's mode, but keep the network in eval mode.

        The loss must be a fixed function: in train mode BN would normalise with batch statistics (mixing
        input and target, which share one forward pass) and update its running stats, and dropout would
        make the loss random. An enclosing ``model.train()`` reaches this method, hence the override.
        """
        super().train(mode)
        self.net.eval()
        return self

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, style={self.style_layers}, pool={self.pool!r}, "
                f"distance={self.distance!r}, input_range={self.input_range}")

    def _check(self, x: torch.Tensor, what: str) -> None:
        if x.dim() != 4:
            raise ValueError(f"{what} must be an N×C×H×W batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{what} has {x.shape[1]} channels; the model takes {self.in_channels} "
                             f"(shape {tuple(x.shape)})")

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Canonical layer name -> activation of ``x`` (in ``input_range``), through the deepest layer."""
        low, high = self.input_range
        if (low, high) != (0.0, 1.0):
            x = (x - low) / (high - low)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        wanted = set(self._canonical.values())
        out = {}
        for name, module in self.net.named_children():
            x = module(x)
            if name in wanted:
                out[name] = x
        return out

    def _run_batched(self, xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Features of each tensor, with one forward pass per distinct C×H×W (a concatenated batch)."""
        groups: dict[torch.Size, list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(x.shape[1:], []).append(i)
        out: list[dict[str, torch.Tensor]] = [{} for _ in xs]
        for members in groups.values():
            joint = self._run(torch.cat([xs[i] for i in members]) if len(members) > 1 else xs[members[0]])
            sizes = [xs[i].shape[0] for i in members]
            for name, value in joint.items():
                for i, chunk in zip(members, value.split(sizes), strict=True):
                    out[i][name] = chunk
        return out

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The requested activations (content then style layers, keyed as asked) of ``x`` in ``input_range``."""
        self._check(x, "input")
        out = self._run(x)
        return {name: out[self._canonical[name]] for name in (*self.layers, *self.style_layers)}

    def components(self, input: torch.Tensor, target: torch.Tensor,
                   style_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each term, unweighted: ``{"content/relu3_3": d(...), "style/relu1_2": mean((ΔG)²), ...}``.

        ``forward`` is their weighted sum. Gradients reach ``input`` only: targets are constants.
        When no gradient is needed, input, target and style target share one forward pass (one
        concatenated batch, when their shapes allow); when one is, the input runs with autograd and the
        targets in a separate pass under ``no_grad``, so no activations are stored and no backward
        is spent on them.
        """
        self._check(input, "input")
        if target.shape != input.shape:
            raise ValueError(f"input and target shapes differ: input {tuple(input.shape)}, "
                             f"target {tuple(target.shape)}")
        xs = [input, target]
        if style_target is not None and self.style_layers:
            self._check(style_target, "style_target")
            if style_target.shape[0] not in (1, input.shape[0]):
                raise ValueError(f"style_target has batch size {style_target.shape[0]}; it must be 1 or the "
                                 f"input's ({input.shape[0]}) (input {tuple(input.shape)}, style_target "
                                 f"{tuple(style_target.shape)})")
            xs.append(style_target)
        grad = torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in self.parameters()))
        if grad:
            feats_x = self._run(input)
            with torch.no_grad():
                rest = self._run_batched(xs[1:])
        else:
            with torch.no_grad():
                feats_x, *rest = self._run_batched(xs)
        feats_t = rest[0]
        feats_s = rest[1] if len(rest) > 1 else feats_t

        d = DISTANCES[self.distance]
        out: dict[str, torch.Tensor] = {}
        for name in self.layers:
            c = self._canonical[name]
            out[f"content/{name}"] = d(feats_x[c], feats_t[c].to(feats_x[c].dtype))
        for name in self.style_layers:
            c = self._canonical[name]
            gx, gs = gram_matrix(feats_x[c]), gram_matrix(feats_s[c])
            out[f"style/{name}"] = F.mse_loss(gx, gs.to(gx.dtype).expand_as(gx))
        return out

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                style_target: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar loss; ``style_target`` defaults to ``target``. See :meth:`components`."""
        parts = self.components(input, target, style_target)
        total = input.new_zeros((), dtype=torch.float32)
        for name, w in zip(self.layers, self.layer_weights, strict=True):
            total = total + self.content_weight * w * parts[f"content/{name}"]
        for name, w in zip(self.style_layers, self.style_layer_weights, strict=True):
            total = total + self.style_weight * w * parts[f"style/{name}"]
        return total
