"""Stratified train/val split shared by the digits and ImageFolder datasets.

Written by hand rather than with ``sklearn.model_selection.train_test_split`` because that refuses
tiny datasets (it needs at least one validation image per class overall) and we want the same
rule everywhere: every class keeps ``round(n * val_fraction)`` images for validation, at least
one when a fraction is asked for, and never all of them, so no class vanishes from training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vggnet.errors import UsageError


def stratified_split(targets: Sequence[int], val_fraction: float,
                     seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, val), each sorted; the same ``seed`` always gives the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(targets):  # sorted, so the RNG stream does not depend on sample order
        members = rng.permutation(np.flatnonzero(targets == label))
        n = len(members)
        k = min(max(round(n * val_fraction), 1 if val_fraction > 0 else 0), n - 1)
        val.extend(members[:k].tolist())
        train.extend(members[k:].tolist())
    return sorted(train), sorted(val)
