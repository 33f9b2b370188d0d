"""The web page's "this looks nothing like the training data" warning: the maximum softmax probability (MSP,
Hendrycks & Gimpel 2017) of an image against a threshold set on the run's own validation split.

Why MSP: it costs nothing (the prediction computes it), needs no features or training data at serve time, and its
false-alarm rate is fixed by construction: the threshold is the validation split's ``FALSE_ALARM`` quantile of
MSP, so about 5 % of in-domain images are flagged. Its detection rate on foreign images is measured, not
assumed: ``benchmarks/ood_page.py`` (results in ``benchmarks/results/ood_page.json``).

The reference is ``ood.json`` beside the checkpoint (written by :func:`write_reference`), else it is computed when
the version loads from the run's validation split when that is cheap (the embedded digits, in memory);
otherwise there is none and the page shows no such warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggnet.infer.reference import read_sidecar, write_sidecar

__all__ = ["FALSE_ALARM", "REFERENCE_FILE", "compute_reference", "load_reference", "max_softmax", "reference_for",
           "verdict", "write_reference"]

log = logging.getLogger(__name__)

#: the share of validation images flagged by construction
FALSE_ALARM = 0.05
REFERENCE_FILE = "ood.json"


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """One score per row: the largest class probability."""
    return logits.float().softmax(1).max(1).values


def threshold(scores: np.ndarray | torch.Tensor, false_alarm: float = FALSE_ALARM) -> float:
    """The ``false_alarm`` quantile of in-domain scores: images scoring below it are flagged."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), false_alarm))


def _reference(scores: torch.Tensor, source: str) -> dict[str, Any]:
    return {"signal": "max_softmax", "false_alarm": FALSE_ALARM, "threshold": threshold(scores),
            "images": int(scores.numel()), "source": source}


def _digits_val(run: str | os.PathLike) -> torch.Tensor | None:
    """The validation split of a run trained on the embedded digits (uint8 N×3×S×S, as ``vggnet eval`` splits
    it: the recipe's ``val_fraction`` and ``split_seed``), else None. Reads the recipe itself rather than through
    ``vggnet.evaluate``, which sits above serve (docs/architecture.md)."""
    import yaml

    path = Path(run)
    folders = [path] if path.is_dir() else list(path.parents)[:3]
    recipe = next((f / "recipe.yaml" for f in folders if (f / "recipe.yaml").is_file()), None)
    if recipe is None:
        return None
    data = (yaml.safe_load(recipe.read_text()) or {}).get("data") or {}
    if data.get("dataset") != "digits":
        return None
    from vggnet.data import digits_tensors

    x, _ = digits_tensors("val", size=int(data.get("image_size", 32)), channels=3,
                          val_fraction=float(data.get("val_fraction", 0.1)), seed=int(data.get("split_seed", 0)))
    return x


def compute_reference(logits: Callable[[torch.Tensor], torch.Tensor], prep: Any,
                      run: str | os.PathLike) -> dict[str, Any] | None:
    """The reference from ``run``'s validation split when it is the embedded digits (cheap: in memory), each
    image through the same preprocessing as an upload to ``/predict``; None for any other run."""
    from PIL import Image

    from vggnet.infer import preprocess

    images = _digits_val(run)
    if images is None or not len(images):
        return None
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            pil = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in images[start:start + 64]]
            scores.append(max_softmax(logits(preprocess(pil, prep))))
    return _reference(torch.cat(scores), f"validation split of {Path(run).parent.name}")


def write_reference(checkpoint: str | os.PathLike, reference: dict[str, Any]) -> Path:
    return write_sidecar(checkpoint, REFERENCE_FILE, reference)


def load_reference(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    data = read_sidecar(checkpoint, REFERENCE_FILE)
    return data if data is not None and isinstance(data.get("threshold"), (int, float)) else None


def reference_for(checkpoint: str | os.PathLike, logits: Callable[[torch.Tensor], torch.Tensor],
                  prep: Any) -> dict[str, Any] | None:
    """The stored reference, else one computed now when the run's validation split is in memory; never an
    error (a version without it serves as before, without the warning)."""
    stored = load_reference(checkpoint)
    if stored is not None:
        return stored
    try:
        return compute_reference(logits, prep, checkpoint)
    except Exception as exc:  # noqa: BLE001 - optional: the version serves without the warning
        log.info("no out-of-domain reference for %s: %s", Path(checkpoint).name, exc)
        return None


def verdict(probability: float, reference: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the page shows: the image's top probability, the threshold, and whether it falls below."""
    if reference is None:
        return None
    t = float(reference["threshold"])
    return {"signal": "max_softmax", "score": probability, "threshold": t, "unusual": probability < t,
            "false_alarm": reference.get("false_alarm", FALSE_ALARM)}
