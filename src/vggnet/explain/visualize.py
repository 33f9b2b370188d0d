"""Pictures of what a VGG looks at: Grad-CAM overlays, first-layer filters, one image's feature maps.

Every grid is built as one numpy mosaic and drawn with a single ``imshow`` (64 sub-axes would cost seconds of
matplotlib layout); figures use the object API on Agg and are written atomically by
:func:`vggnet.plots.save_figure`, so this works headless and beside any pyplot state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from vggnet.errors import UsageError
from vggnet.models import VGG
from vggnet.plots import save_figure

from .gradcam import cam_box, evaluating, no_evidence, no_evidence_text, spatial_layers

__all__ = ["FeatureGrid", "feature_map_grid", "filter_grid", "first_conv", "mosaic", "overlay_figure",
           "save_feature_maps", "save_filter_grid", "save_overlay", "to_display"]


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A preprocessed C×H×W tensor back to an H×W×3 float image in [0, 1]: the crop the network actually saw,
    so the heat map lies on exactly the pixels it explains (not on the uncropped original)."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"expected one C×H×W image, got shape {tuple(x.shape)}")
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    image = (x.detach().float().cpu() * s + m).clamp(0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


def mosaic(tiles: np.ndarray, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """N tiles (N×h×w or N×h×w×3) laid out in a near-square grid, ``gap`` pixels of ``fill`` between them."""
    n, h, w = tiles.shape[:3]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, *tiles.shape[3:]), fill, dtype=np.float64)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = tile
    return out


def _minmax(tiles: np.ndarray) -> np.ndarray:
    """Each tile scaled to [0, 1] on its own: filters and maps differ in scale by orders of magnitude, and it is
    their pattern that is of interest. A constant tile becomes 0."""
    axes = tuple(range(1, tiles.ndim))
    low = tiles.min(axis=axes, keepdims=True)
    span = tiles.max(axis=axes, keepdims=True) - low
    return np.where(span > 0, (tiles - low) / np.where(span > 0, span, 1), 0.0)


def overlay_figure(image: np.ndarray, cam: torch.Tensor | np.ndarray, top: Sequence[tuple[str, float]] = (),
                   explained: str | None = None, layer: str | None = None, box_fraction: float | None = 0.5,
                   alpha: float = 0.5) -> Figure:
    """The input beside the input with the heat map over it; the title carries the top-k labels, so a map can be
    read against what the network believed (a confident wrong class explains a mistake). An all-zero map gets
    no box and a caption, "no positive evidence for ``explained`` at ``layer``", instead of a blank overlay."""
    heat = np.asarray(cam.detach().cpu() if isinstance(cam, torch.Tensor) else cam, dtype=np.float64)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"a {heat.shape} map for a {image.shape[:2]} image")
    fig = Figure(figsize=(7.2, 3.9), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image, interpolation="nearest")
    left.set_title("input (as the network saw it)", fontsize=9)
    right.imshow(image, interpolation="nearest")
    shown = right.imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
    label = f"Grad-CAM: {explained}" if explained is not None else "Grad-CAM"
    right.set_title(label + (f" @ {layer}" if layer else ""), fontsize=9)
    blank = no_evidence(heat)
    if blank:
        right.text(0.5, 0.5, no_evidence_text(explained, layer), transform=right.transAxes, ha="center",
                   va="center", wrap=True, fontsize=9, color="white",
                   bbox={"facecolor": "black", "alpha": 0.7, "edgecolor": "none"})
    if box_fraction and not blank:  # the box of an all-zero map would be the whole image: no region at all
        x0, y0, x1, y1 = cam_box(heat, box_fraction)
        right.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                                  linestyle="--", linewidth=1.2))
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.03)
    if top:
        fig.suptitle("  ·  ".join(f"{name} {100 * p:.1f}%" for name, p in top), fontsize=10)
    return fig


def save_overlay(path: str | Path, image: np.ndarray, cam: torch.Tensor | np.ndarray, **kwargs) -> Path:
    """:func:`overlay_figure` written as a PNG (atomically)."""
    return save_figure(overlay_figure(image, cam, **kwargs), Path(path))


def first_conv(model: VGG) -> tuple[str, nn.Conv2d]:
    for name, module in model.features.named_children():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError("the model has no convolution in its features")


def filter_grid(model: VGG) -> np.ndarray:
    """The first conv layer's filters as an H×W×3 mosaic in [0, 1] (gaps white), each filter min-max scaled.

    Only the first layer's filters are images in their own right (they act on pixels); an RGB model's are shown
    in colour, any other input depth as the mean over its input channels in grey.
    """
    _, conv = first_conv(model)
    w = conv.weight.detach().float().cpu().numpy()  # out×in×k×k
    tiles = w.transpose(0, 2, 3, 1) if w.shape[1] == 3 else np.repeat(w.mean(axis=1)[..., None], 3, axis=-1)
    return mosaic(_minmax(tiles), fill=1.0)


def save_filter_grid(model: VGG, path: str | Path) -> Path:
    name, conv = first_conv(model)
    fig = Figure(figsize=(6, 6.3), layout="constrained")
    ax = fig.subplots()
    ax.imshow(filter_grid(model), interpolation="nearest")
    ax.set_axis_off()
    k = conv.kernel_size
    ax.set_title(f"{name}: {conv.out_channels} filters ({k[0]}×{k[1]}), each min-max scaled", fontsize=10)
    return save_figure(fig, Path(path))


@dataclass(frozen=True)
class FeatureGrid:
    """A mosaic of activation maps (NaN in the gaps) and which channels it shows, in order."""

    grid: np.ndarray
    channels: list[int]
    total: int
    layer: str

    @property
    def note(self) -> str:
        if len(self.channels) == self.total:
            return f"all {self.total} channels"
        return f"{len(self.channels)} of {self.total} channels (the most active by mean)"


def feature_map_grid(model: VGG, image: torch.Tensor, layer: str, max_maps: int = 64) -> FeatureGrid:
    """One preprocessed image's activation maps at ``layer``, each min-max scaled, at most ``max_maps``.

    When capped, the channels with the highest mean activation are kept (in channel order): deep layers are
    mostly silent for any one image, and the first 64 channels would be mostly blank tiles.
    """
    if max_maps < 1:
        raise UsageError(f"max_maps must be at least 1, got {max_maps}")
    name = model.resolve_layer(layer)
    if name not in spatial_layers(model):
        raise UsageError(f"layer {name!r} gives a vector per image, not maps; choose one of: "
                         f"{', '.join(spatial_layers(model))}")
    x = image if image.dim() == 4 else image.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError(f"feature maps are drawn for one image, got a batch of {x.shape[0]}")
    param = next(model.parameters())
    with evaluating(model), torch.no_grad():
        maps = model.forward_intermediates(x.to(param.device, param.dtype), [name])[name][0].float().cpu().numpy()
    total = maps.shape[0]
    if total > max_maps:
        order = np.argsort(-maps.mean(axis=(1, 2)), kind="stable")
        keep = sorted(order[:max_maps].tolist())
    else:
        keep = list(range(total))
    return FeatureGrid(grid=mosaic(_minmax(maps[keep])), channels=keep, total=total, layer=name)


def save_feature_maps(model: VGG, image: torch.Tensor, layer: str, path: str | Path, max_maps: int = 64,
                      source: str | None = None) -> Path:
    fg = feature_map_grid(model, image, layer, max_maps)
    fig = Figure(figsize=(7, 7.4), layout="constrained")
    ax = fig.subplots()
    ax.imshow(fg.grid, cmap=matplotlib.colormaps["viridis"].with_extremes(bad="white"), vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    title = f"{fg.layer}: {fg.note}, each min-max scaled"
    ax.set_title(f"{source}\n{title}" if source else title, fontsize=10)
    return save_figure(fig, Path(path))
