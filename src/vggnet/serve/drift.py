"""The live drift score of one served version: its last ``window`` predictions against the reference the model
carries from its validation split (``drift.json`` beside the checkpoint: :mod:`vggnet.infer.reference`, written
by ``vggnet monitor reference``), per signal: predicted class, confidence, input mean, input std.

The statistic is the population stability index over the reference's fixed bins (deciles of the validation split
for the continuous signals, the classes for the prediction): one number per signal whatever its kind, with the
conventional thresholds 0.1 (look) and 0.25 (alert) that the Prometheus rules in ``deploy/`` use. The reasons
against KS or Jensen-Shannon are in :mod:`vggnet.infer.reference`.

Memory is bounded and the cost per prediction is constant: the window is a ring of ``window`` × 4 bin indices and
the per-bin counts are kept up to date as predictions enter and leave it, so scoring is a sum over a few bins,
done every ``every`` predictions. A window shorter than ``min_window`` is not scored (PSI is noisy on a few dozen
predictions: about (bins - 1) / n with no drift at all); ``vggnet_drift_window`` says how full it is.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from vggnet.infer.reference import SIGNALS, bin_index, load_reference, psi, smoothed

__all__ = ["DriftMonitor", "monitor_for"]

log = logging.getLogger(__name__)


class DriftMonitor:
    """A sliding window of predictions binned as the reference is; ``observe`` one, ``scores`` per signal."""

    def __init__(self, reference: dict[str, Any], window: int = 500, every: int = 50, min_window: int = 100) -> None:
        sig = reference["signals"]
        self.classes = len(sig["class"]["labels"])
        self.alert = float(reference.get("alert", 0.25))
        self.window, self.every = max(1, int(window)), max(1, int(every))
        self.min_window = min(max(1, int(min_window)), self.window)
        self._edges = [np.asarray(sig[name]["edges"], dtype=np.float64) for name in SIGNALS[1:]]
        self._expected = [smoothed(sig[name]["counts"]) for name in SIGNALS]
        self._counts = [np.zeros(len(e), dtype=np.int64) for e in self._expected]
        self._ring = np.zeros((self.window, len(SIGNALS)), dtype=np.int32)
        self._held = self._next = self._since = 0
        self._lock = threading.Lock()  # the routes record on the event loop, but nothing stops a thread doing so
        self.scores: dict[str, float] = {}

    @property
    def held(self) -> int:
        """How many predictions the window holds now."""
        return self._held

    def observe(self, predicted: int, confidence: float, mean: float, std: float) -> bool:
        """Add one prediction (evicting the oldest once full); True when the scores were recomputed now."""
        if not 0 <= predicted < self.classes:
            return False
        bins = [predicted] + [int(bin_index(e, v)) for e, v in zip(self._edges, (confidence, mean, std),
                                                                     strict=True)]
        with self._lock:
            if self._held == self.window:
                for counts, old in zip(self._counts, self._ring[self._next], strict=True):
                    counts[old] -= 1
            else:
                self._held += 1
            self._ring[self._next] = bins
            for counts, new in zip(self._counts, bins, strict=True):
                counts[new] += 1
            self._next = (self._next + 1) % self.window
            self._since += 1
            if self._held < self.min_window or (self._since < self.every and self.scores):
                return False
            self._since = 0
            self.scores = self._score()
            return True

    def _score(self) -> dict[str, float]:
        return {name: psi(expected, smoothed(counts))
                for name, expected, counts in zip(SIGNALS, self._expected, self._counts, strict=True)}

    def score_now(self) -> dict[str, float]:
        """The scores of the window as it is (whatever its length): for tests and reports, not the request path."""
        with self._lock:
            return self._score() if self._held else {}


def monitor_for(checkpoint: str | os.PathLike, classes: int, window: int = 500, every: int = 50,
                min_window: int = 100) -> DriftMonitor | None:
    """A monitor on the reference beside ``checkpoint``, or None (no ``drift.json``, or one made for another
    class list: a version without it serves as before, without drift scores; never an error)."""
    reference = load_reference(checkpoint)
    if reference is None:
        return None
    try:
        monitor = DriftMonitor(reference, window=window, every=every, min_window=min_window)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("%s: drift reference not usable (%s); no drift scores", Path(checkpoint).name, exc)
        return None
    if monitor.classes != classes:
        log.warning("%s: the drift reference has %d classes, the model %d; no drift scores (run `vggnet monitor "
                    "reference` again)", Path(checkpoint).name, monitor.classes, classes)
        return None
    return monitor
