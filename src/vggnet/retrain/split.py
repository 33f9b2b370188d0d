"""Step 2: hold out a stratified, seeded part of the reviewed samples; the gate tests the new model on it.

The same rule as every other split in vggnet (:func:`vggnet.data.stratified_split`): per class ``round(n *
fraction)`` held out, at least one when a class has two or more, never all of a class. Samples are ordered by
their hash first, so the split depends on which images were reviewed, not on the order the store returned them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from vggnet.data import stratified_split
from vggnet.errors import UsageError

__all__ = ["holdout_split"]


def holdout_split(samples: list[dict[str, Any]], fraction: float, seed: int) -> dict[str, Any]:
    """``{"train": [sha256...], "holdout": [sha256...], ...}`` of the manifest's ``samples``."""
    if not 0 < fraction < 1:
        raise UsageError(f"--holdout must lie in (0, 1), got {fraction}")
    ordered = sorted(samples, key=lambda s: s["sha256"])
    classes = sorted({s["label"] for s in ordered})
    targets = [classes.index(s["label"]) for s in ordered]
    train_idx, holdout_idx = stratified_split(targets, fraction, seed) if ordered else ([], [])
    by_class = {"train": Counter(ordered[i]["label"] for i in train_idx),
                "holdout": Counter(ordered[i]["label"] for i in holdout_idx)}
    return {"fraction": fraction, "seed": seed,
            "train": [ordered[i]["sha256"] for i in train_idx],
            "holdout": [ordered[i]["sha256"] for i in holdout_idx],
            "by_class": {part: dict(sorted(counts.items())) for part, counts in by_class.items()}}
