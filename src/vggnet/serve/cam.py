"""Grad-CAM over HTTP (``POST /explain``): the checks made before a request's body is read, the job the model
version's worker runs, and the answer as a PNG overlay or a JSON map.

The heat map is :func:`vggnet.explain.grad_cam_raw` on the checkpoint's own model (fp32, whatever runtime serves
its predictions: the runtimes work on copies), for the crop the network saw — the same preprocessing as
``/predict``. An exported file (ONNX, ``.pt2``, TorchScript) runs without gradients and without named layers,
so it cannot be explained: 501 with a message that says so. ``vggnet.explain`` (and matplotlib, for the colour
map) is imported on first use, or while a checkpoint loads (:func:`preload`), never by ``import vggnet.serve``.
"""

from __future__ import annotations

import io
import json
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vggnet.infer import Preprocessing

from .errors import ServeError, bad_request

__all__ = ["CamOutput", "ExplainSpec", "display_side", "parse_spec", "preload", "render", "run_cam", "where"]

#: the side (pixels) an overlay is drawn at, at least: a 32-px CIFAR crop is upscaled by a whole factor to 224
MIN_SIDE = 224
#: how much of the heat map's colour covers the image: ALPHA[0] where the map is 0, ALPHA[1] at its peak, so
#: the picture stays readable where the class found no evidence
ALPHA = (0.25, 0.65)
FORMATS = ("png", "json")


@dataclass(frozen=True)
class ExplainSpec:
    """What one request asked for, checked: the class (None: the top-1), the canonical layer, the answer's format."""

    target: int | None
    layer: str
    fmt: str


@dataclass(frozen=True)
class CamOutput:
    maps: torch.Tensor  # 1×h×w at the layer's resolution, unnormalised, on the CPU
    target: int
    probabilities: torch.Tensor  # classes, softmax of the logits the pass computed
    layer: str


def preload() -> None:
    """Import Grad-CAM and its colour map now (about a second) rather than in the first request."""
    import matplotlib  # noqa: F401

    import vggnet.explain.gradcam  # noqa: F401


def _class_index(text: str, prep: Preprocessing) -> int:
    classes = list(prep.classes or ())
    if text in classes:
        return classes.index(text)
    try:
        index = int(text)
    except ValueError:
        shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise bad_request(f"unknown class {text!r}: give a class index (0..{prep.num_classes - 1})"
                          + (f" or a name ({shown})" if classes else "")) from None
    if not 0 <= index < prep.num_classes:
        raise bad_request(f"class {index} is out of range: the model has {prep.num_classes} classes "
                          f"(0..{prep.num_classes - 1})")
    return index


def parse_spec(model: torch.nn.Module | None, prep: Preprocessing, params: Mapping[str, str], accept: str | None,
               what: str) -> ExplainSpec:
    """``?class=&layer=&format=`` checked against the model before the body is read (a typo costs nothing).

    ``model`` None (an exported file) is 501; ``what`` names the model version in that message. The format is
    ``format=png|json``, else JSON when the ``Accept`` header asks for it and not for PNG, else PNG.
    """
    if model is None:
        raise ServeError(501, f"Grad-CAM is not available for {what}: it is an exported file, which runs without "
                              "the gradients and named layers Grad-CAM needs; serve the checkpoint it was exported "
                              "from to explain its predictions")
    from vggnet.explain.gradcam import default_cam_layer, spatial_layers

    text = params.get("class")
    target = None if text is None or text == "" else _class_index(text, prep)
    layer_text = params.get("layer") or None
    if layer_text is None:
        layer = default_cam_layer(model, prep.image_size)
    else:
        try:
            layer = model.resolve_layer(layer_text)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        spatial = spatial_layers(model)
        if layer not in spatial:
            raise bad_request(f"layer {layer!r} gives a vector per image, not a grid of positions; Grad-CAM needs "
                              f"one of: {', '.join(spatial)}")
    fmt = (params.get("format") or "").lower()
    if not fmt:
        accepted = (accept or "").lower()
        fmt = "json" if "application/json" in accepted and "image/png" not in accepted else "png"
    if fmt not in FORMATS:
        raise bad_request(f"format must be png or json, got {params.get('format')!r}")
    return ExplainSpec(target=target, layer=layer, fmt=fmt)


