"""Prometheus metrics of one server, in a registry of its own.

A private :class:`~prometheus_client.CollectorRegistry` per app (not the process-global one) lets
several apps live in one process — tests, a benchmark, A/B servers side by side — without "duplicated
timeseries" errors, and ``/metrics`` shows exactly this server. Latencies are histograms, not
summaries, so p50/p95/p99 can be computed across replicas with ``histogram_quantile``. Routes are
labelled by their template (``/v2/models/{name}/infer``), never the raw path, so label cardinality is
bounded whatever clients send.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["MODEL_STATES", "ServeMetrics"]

#: Triton's model states; ``vggnet_model_state{state=...}`` is 1 for the current one, 0 for the others.
MODEL_STATES = ("LOADING", "READY", "UNAVAILABLE", "UNLOADING")

# 0.5 ms .. 30 s: a forward pass of a small model on a few cores is milliseconds, a queued request under
# overload or a VGG-16 batch at 224 px is seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.15,
                   0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class ServeMetrics:
    """Every metric the service exports; ``render()`` is the ``/metrics`` body."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("vggnet_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.request_latency = Histogram("vggnet_http_request_duration_seconds",
                                         "Time from request start to the end of the response, by route",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("vggnet_http_requests_in_flight", "HTTP requests being handled now", registry=r)
        self.admission_refused = Counter("vggnet_admission_refused", "Requests refused (503) before their body was "
                                         "read because max_concurrency bodies were in hand", registry=r)
        self.queue_latency = Histogram("vggnet_queue_duration_seconds",
                                       "Time a request waited in its model's queue before its batch started",
                                       ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_latency = Histogram("vggnet_compute_duration_seconds", "Time of one batched forward pass",
                                         ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.explain_latency = Histogram("vggnet_explain_duration_seconds",
                                         "Time of one Grad-CAM pass (forward, and backward from the layer)",
                                         ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vggnet_batch_size", "Rows (images) per forward pass",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("vggnet_batch_requests", "Requests grouped into one forward pass",
                                        ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_rows = Gauge("vggnet_queue_rows", "Rows waiting in a model's queue", ["model", "version"],
                                registry=r)
        self.inferences = Counter("vggnet_inference_rows", "Rows (images) inferred", ["model", "version"],
                                  registry=r)
        self.model_state = Gauge("vggnet_model_state", "1 for the model version's current state, else 0",
                                 ["model", "version", "state"], registry=r)

        # what is served: the predicted class (bounded by the models' class lists) and how sure the model was
        self.predictions = Counter("vggnet_predictions", "Predictions by model, version and predicted class",
                                   ["model", "version", "class"], registry=r)
        self.confidence = Histogram("vggnet_prediction_confidence", "The top-1 probability of each prediction",
                                    ["model", "version"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.shadow_skipped = Counter("vggnet_shadow_skipped", "Requests a shadow version did not run on (not "
                                      "ready, overloaded or failed)", ["model", "version"], registry=r)
        self.kept_inputs = Gauge("vggnet_kept_inputs", "Review images (--keep-inputs): kept, or not kept because the "
                                 "folder was full, the writer busy, or the write failed", ["outcome"], registry=r)
        self.adversarial_flagged = Counter("vggnet_adversarial_flagged", "Images the adversarial guard flagged "
                                           "(feature-squeezing score above adversarial.json's threshold)",
                                           ["model", "version"], registry=r)
        self.store_rows = Gauge("vggnet_store_rows", "Prediction store rows: written, dropped_full, dropped_error "
                                "(never stored), queued", ["outcome"], registry=r)
        # how far traffic is from the validation split (vggnet.serve.drift), and how much of it looks foreign
        self.drift_score = Gauge("vggnet_drift_score", "PSI of the last predictions against the model's validation "
                                 "reference (drift.json), per signal: class, confidence, input_mean, input_std",
                                 ["model", "version", "signal"], registry=r)
        self.drift_window = Gauge("vggnet_drift_window", "Predictions in the drift window (scored from "
                                  "drift_min_window on)", ["model", "version"], registry=r)
        self.ood_predictions = Counter("vggnet_ood_predictions", "Predictions whose top probability fell below "
                                       "the version's out-of-domain threshold (ood.json)", ["model", "version"],
                                       registry=r)
        # live accuracy on the reviewed random sample (serve.live, with --store): the store's figures, the same on
        # every replica that reads one store (aggregate with max, not sum); NaN until a sampled image is reviewed
        self.live_accuracy = Gauge("vggnet_live_accuracy", "Share right of the reviewed predictions in the uniform "
                                   "random review sample (the store's latest review label per image)",
                                   ["model", "version"], registry=r)
        self.live_accuracy_low = Gauge("vggnet_live_accuracy_low", "Lower end of the live accuracy's 95 % Wilson "
                                       "interval", ["model", "version"], registry=r)
        self.live_accuracy_high = Gauge("vggnet_live_accuracy_high", "Upper end of the live accuracy's 95 % Wilson "
                                        "interval", ["model", "version"], registry=r)
        self.live_reviewed = Gauge("vggnet_live_reviewed", "Predictions in the random review sample that a person "
                                   "has labelled (the live accuracy's n)", ["model", "version"], registry=r)
        # registered by live_started(): a server without a store must not export a refresh time that never moves
        self.live_refreshed = Gauge("vggnet_live_accuracy_refreshed_timestamp_seconds", "Unix time of the last "
                                    "successful read of the live accuracy from the store", registry=None)
        self._live_registered = False

    def observe_prediction(self, model: str, version: str, predicted: str, confidence: float) -> None:
        self.predictions.labels(model, version, predicted).inc()
        self.confidence.labels(model, version).observe(confidence)

    def set_state(self, model: str, version: str, state: str) -> None:
        if state not in MODEL_STATES:
            raise ValueError(f"unknown model state {state!r}")
        for s in MODEL_STATES:
            self.model_state.labels(model, version, s).set(1.0 if s == state else 0.0)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_latency.labels(route).observe(seconds)

    def observe_batch(self, model: str, version: str, rows: int, requests: int, compute_s: float) -> None:
        self.batch_size.labels(model, version).observe(rows)
        self.batch_requests.labels(model, version).observe(requests)
        self.compute_latency.labels(model, version).observe(compute_s)
        self.inferences.labels(model, version).inc(rows)

    def live_started(self) -> None:
        """Export ``vggnet_live_accuracy_refreshed_timestamp_seconds`` from now on (once per registry)."""
        if not self._live_registered:
            self.registry.register(self.live_refreshed)
            self._live_registered = True

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
