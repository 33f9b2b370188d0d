"""Feature squeezing (Xu, Evans, Qi, NDSS 2018): an adversarial-input detector that needs no retraining.

The model's softmax on an input is compared with its softmax on *squeezed* copies of it, copies with fewer ways to
differ: the colour bit depth reduced (``bits``: 5 keeps 32 levels per channel, the paper's CIFAR-10 setting) and a
2×2 median filter. A natural image barely changes its prediction under either; a small adversarial perturbation,
tuned to the exact pixel values, is mostly rounded or smoothed away, so the prediction jumps back. The score is the
largest L1 distance between the softmax on the input and on a squeezed copy (0 .. 2). An input scoring above the
threshold is flagged; the threshold is the ``1 - false_alarm`` quantile of the scores of the run's clean validation
images (``vggnet robustness`` sets it and writes :data:`REFERENCE_FILE` beside the checkpoint).

Squeezing happens in pixel space ([0, 1] images, before normalisation): a preprocessed tensor is un-normalised with
the model's :class:`~vggnet.infer.Preprocessing` mean and std, squeezed, clamped, and normalised again.

It costs two extra forward passes per image (one per squeezer). Why here, in ``infer``: both the server (per request,
on the version's worker) and ``vggnet robustness`` (on the validation split) score inputs the same way, below the
rooms that use it; it needs only torch and the preprocessing that already lives here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .predictor import Preprocessing

__all__ = ["DEFAULT_BITS", "FALSE_ALARM", "REFERENCE_FILE", "Squeezer", "bit_depth", "load_reference",
           "median_2x2", "squeeze_distances", "squeeze_score", "threshold", "write_reference"]

#: the share of clean validation images the threshold flags, by construction
FALSE_ALARM = 0.05
#: colour bits kept by the bit-depth squeezer (the paper's CIFAR-10 setting; 4 is its ImageNet one)
DEFAULT_BITS = 5
#: the detector's reference, beside the checkpoint (or the exported file) it was measured for
REFERENCE_FILE = "adversarial.json"


def bit_depth(pixels: torch.Tensor, bits: int) -> torch.Tensor:
    """``pixels`` in [0, 1] rounded to ``2**bits`` levels (values outside [0, 1] are clamped first)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    levels = 2 ** bits - 1
    return torch.round(pixels.clamp(0, 1) * levels) / levels


def median_2x2(pixels: torch.Tensor) -> torch.Tensor:
    """The 2×2 median filter of an N×C×H×W batch, per channel, as the paper's implementation computes it
    (``scipy.ndimage.median_filter(size=2, mode="reflect")``): each pixel becomes the median of itself and its left,
    upper and upper-left neighbours (the first row and column repeated), the upper middle of the 4 sorted values,
    so one outlier in a flat patch is removed."""
    padded = F.pad(pixels, (1, 0, 1, 0), mode="replicate")
    windows = torch.stack([padded[..., :-1, :-1], padded[..., :-1, 1:], padded[..., 1:, :-1], padded[..., 1:, 1:]])
    return windows.sort(dim=0).values[2]


@dataclass(frozen=True)
class Squeezer:
    """The squeezers' settings and the preprocessing they undo and redo."""

    prep: Preprocessing
    bits: int = DEFAULT_BITS

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.prep.mean, dtype=x.dtype).view(shape),
                torch.tensor(self.prep.std, dtype=x.dtype).view(shape))

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return x * std + mean

    def to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def squeezed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two squeezed copies of a preprocessed (normalised) batch, normalised again: bit depth, median."""
        pixels = self.to_pixels(x.detach().float().cpu())
        return (self.to_input(bit_depth(pixels, self.bits)),
                self.to_input(median_2x2(pixels.clamp(0, 1))))


def squeeze_distances(logits: torch.Tensor, *squeezed_logits: torch.Tensor) -> torch.Tensor:
    """The score per row: the largest L1 distance between the softmax of ``logits`` and that of each squeezed
    copy's logits (0: the same prediction, 2: disjoint)."""
    p = logits.float().softmax(1)
    return torch.stack([(p - q.float().softmax(1)).abs().sum(1) for q in squeezed_logits]).max(0).values


def squeeze_score(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  squeezer: Squeezer) -> torch.Tensor:
    """Scores of a preprocessed batch ``x`` with ``logits_fn`` (three forward passes: the input, two squeezes)."""
    with torch.no_grad():
        return squeeze_distances(logits_fn(x), *(logits_fn(s) for s in squeezer.squeezed(x)))


def threshold(clean_scores: np.ndarray | torch.Tensor, false_alarm: float = FALSE_ALARM) -> float:
    """The ``1 - false_alarm`` quantile of clean images' scores: a clean image scores above it with that chance."""
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm}")
    return float(np.quantile(np.asarray(clean_scores, dtype=np.float64), 1 - false_alarm))


def write_reference(checkpoint: str | os.PathLike, reference: dict[str, Any]) -> Path:
    from vggnet.atomic import write_json

    return write_json(Path(checkpoint).with_name(REFERENCE_FILE), reference)


def load_reference(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The reference beside ``checkpoint``, or None when there is none or it is not one (no numeric threshold)."""
    file = Path(checkpoint).with_name(REFERENCE_FILE)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("threshold"), int | float):
        return None
    return data
