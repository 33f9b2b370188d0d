"""What a model's predictions and inputs look like in domain, and how far a window of live traffic is from it.

The reference (``drift.json`` beside the checkpoint) holds four signals measured on the run's validation split,
each image preprocessed as an upload to the server is: the predicted-class distribution, the confidence (max
softmax), and the mean and standard deviation of the normalised input tensor (the statistics the server records
for each prediction). Continuous signals are binned at the reference's own deciles (edges fixed once, here), so
every bin holds about a tenth of the validation images and a live window is compared bin by bin.

The comparison is the population stability index, PSI = sum_i (a_i - e_i) ln(a_i / e_i) over bins (e: reference
share, a: live share). Why PSI: it is one number per signal whatever the signal's kind (classes or binned
values), it is the symmetric KL divergence so it grows with any change of shape, not only of location, and it
comes with conventional alerting thresholds (below 0.1 stable, 0.1-0.25 a shift to look at, above 0.25 a
significant shift) that people who run models already read. KS needs raw values and suits only continuous
signals; Jensen-Shannon is bounded but has no customary threshold. PSI's weakness is its noise on small
windows (about (bins - 1) x (1/n + 1/m) with no drift at all), so counts are smoothed (half a count per bin) and
the server scores a window only once it holds enough predictions.

Here, below the rooms, so that the server (``vggnet.serve.drift``) and the CLI (``vggnet monitor reference``)
share one definition of the signals, the bins and the statistic; it needs only preprocessing and logits, no
labels and no data loading (the CLI finds the images, ``vggnet.evaluate`` knows the run's validation split).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggnet.atomic import write_json

from .predictor import Preprocessing, preprocess

__all__ = ["ALERT", "BINS", "REFERENCE_FILE", "SIGNALS", "WARN", "bin_index", "build_reference", "input_stats",
           "load_reference", "psi", "signals", "smoothed", "write_reference"]

REFERENCE_FILE = "drift.json"
#: the signals, in this order everywhere (the server's window keeps one bin index per signal and prediction)
SIGNALS = ("class", "confidence", "input_mean", "input_std")
#: PSI's conventional thresholds: below WARN no shift, above ALERT a significant one
WARN, ALERT = 0.1, 0.25
#: quantile bins per continuous signal (fewer when the reference has ties at its quantiles)
BINS = 10
FORMAT = 1


def input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the normalised N×C×H×W batch: its mean and (unbiased) std, as the server's record has them."""
    flat = x.detach().float().flatten(1)
    return flat.mean(1), flat.std(1)


def signals(logits: Callable[[torch.Tensor], torch.Tensor], prep: Preprocessing, images: Iterable[Any],
            batch: int = 64) -> dict[str, np.ndarray]:
    """Each signal per image (``class`` as the predicted index); ``images`` are PIL images or uint8 C×H×W
    tensors, preprocessed as uploads are; ``None`` entries (unreadable files) are left out."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in SIGNALS}
    chunk: list[Any] = []

    def flush() -> None:
        x = preprocess(chunk, prep)
        with torch.inference_mode():
            probs = logits(x).float().softmax(1)
        confidence, predicted = probs.max(1)
        mean, std = input_stats(x)
        for name, values in zip(SIGNALS, (predicted, confidence, mean, std), strict=True):
            out[name].append(values.cpu())
        chunk.clear()

    for image in images:
        if image is None:
            continue
        chunk.append(image)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    return {name: (torch.cat(v).numpy() if v else np.zeros(0)) for name, v in out.items()}


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Interior bin edges at the deciles (``bins`` quantiles) of ``values``; the outer bins are open."""
    return np.unique(np.quantile(values.astype(np.float64), np.arange(1, bins) / bins))


def bin_index(edges: Sequence[float] | np.ndarray, values: np.ndarray | float) -> np.ndarray:
    """The bin of each value: 0 below the first edge, len(edges) at or above the last."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")


def build_reference(values: dict[str, np.ndarray], classes: Sequence[str], source: str, bins: int = BINS,
                    accuracy: float | None = None) -> dict[str, Any]:
    """The JSON-able reference of :func:`signals`' output for a model with ``classes``."""
    n = len(values["class"])
    if n == 0:
        raise ValueError("no images to build a drift reference from")
    out: dict[str, Any] = {"format": FORMAT, "statistic": "psi", "warn": WARN, "alert": ALERT, "images": n,
                           "source": source, "signals": {}}
    if accuracy is not None:
        out["accuracy"] = round(float(accuracy), 6)
    counts = np.bincount(values["class"].astype(np.int64), minlength=len(classes))
    out["signals"]["class"] = {"kind": "categorical", "labels": list(classes), "counts": counts.tolist()}
    for name in SIGNALS[1:]:
        v = values[name].astype(np.float64)
        edges = np.unique(_edges(v, bins).round(6))  # rounded before counting: the file's edges are the ones used
        c = np.bincount(bin_index(edges, v), minlength=len(edges) + 1)
        out["signals"][name] = {"kind": "binned", "edges": edges.tolist(),
                                "counts": c.tolist(), "min": float(v.min()), "max": float(v.max()),
                                "median": float(np.median(v))}
    return out


def smoothed(counts: Sequence[float] | np.ndarray, prior: float = 0.5) -> np.ndarray:
    """Shares with ``prior`` counts added to every bin: no bin is empty, so ln(a/e) is finite, and a small
    window's empty bins weigh little (Jeffreys' half count)."""
    c = np.asarray(counts, dtype=np.float64) + prior
    return c / c.sum()


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (shares, each summing to 1, none 0)."""
    e, a = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"PSI needs the same bins: {e.shape} vs {a.shape}")
    return float(np.sum((a - e) * np.log(a / e)))


def write_sidecar(checkpoint: str | os.PathLike, name: str, data: dict[str, Any]) -> Path:
    """``name`` (a JSON file the model carries: drift.json, ood.json) beside ``checkpoint``, written atomically."""
    out = Path(checkpoint).with_name(name)
    write_json(out, data)
    return out


def read_sidecar(checkpoint: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The JSON object ``name`` beside ``checkpoint``, or None when it is missing, unreadable or not an object."""
    import json

    try:
        data = json.loads(Path(checkpoint).with_name(name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_reference(checkpoint: str | os.PathLike, reference: dict[str, Any]) -> Path:
    """``drift.json`` beside ``checkpoint``, written atomically."""
    return write_sidecar(checkpoint, REFERENCE_FILE, reference)


def load_reference(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The reference beside ``checkpoint``, or None when there is none or it is not one this code reads."""
    data = read_sidecar(checkpoint, REFERENCE_FILE)
    if data is None or data.get("format") != FORMAT:
        return None
    sig = data.get("signals")
    if not isinstance(sig, dict) or set(sig) != set(SIGNALS):
        return None
    return data
