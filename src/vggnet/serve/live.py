"""Live accuracy per model version as Prometheus gauges, read from the prediction store off the request path.

The figure is what ``vggnet monitor report`` prints (the same counting, :func:`vggnet.store.reviewed_counts`, and
the same 95 % Wilson interval, :func:`vggnet.stats.wilson_interval`): the share right of the predictions in the
uniform random review sample that a person has labelled. A thread reads it every ``every_s`` seconds, so a
scrape or a prediction never waits for the database; a read that fails is logged and tried again next time (the
gauges keep their last values, and ``vggnet_live_accuracy_refreshed_timestamp_seconds`` shows how old they are).

A version this server has served but nobody has reviewed yet exports ``vggnet_live_reviewed 0`` and NaN for the
accuracy and its bounds (Prometheus' "no value": a panel draws a gap, a rule compares false), so a dashboard shows
which versions still wait for reviews. Every replica on one store exports the same figures: aggregate with max.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from vggnet.stats import wilson_interval

from .metrics import ServeMetrics

__all__ = ["LiveAccuracy"]

log = logging.getLogger(__name__)

#: the interval's level is the report's default (95 %), so the dashboard and `vggnet monitor report` agree
ALPHA = 0.05


class LiveAccuracy:
    """Publishes each version's live accuracy from ``engine`` into ``metrics`` every ``every_s`` seconds."""

    def __init__(self, engine: Any, metrics: ServeMetrics, every_s: float) -> None:
        self.engine, self.metrics, self.every_s = engine, metrics, float(every_s)
        self._known: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # note() from request threads and refresh() on the thread
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="vggnet-live-accuracy", daemon=True)

    def start(self) -> None:
        self.metrics.live_started()
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (a read in progress finishes first, up to ``timeout`` seconds)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def note(self, model: str, version: str) -> None:
        """A version this server predicts with: exported (reviewed 0) before the next read finds reviews of it.
        The request path's cost is one set lookup once the version is known."""
        key = (model, version)
        if key in self._known:
            return
        with self._lock:
            if key not in self._known:
                self._known.add(key)
                self._publish(model, version, 0, 0)

    def refresh(self) -> bool:
        """Read the store once and set every known version's gauges; False (logged) when the read failed."""
        from vggnet.store import reviewed_counts

        try:
            counts = reviewed_counts(self.engine)
        except Exception as e:  # noqa: BLE001 - a store that is down must not stop the thread; said and retried
            if not self._failing:
                log.warning("live accuracy: reading the prediction store failed (%s); the gauges keep their last "
                            "values and the read is retried every %g s", str(e).splitlines()[0], self.every_s)
            self._failing = True
            return False
        if self._failing:
            log.info("live accuracy: the prediction store reads again")
        self._failing = False
        found = {(c["model"], c["version"]): c for c in counts}
        with self._lock:
            self._known |= found.keys()
            for model, version in sorted(self._known):
                c = found.get((model, version), {"reviewed": 0, "correct": 0})  # its reviews were purged, or none
                self._publish(model, version, c["reviewed"], c["correct"])
        self.metrics.live_refreshed.set(time.time())
        return True

    def _publish(self, model: str, version: str, reviewed: int, correct: int) -> None:
        m = self.metrics
        if reviewed:
            low, high = wilson_interval(correct, reviewed, ALPHA)
            accuracy = correct / reviewed
        else:
            accuracy = low = high = math.nan
        m.live_reviewed.labels(model, version).set(reviewed)
        m.live_accuracy.labels(model, version).set(accuracy)
        m.live_accuracy_low.labels(model, version).set(low)
        m.live_accuracy_high.labels(model, version).set(high)

    def _run(self) -> None:
        while True:
            self.refresh()
            if self._stop.wait(self.every_s):
                return
