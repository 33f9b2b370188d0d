"""One settings object for a server process; a model's ``config.yaml`` overrides its batching and runtime fields."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["ServeSettings", "with_overrides"]


@dataclass(frozen=True)
class ServeSettings:
    """Server-wide defaults (frozen: routes and workers read it from several threads)."""

    runtime: str = "eager"
    #: calibration images (folder, glob or file) for the int8, onnx-int8 and auto runtimes, and how many
    calib_data: str | None = None
    calib_n: int = 64
    max_batch_size: int = 16
    max_delay_ms: float = 5.0
    batching: bool = True
    max_queue: int = 256
    #: bytes of one request body, after decompression too (32 MiB ≈ 9 images of 224² as V2 JSON)
    max_body_bytes: int = 32 * 1024 * 1024
    #: pixels of one uploaded image, checked from its header before decoding (6000 × 6000)
    max_image_pixels: int = 36_000_000
    topk: int = 5
    #: Grad-CAM requests (POST /explain) queued or running per model version; each runs alone on the version's
    #: worker, between batches, so predictions wait behind at most this many; beyond it 503
    max_explain_jobs: int = 2
    #: forward passes allowed at the same time across all models (1: the cores are never split)
    parallel_forwards: int = 1
    #: seconds a request may wait for its result before a 503
    request_timeout_s: float = 30.0
    #: seconds the shutdown waits for queued requests
    drain_timeout_s: float = 30.0
    #: requests whose body is being received, decompressed, parsed or decoded at once (beyond: 503 before
    #: reading); bounds the memory a storm of large uploads can take (0: no bound)
    max_concurrency: int = 16
    #: seconds a client may take to send a request body (a slow sender must not hold a slot): then 408
    body_timeout_s: float = 30.0
    #: threads that inflate, parse and decode request bodies (0: one per usable core); they run at a lower
    #: OS priority than the event loop on Linux, so health probes are answered while a storm is decoded
    decode_threads: int = 0
    load_in_background: bool = True
    warmup: bool = True
    access_log: bool = True
    #: bearer tokens a request must carry (empty: no authentication); see vggnet.serve.auth
    api_keys: tuple[str, ...] = ()
    #: endpoint groups reachable without a token when api_keys are set: health, metrics, metadata
    public_endpoints: tuple[str, ...] = ("health", "metrics")
    #: load exported files that run code from the file (``.pt2``: a shared library; TorchScript): off, so
    #: that serving a repository runs no code from it unless its owner says the files are trusted
    trust_model_code: bool = False
    #: where checkpoints run with the eager runtime ("cpu", "cuda", "cuda:N"; None: the CPU) and in what autocast
    #: (fp32, bf16, fp16, auto; None: fp32); exported files and the other runtimes run on the CPU and refuse both
    device: str | None = None
    precision: str | None = None
    #: Host header values the server answers (DNS-rebinding defence, see vggnet.serve.hosts): names or
    #: ``*.domain`` patterns, ``*`` for any. None: ``run_server`` derives them from the address it binds (``*``
    #: for 0.0.0.0 / ::, with a warning); ``create_app`` alone accepts the loopback names and TestClient's host
    allowed_hosts: tuple[str, ...] | None = None
    #: FastAPI's /docs (Swagger UI) and /redoc: off, because their scripts come from a CDN (cdn.jsdelivr.net)
    #: and would run with this origin's rights; /openapi.json, which loads nothing, is always served
    docs: bool = False
    #: the prediction store's SQLAlchemy URL (``sqlite:///runs/serve.db``, ``postgresql+psycopg://...``); None: off
    store: str | None = None
    #: rows waiting for the store's writer at most; beyond, rows are dropped and counted, never waited for
    store_queue: int = 10_000
    #: rows older than this many days are removed when the server starts (None: kept)
    store_keep_days: float | None = None
    #: the uniform random share of predictions marked for review: the unbiased basis of live accuracy
    review_sample: float = 0.1
    #: answers less sure than this are queued for review too (their inputs kept with keep_inputs)
    review_low_confidence: float = 0.5
    #: a folder for the crops of predictions that may need a reviewer (serve.keep); None: no image is kept
    keep_inputs: str | None = None
    #: the most the keep_inputs folder may hold, in MiB
    keep_inputs_mb: float = 1024.0
    #: keep every prediction's crop, not only the review sample's and low-confidence ones (retraining from
    #: user reports needs the image of any request)
    keep_all_inputs: bool = False
    #: one JSON line per prediction on the ``vggnet.serve.predictions`` logger
    prediction_log: bool = True
    #: score every prediction for adversarial inputs (feature squeezing, serve.guard: two extra forward passes
    #: per image) against adversarial.json beside the checkpoint; reject_adversarial: flagged requests get 422
    adversarial_guard: bool = False
    reject_adversarial: bool = False
    #: drift (vggnet.serve.drift): the last this many predictions per version are compared with drift.json,
    #: rescored every ``drift_every`` predictions once the window holds ``drift_min_window``
    drift_window: int = 500
    drift_every: int = 50
    drift_min_window: int = 100
    #: seconds between reads of the live accuracy per version from the store (serve.live; 0: not exported)
    live_accuracy_every_s: float = 30.0


def with_overrides(settings: ServeSettings, **changes: Any) -> ServeSettings:
    """``dataclasses.replace`` that ignores ``None`` (an option not given on the command line)."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