def run_cam(model: torch.nn.Module, x: torch.Tensor, spec: ExplainSpec) -> CamOutput:
    """The job for the model's worker: one Grad-CAM pass (forward, backward from the layer) on a 1×C×S×S batch."""
    from vggnet.explain.gradcam import grad_cam_raw

    result = grad_cam_raw(model, x, spec.layer, spec.target)
    return CamOutput(maps=result.maps.detach().float().cpu(), target=int(result.targets[0]),
                     probabilities=result.logits[0].float().softmax(0).cpu(), layer=result.layer)


def where(maps: torch.Tensor) -> str:
    """Where the map peaks, in words ("at the top left", "in the centre"): the overlay's alt text."""
    h, w = maps.shape[-2:]
    flat = int(maps.reshape(-1, h * w)[0].argmax())
    row, col = (flat // w) * 3 // h, (flat % w) * 3 // w
    rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
    if (row, col) == (1, 1):
        return "in the centre"
    if row == 1:
        return f"at the {cols[col]}"
    if col == 1:
        return f"at the {rows[row]}"
    return f"at the {rows[row]} {cols[col]}"


def display_side(image_size: int) -> int:
    """The overlay's side: the crop's, times the whole factor that brings it to at least :data:`MIN_SIDE`."""
    return image_size * max(1, math.ceil(MIN_SIDE / image_size))


def _overlay_png(x: torch.Tensor, prep: Preprocessing, maps: torch.Tensor) -> bytes:
    import matplotlib

    from vggnet.explain.gradcam import upsample_cam
    from vggnet.explain.visualize import to_display

    side = display_side(prep.image_size)
    base = Image.fromarray((to_display(x[0], prep.mean, prep.std) * 255 + 0.5).astype(np.uint8))
    base = np.asarray(base.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    heat = upsample_cam(maps, (side, side))[0].numpy()
    colours = matplotlib.colormaps["jet"](heat)[..., :3].astype(np.float32)
    alpha = (ALPHA[0] + (ALPHA[1] - ALPHA[0]) * heat)[..., None]
    mixed = (1 - alpha) * base + alpha * colours
    buf = io.BytesIO()
    Image.fromarray((mixed.clip(0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def render(out: CamOutput, x: torch.Tensor, prep: Preprocessing, spec: ExplainSpec, model_name: str,
           model_version: str) -> tuple[bytes, str, dict[str, str]]:
    """The answer: (body, media type, headers). PNG: the heat map over the crop the network saw, at
    :func:`display_side` pixels, the explained class in ``X-Explained-Class`` (index), ``X-Explained-Label``
    (percent-encoded), ``X-Explained-Probability``, the layer in ``X-Layer`` and its grid in ``X-Layer-Shape``
(``7x7``). JSON: the same facts and
    ``map``, the heat map over the crop at the crop's resolution (rows of values in [0, 1], peak 1)."""
    label = prep.label(out.target)
    probability = float(out.probabilities[out.target])
    headers = {"x-model-version": model_version, "x-explained-class": str(out.target),
               "x-explained-label": urllib.parse.quote(label, safe=""),
               "x-explained-probability": f"{probability:.6f}", "x-layer": out.layer,
               "x-layer-shape": "x".join(str(n) for n in out.maps.shape[-2:]), "x-heat-where": where(out.maps)}
    if spec.fmt == "png":
        return _overlay_png(x, prep, out.maps), "image/png", headers
    from vggnet.explain.gradcam import upsample_cam

    heat = upsample_cam(out.maps, (prep.image_size, prep.image_size))[0]
    payload: dict[str, Any] = {
        "model_name": model_name, "model_version": model_version, "layer": out.layer,
        "class": {"index": out.target, "label": label, "probability": probability},
        "layer_shape": list(out.maps.shape[-2:]), "shape": list(heat.shape),
        "map": np.round(heat.numpy().astype(np.float64), 4).tolist(),
    }
    return json.dumps(payload, separators=(",", ":")).encode(), "application/json", headers
