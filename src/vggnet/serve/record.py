"""What is served comes back: every prediction counted in Prometheus by class and confidence, logged as one JSON
line, and, with ``--store URL``, written as a row of the prediction store (:mod:`vggnet.store`) that people
review and reports read.

The request path only builds a small dict and hands it to the store's writer, which never blocks and never
raises (a full queue or a database that is down drops rows and counts them: ``vggnet_store_rows{outcome}``), so
a prediction cannot fail or wait because of the store. A uniform random share of traffic (``review_sample``) is
marked ``sampled``: only those rows, once a person labels them, measure accuracy without the bias of which
answers users choose to report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from vggnet.infer.reference import input_stats

from .metrics import ServeMetrics
from .settings import ServeSettings
from .versions import ModelVersion

__all__ = ["PredictionRecorder"]

log = logging.getLogger(__name__)
#: one JSON line per prediction, the store's fields (for ELK / Loki); separate from the access log's per request
prediction_log = logging.getLogger("vggnet.serve.predictions")


@dataclass
class PredictionRecorder:
    """Counts, logs and stores predictions; ``open`` connects the store (``settings.store``), ``close`` flushes."""

    settings: ServeSettings
    metrics: ServeMetrics
    writer: Any = None  # vggnet.store.PredictionWriter when the store is on
    engine: Any = None
    _random: random.Random = field(default_factory=random.Random)
    #: shadow passes in flight (serve.shadow): held here so the event loop does not drop them
    tasks: set = field(default_factory=set)
    keeper: Any = None  # serve.keep.InputKeeper with --keep-inputs
    live: Any = None  # serve.live.LiveAccuracy: the live accuracy gauges, read from the store on a thread

    def open(self) -> None:
        """Connect and start the writer (the CLI checks the URL before the server starts: an error here is one
        line there); without ``settings.store`` nothing is stored."""
        if not self.settings.store or self.writer is not None:
            return
        from vggnet import store

        self.engine = store.connect(self.settings.store)
        if self.settings.keep_inputs:
            from .keep import InputKeeper

            self.keeper = InputKeeper(self.settings.keep_inputs, int(self.settings.keep_inputs_mb * 2**20))
            store.record_setting(self.engine, store.KEEP_INPUTS, str(self.keeper.folder.resolve()))  # for retrain
        self.writer = store.PredictionWriter(self.engine, max_queue=self.settings.store_queue)
        if self.settings.live_accuracy_every_s > 0:
            from .live import LiveAccuracy

            self.live = LiveAccuracy(self.engine, self.metrics, self.settings.live_accuracy_every_s)
            self.live.start()
        if self.settings.store_keep_days:
            removed = store.purge(self.engine, self.settings.store_keep_days)
            if removed:
                log.info("prediction store: %d rows older than %g days removed", removed, self.settings.store_keep_days)
            if self.keeper is not None:
                self.keeper.purge(self.settings.store_keep_days)

    def close(self) -> None:
        if self.live is not None:
            self.live.close()
            self.live = None
        if self.keeper is not None:
            self.keeper.close()
        if self.writer is not None:
            self.writer.close()
            self.publish()
            self.writer = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    @property
    def writer_flush_s(self) -> float:
        """How long a put row may wait before it is written (the writer's flush interval)."""
        return float(getattr(self.writer, "flush_s", 0.5))

    @property
    def storing(self) -> bool:
        return self.writer is not None

    def record(self, request_id: str, route: str, mv: ModelVersion, probs: torch.Tensor, x: torch.Tensor,
               latency_ms: float, data: bytes | None = None, role: str = "served",
               sampled: bool | None = None, adversarial: Any = None) -> bool:
        """One row per image of ``probs`` (N×classes softmax) for the N inputs ``x``; ``data`` is the uploaded
        file (its hash identifies the input; without it, each preprocessed tensor's bytes are hashed).

        The review sample is drawn once per request (returned), so a shadow version's rows of the same request
        pass it back in and are in the sample exactly when the served ones are. ``adversarial`` (serve.guard's
        Screening, with --adversarial-guard) gives each row its ``adv_score``; flagged images are counted."""
        if sampled is None:
            sampled = self._random.random() < self.settings.review_sample
        k = min(self.settings.topk, probs.shape[1])
        values, indices = probs.float().topk(k, dim=1)
        # the drift reference's own definition (infer.reference), once per batch: the two must agree
        means, stds = input_stats(x)
        if self.live is not None:
            self.live.note(mv.name, mv.version)
        for item in range(probs.shape[0]):
            top = [[mv.prep.label(int(i)), round(float(v), 6)] for v, i in zip(values[item], indices[item],
                                                                                strict=True)]
            predicted, confidence = top[0][0], float(values[item, 0])
            self.metrics.observe_prediction(mv.name, mv.version, predicted, confidence)
            raw = data if data is not None else x[item].detach().cpu().numpy().tobytes()
            row = {"request_id": request_id, "item": item, "model": mv.name, "version": mv.version, "role": role,
                   "route": route, "predicted": predicted, "confidence": confidence, "topk": top,
                   "latency_ms": round(latency_ms, 3), "input_sha256": hashlib.sha256(raw).hexdigest(),
                   "input_bytes": len(raw), "sampled": sampled,
                   "input_stats": {"mean": round(float(means[item]), 5), "std": round(float(stds[item]), 5)}}
            self._watch(mv, int(indices[item, 0]), row)
            if adversarial is not None:
                row["adv_score"] = adversarial.scores[item]
                if adversarial.flagged[item]:
                    self.metrics.adversarial_flagged.labels(mv.name, mv.version).inc()
            if self.keeper is not None and (sampled or self.settings.keep_all_inputs
                                            or confidence < self.settings.review_low_confidence):
                row["input_path"] = self.keeper.keep(row["input_sha256"], x[item], mv.prep.mean, mv.prep.std)
            if self.settings.prediction_log:
                prediction_log.info(json.dumps(row))
            if self.writer is not None:
                self.writer.put(row)
        self.publish()
        return sampled

    def _watch(self, mv: ModelVersion, index: int, row: dict[str, Any]) -> None:
        """The out-of-domain score and verdict (serve.ood: the max softmax against ood.json's threshold, stored
        as ``ood_score``) and the drift window (serve.drift) of one prediction, when the version has them."""
        reference = getattr(mv, "ood", None)
        if reference is not None:
            row["ood_score"] = row["confidence"]
            if row["confidence"] < float(reference["threshold"]):
                self.metrics.ood_predictions.labels(mv.name, mv.version).inc()
        monitor = getattr(mv, "drift", None)
        if monitor is None:
            return
        stats = row["input_stats"]
        if monitor.observe(index, row["confidence"], stats["mean"], stats["std"]):
            for signal, score in monitor.scores.items():
                self.metrics.drift_score.labels(mv.name, mv.version, signal).set(score)
        self.metrics.drift_window.labels(mv.name, mv.version).set(monitor.held)

    def publish(self) -> None:
        """Copy the writer's and the keeper's counters into their gauges (after each prediction and on a scrape)."""
        if self.writer is not None:
            for outcome, count in self.writer.stats().items():
                self.metrics.store_rows.labels(outcome).set(count)
        if self.keeper is not None:
            for outcome, count in self.keeper.counts.items():
                self.metrics.kept_inputs.labels(outcome).set(count)
