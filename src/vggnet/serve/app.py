"""The HTTP service: a FastAPI app over a model repository, speaking the Open Inference Protocol (V2).

``create_app(repo, settings)`` builds everything one server process needs: the models (loaded in the
lifespan, in a background thread by default so the process answers liveness probes while a big model
loads), one :class:`~vggnet.serve.batcher.Batcher` per model version, Prometheus metrics in a private
registry, structured access logs and error handling that turns every client mistake into a 4xx
``{"error": ...}``. Shutting down (SIGTERM under uvicorn) stops accepting connections, lets in-flight
requests finish — uvicorn waits for them — then drains each model's queue before the workers stop.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``.../config``, ``POST .../infer``, ``POST /v2/repository/index``, ``POST /predict``
(an image upload → top-k labels), ``POST /explain`` (an image upload → its Grad-CAM overlay or map, run on the
version's worker like a prediction: see :mod:`vggnet.serve.cam`), ``GET /metrics``, and ``GET /`` (a web page
for people: upload, top-5, Grad-CAM; see :mod:`vggnet.serve.web`).

A version is a checkpoint (run with a runtime of :mod:`vggnet.infer`, calibrated if it needs it) or a file
written by ``vggnet export`` (``.onnx``, ``.int8.onnx``, ``.pt2``, ``.int8.pt2``, TorchScript), which runs as
exported: its preprocessing, and for INT8 its calibration, travel inside it. ONNX files load by default
(ONNX Runtime parses a protobuf: no code from the file runs); ``.pt2`` packages (a compiled shared library,
loaded with ``dlopen``) and TorchScript (a program run by ``torch.jit.load``) run code from the file, so they
load only with ``ServeSettings.trust_model_code`` (``--trust-model-code``). ``vggnet.export`` is imported only
when an exported version loads; it imports models and infer, never training code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import vggnet
from vggnet.infer import Predictor, Preprocessing, preprocess
from vggnet.infer.predictor import check_cpu_only
from vggnet.models import checkpoint_meta, load_checkpoint

from . import cam, v2, web
from .auth import AuthMiddleware
from .batcher import Batcher, BatcherClosed, BatchInfo, QueueFull
from .errors import ServeError, bad_request, not_found, unavailable
from .limits import IMAGE_MEDIA_TYPES, decode_image, decompress, media_type, read_body
from .metrics import ServeMetrics
from .repository import ModelConfig, ModelRepository, VersionRouter, exported_kind

__all__ = ["ModelServer", "ModelVersion", "ServeSettings", "check_exported", "create_app", "run_server"]

log = logging.getLogger("vggnet.serve")
access_log = logging.getLogger("vggnet.serve.access")

#: exported kinds whose loading runs code from the file: an AOTInductor package's shared library, a TorchScript
#: program; served only with ``trust_model_code``
CODE_KINDS = ("pt2", "torchscript")
# V2 / Triton ``platform`` of an exported format (Triton's names where it has one); checkpoints are "pytorch".
_PLATFORMS = {"onnx": "onnxruntime_onnx", "onnx-int8": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}


@dataclass(frozen=True)
class ServeSettings:
    """Server-wide defaults; a model's ``config.yaml`` overrides the batching and runtime fields."""

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


def check_exported(file: str | os.PathLike, runtime: str, trust_model_code: bool, device: str | None = None,
                   precision: str | None = None) -> str | None:
    """The exported kind of ``file`` (None for a checkpoint), or a ValueError when it cannot be served so:
    with a runtime other than eager (the file is already compiled / quantized; a runtime would be silently
    ignored), on a device other than the CPU or in another precision, without ONNX Runtime for an ONNX file,
    or running code from the file without ``trust_model_code``. Checked by the CLI before the server starts
    and again when a version loads, for servers built with :func:`create_app` directly."""
    kind = exported_kind(file)
    if kind is None:
        return None
    name = os.path.basename(file)
    if runtime != "eager":
        raise ValueError(f"{name}: an exported file runs in its own runtime ({kind}, with its own quantization "
                         f"if INT8); drop --runtime {runtime} (or runtime: in the model's config.yaml), or serve "
                         "the checkpoint it was exported from to use a runtime")
    check_cpu_only(f"{name}: an exported file ({kind})", device, precision)
    if kind == "onnx" and importlib.util.find_spec("onnxruntime") is None:  # a message, not a load-time traceback
        raise ValueError(f"{name}: serving an ONNX file needs onnxruntime, which is not installed: "
                         "pip install 'vggnet[serve,export]'")
    if kind in CODE_KINDS and not trust_model_code:
        what = "a compiled shared library" if kind == "pt2" else "a TorchScript program"
        raise ValueError(f"{name}: a {kind} file holds {what} that runs when it loads; serve it only if you trust "
                         "it, with --trust-model-code (ServeSettings.trust_model_code), or export ONNX instead")
    return kind


class ModelVersion:
    """One loaded (or loading, or failed) version: its predictor, batcher and state."""

    def __init__(self, config: ModelConfig, version: str, settings: ServeSettings) -> None:
        self.name, self.version, self.file = config.name, version, config.versions[version]
        self.runtime_name = config.runtime or settings.runtime
        self.calib_data = config.calib_data or settings.calib_data
        self.calib_n = settings.calib_n
        self.trust_model_code = settings.trust_model_code
        self.device, self.precision = settings.device, settings.precision
        #: the export format of an exported file ("onnx", then "onnx-int8" once loaded if it is one); None for a
        #: checkpoint
        self.format: str | None = exported_kind(self.file)
        self.max_batch_size = config.max_batch_size or settings.max_batch_size
        self.max_delay_ms = config.max_delay_ms if config.max_delay_ms is not None else settings.max_delay_ms
        self.batching = config.batching if config.batching is not None else settings.batching
        self.max_queue = max(config.max_queue or settings.max_queue, self.max_batch_size)
        self.max_explain_jobs = max(1, settings.max_explain_jobs)
        self.state, self.reason = "LOADING", ""
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    @property
    def prep(self) -> Preprocessing:
        if self.predictor is None:
            raise unavailable(f"model {self.name!r} version {self.version} is {self.state}"
                              + (f": {self.reason}" if self.reason else ""))
        return self.predictor.prep

    @property
    def explain_model(self) -> torch.nn.Module | None:
        """The model Grad-CAM runs on (a checkpoint's, as loaded); None for an exported file or while loading."""
        return getattr(self.predictor, "model", None)

    @property
    def runtime_label(self) -> str:
        if self.format is not None:  # what runs it is the format: "onnx-int8" is ORT INT8, as the runtime is
            return self.format
        runtime = getattr(self.predictor, "runtime", None)
        return str(getattr(runtime, "name", self.runtime_name))

    @property
    def platform(self) -> str:
        """The V2 metadata's ``platform``: what executes the model, for clients that pick on it."""
        return _PLATFORMS.get(self.format or "", "pytorch")

    def load(self, metrics: ServeMetrics, compute_lock: threading.Semaphore, warmup: bool) -> None:
        """Load the checkpoint with its runtime, or the exported file as it is, warm it up, start the worker.
        Errors leave it UNAVAILABLE."""
        metrics.set_state(self.name, self.version, "LOADING")
        try:
            predictor = self._load_exported() if self.format is not None else self._load_checkpoint()
            if warmup:  # first calls pick kernels / compile: pay that now, not in the first request's latency
                c, s = predictor.prep.in_channels, predictor.prep.image_size
                for n in sorted({1, self.max_batch_size}):
                    predictor.logits(torch.zeros(n, c, s, s))
            if predictor.model is not None:
                cam.preload()  # Grad-CAM's imports now, in the loader, not in the first /explain
            self.predictor = predictor
            self.batcher = Batcher(predictor.logits, max_batch_size=self.max_batch_size,
                                   max_delay_ms=self.max_delay_ms, batching=self.batching, max_queue=self.max_queue,
                                   max_jobs=self.max_explain_jobs, compute_lock=compute_lock, metrics=metrics,
                                   labels=(self.name, self.version)).start()
        except Exception as exc:
            log.error("model %s version %s failed to load: %s: %s", self.name, self.version, type(exc).__name__, exc)
            self.state, self.reason = "UNAVAILABLE", without_paths(f"{type(exc).__name__}: {exc}")
        else:
            self.state = "READY"
            if hasattr(predictor.runtime, "summary"):  # auto: what it measured and picked
                log.info("model %s version %s: runtime auto picked %s\n%s", self.name, self.version,
                         self.runtime_label, predictor.runtime.summary())
            log.info("model %s version %s ready (%s, runtime %s, batch <= %d, delay %.1f ms%s)", self.name,
                     self.version, self.file, self.runtime_label, self.max_batch_size, self.max_delay_ms,
                     "" if self.batching else ", batching off")
        metrics.set_state(self.name, self.version, self.state)

    def _load_checkpoint(self) -> Predictor:
        ensure_runtime(self.runtime_name)
        model, extra = load_checkpoint(self.file)
        prep = Preprocessing.from_meta(checkpoint_meta(self.file, model, extra))
        calib = calibration_batch(self.calib_data, self.calib_n, prep) if self.calib_data else None
        predictor = Predictor(model, prep, self.runtime_name, calib=calib, max_batch=self.max_batch_size,
                              device=self.device, precision=self.precision)
        predictor.source = self.file
        return predictor

    def _load_exported(self) -> Predictor:
        """The exported file behind the same Predictor interface the batcher and routes use (preprocessing
        from the file's metadata); calibration images are not needed: an INT8 file carries its scales."""
        from vggnet.export import load_exported  # only when a version is exported: ONNX Runtime is optional

        check_exported(self.file, self.runtime_name, self.trust_model_code, self.device, self.precision)
        if self.calib_data:
            log.info("model %s version %s: an exported file needs no calibration images; calib_data is not used",
                     self.name, self.version)
        exported = load_exported(self.file)
        self.format = exported.format
        return exported.predictor(max_batch=self.max_batch_size)

    def close(self, metrics: ServeMetrics, timeout: float) -> None:
        if self.batcher is not None:
            metrics.set_state(self.name, self.version, "UNLOADING")
            if not self.batcher.close(timeout):
                log.warning("model %s version %s: queue not drained after %.0f s", self.name, self.version, timeout)
        self.state = "UNAVAILABLE"
        self.reason = "server shut down"
        metrics.set_state(self.name, self.version, self.state)


def calibration_batch(source: str | os.PathLike, n: int, prep: Preprocessing) -> torch.Tensor:
    """``n`` images spread evenly over ``source`` (folder, glob or file), preprocessed as requests are: what
    the int8 / onnx-int8 runtimes calibrate on and ``auto`` measures agreement and speed on. The same rule
    as ``vggnet predict --calib-data``."""
    from vggnet.infer import expand_image_paths, load_images
    from vggnet.infer.images import evenly_spaced

    return preprocess(load_images(evenly_spaced(expand_image_paths([source]), n)), prep)


def ensure_runtime(name: str) -> None:
    """Make optional runtimes (``vggnet.infer.runtimes``: channels_last, bf16, int8, onnx, auto...) register
    themselves before a name is looked up; the eager runtime needs nothing."""
    from vggnet.infer import RUNTIMES

    if name in RUNTIMES:
        return
    try:
        importlib.import_module("vggnet.infer.runtimes")
    except ModuleNotFoundError as exc:
        if exc.name != "vggnet.infer.runtimes":
            raise
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; available: {', '.join(sorted(RUNTIMES))}")


class ServedModel:
    """A model name: its versions and the router for requests that name no version."""

    def __init__(self, config: ModelConfig, settings: ServeSettings) -> None:
        self.config = config
        self.versions = {v: ModelVersion(config, v, settings) for v in config.ordered_versions}
        self.router = VersionRouter(config.default_version, config.ab)

    @property
    def routed_versions(self) -> list[str]:
        """The versions unversioned requests go to: the A/B set, else the default."""
        return [v for v, w in self.config.ab.items() if w > 0] or [self.config.default_version]

    @property
    def ready(self) -> bool:
        return all(self.versions[v].ready for v in self.routed_versions)


class ModelServer:
    """Everything behind the routes: the models, their loading and shutdown, and request routing."""

    def __init__(self, repo: ModelRepository, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.repo, self.settings, self.metrics = repo, settings, metrics
        self.models = {name: ServedModel(config, settings) for name, config in repo.models.items()}
        self.compute_lock = threading.BoundedSemaphore(max(1, settings.parallel_forwards))
        self.closing = False
        self.receiving = 0  # request bodies being received or decoded now (see admitted)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = settings.decode_threads or cores
        # A pool of its own rather than anyio's 40 shared threads: more decoders than cores only adds memory
        # (every admitted body waits here, bounded by max_concurrency) and takes CPU from the event loop.
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="vggnet-decode", initializer=_lower_priority)
        self._loader: threading.Thread | None = None
        for model in self.models.values():
            for mv in model.versions.values():
                metrics.set_state(mv.name, mv.version, mv.state)

    def all_versions(self) -> list[ModelVersion]:
        return [mv for model in self.models.values() for mv in model.versions.values()]

    def load_all(self) -> None:
        for mv in self.all_versions():
            if self.closing:
                break
            mv.load(self.metrics, self.compute_lock, self.settings.warmup)

    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self.load_all, name="model-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
            return not self._loader.is_alive()
        return True

    @property
    def ready(self) -> bool:
        """Ready = not shutting down and every configured version loaded: a broken version keeps the pod out
        of the load balancer instead of answering 503 to a share of the traffic."""
        return not self.closing and all(mv.ready for mv in self.all_versions())

    def close(self) -> None:
        self.closing = True
        self.wait_loaded(self.settings.drain_timeout_s)
        for mv in self.all_versions():
            mv.close(self.metrics, self.settings.drain_timeout_s)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the decode pool; a request cancelled while waiting there is dropped unstarted."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    def model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise not_found(f"unknown model {name!r}; served: {', '.join(sorted(self.models))}")
        return model

    def version(self, name: str, version: str | None) -> ModelVersion:
        """The version a request names, or the routed one (default / A/B) when it names none."""
        model = self.model(name)
        if version is None or version == "":
            version = model.router.choose()
        mv = model.versions.get(version)
        if mv is None:
            raise not_found(f"model {name!r} has no version {version!r}; versions: {', '.join(model.versions)}")
        return mv

    def default_model(self, name: str | None) -> str:
        if name:
            return name
        if len(self.models) == 1:
            return next(iter(self.models))
        raise bad_request(f"several models are served; name one with ?model= ({', '.join(sorted(self.models))})")

    def _batcher(self, mv: ModelVersion) -> Batcher:
        if self.closing:
            raise unavailable("the server is shutting down")
        if not mv.ready or mv.batcher is None:
            raise unavailable(f"model {mv.name!r} version {mv.version} is {mv.state}"
                              + (f": {mv.reason}" if mv.reason else ""))
        return mv.batcher

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """A slot for receiving and decoding one request body; 503 at once, before any byte of the body is
        read, when ``max_concurrency`` bodies are already in hand. Used on the event loop only, so the
        count needs no lock."""
        limit = self.settings.max_concurrency
        if limit and self.receiving >= limit:
            self.metrics.admission_refused.inc()
            raise unavailable(f"{limit} requests are being received already; retry shortly", retry_after_s=1)
        self.receiving += 1
        try:
            yield
        finally:
            self.receiving -= 1

    def arriving(self, mv: ModelVersion) -> contextlib.AbstractContextManager[None]:
        """Announce a request to ``mv`` while its body is read and checked (see ``Batcher.arriving``);
        503 at once when the version cannot take requests, before the body is read."""
        return self._batcher(mv).arriving()

    def submit(self, mv: ModelVersion, x: torch.Tensor) -> concurrent.futures.Future:
        try:
            return self._batcher(mv).submit(x)
        except QueueFull as exc:
            raise unavailable(f"model {mv.name!r} version {mv.version} is overloaded: {exc}") from None
        except BatcherClosed as exc:
            raise unavailable(str(exc)) from None

    def check_accepting(self, mv: ModelVersion) -> None:
        """503 at once when ``mv`` cannot take requests (loading, failed, draining), before a body is read."""
        self._batcher(mv)

    def submit_job(self, mv: ModelVersion, job: Callable[[], Any]) -> concurrent.futures.Future:
        """Queue ``job`` on ``mv``'s worker (see ``Batcher.submit_job``); 503 when its share is taken."""
        try:
            return self._batcher(mv).submit_job(job)
        except QueueFull as exc:
            raise unavailable(f"model {mv.name!r} version {mv.version} is busy: {exc}", retry_after_s=2) from None
        except BatcherClosed as exc:
            raise unavailable(str(exc)) from None

    async def result(self, mv: ModelVersion, future: concurrent.futures.Future) -> tuple[Any, BatchInfo]:
        """Await a submitted request: 503 after ``request_timeout_s`` (the request is cancelled if still
        queued), 500 if the model itself failed on validated input."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.settings.request_timeout_s)
        except TimeoutError:
            raise unavailable(f"no result within {self.settings.request_timeout_s:g} s; the server is overloaded",
                              retry_after_s=5) from None
        except Exception as exc:  # validated input that still failed: the model's fault, not the client's
            log.error("inference failed for model %s version %s: %r", mv.name, mv.version, exc)
            raise ServeError(500, "internal error") from None  # details in the log, never to the client

    async def infer(self, mv: ModelVersion, x: torch.Tensor) -> tuple[torch.Tensor, BatchInfo]:
        return await self.result(mv, self.submit(mv, x))


# --- observability middleware -------------------------------------------------------------------------------


class ObservabilityMiddleware:
    """Request id, in-flight gauge, per-route counters and latency, and one JSON access-log line per request.

    Plain ASGI rather than ``BaseHTTPMiddleware``: no extra task or body copy per request. The route is
    read from ``scope["route"]`` after routing, so metrics are labelled by template.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, log_access: bool = True) -> None:
        self.app, self.metrics, self.log_access = app, metrics, log_access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        info: dict[str, Any] = {}
        scope["vggnet.log"] = info
        scope["vggnet.request_id"] = request_id
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(template, scope.get("method", ""), status, seconds)
            if self.log_access:
                client = scope.get("client")
                record = {"ts": round(time.time(), 3), "request_id": request_id, "method": scope.get("method"),
                          "path": scope.get("path"), "route": template, "status": status,
                          "ms": round(seconds * 1000, 2), "client": f"{client[0]}:{client[1]}" if client else None,
                          **info}
                access_log.info(json.dumps(record, separators=(",", ":")))


# --- the app ------------------------------------------------------------------------------------------------


def _lower_priority() -> None:
    """Lower this worker thread's scheduling priority (nice +5; Linux, where the nice value is per thread).

    On two cores a storm of decodes otherwise shares the CPU evenly with the event loop, and a liveness
    probe waits behind them; the decoders still get every cycle the loop leaves idle.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _internal(request: Request) -> JSONResponse:
    """A 500 says nothing of what failed (exception text can hold paths, code or data): only a request id
    that finds the logged details."""
    request_id = request.scope.get("vggnet.request_id", "")
    return JSONResponse({"error": "internal error", "request_id": request_id}, status_code=500)


_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"():,/]+/)*([^\s'\"():,/]+)")


def without_paths(text: str) -> str:
    """``text`` with every absolute path cut to its file name: load errors reach the repository index and
    503 bodies, which must not map the server's filesystem for a client."""
    return _ABS_PATH.sub(r"\1", text)


def _note(request: Request, **fields: Any) -> None:
    """Add fields (model, version, batch...) to this request's access-log line."""
    info = request.scope.get("vggnet.log")
    if info is not None:
        info.update(fields)


def _image_media(request: Request) -> str:
    """The media type of an image upload (/predict, /explain): multipart or an image type, else 415."""
    media = media_type(request)
    if media != "multipart/form-data" and media not in IMAGE_MEDIA_TYPES:
        raise ServeError(415, f"content type {media or 'missing'!r} not accepted; send multipart/form-data "
                              "with one image file, or the image itself as image/jpeg, image/png, image/webp, "
                              "image/bmp, image/gif or application/octet-stream")
    return media


def _topk(request: Request, default: int, classes: int) -> int:
    text = request.query_params.get("topk")
    if text is None:
        return min(default, classes)
    try:
        k = int(text)
    except ValueError:
        raise bad_request(f"topk must be an integer, got {text!r}") from None
    if k < 1:
        raise bad_request(f"topk must be at least 1, got {k}")
    return min(k, classes)


def _parse_infer(body: bytes, encoding: str | None, header_length: str | None, prep: Preprocessing,
                 max_batch: int, limit: int) -> tuple[Any, torch.Tensor, Any]:
    """A V2 infer body -> (parsed request, input tensor, requested outputs), checked; run in a worker thread."""
    parsed = v2.parse_request(decompress(body, encoding, limit), header_length)
    return parsed, v2.input_tensor(parsed, prep, max_batch), v2.requested_outputs(parsed, prep)


def _image_batch(data: bytes, prep: Preprocessing, max_pixels: int) -> torch.Tensor:
    """Decode (pixel limit checked first) and preprocess exactly as ``Predictor.predict`` does."""
    image = decode_image(data, max_pixels)
    try:
        return preprocess([image], prep)
    finally:
        image.close()


async def _upload_bytes(request: Request, body: bytes) -> bytes:
    """The one file of a multipart upload (any field name), parsed from the already size-capped body."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form(max_files=1, max_fields=16)
    except StarletteHTTPException as exc:
        raise bad_request(f"malformed multipart body: {exc.detail}") from None
    except Exception as exc:  # python-multipart's parse errors
        raise bad_request(f"malformed multipart body: {exc}") from None
    try:
        files = [value for _, value in form.multi_items() if not isinstance(value, str)]
        if len(files) != 1:
            raise bad_request(f"expected one image file in the multipart body, got {len(files)}")
        return await files[0].read()
    finally:
        await form.close()


def create_app(repo: ModelRepository, settings: ServeSettings | None = None,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The service for ``repo``. Models load in the lifespan (run it: uvicorn does; in tests use
    ``with TestClient(app)``); ``app.state.server`` is the :class:`ModelServer`."""
    settings = settings or ServeSettings()
    metrics = metrics or ServeMetrics()
    server = ModelServer(repo, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.load_in_background:
            server.start_loading()
        else:
            await run_in_threadpool(server.load_all)
        yield
        log.info("shutting down: draining queues")
        await run_in_threadpool(server.close)
        log.info("shutdown complete")

    app = FastAPI(title="vggnet", version=vggnet.__version__, lifespan=lifespan,
                  description="VGG classifiers over the Open Inference Protocol (V2)")
    app.state.server = server
    app.state.metrics = metrics
    if settings.api_keys:  # inside the observability middleware, so refused requests are counted and logged
        app.add_middleware(AuthMiddleware, keys=settings.api_keys, public=settings.public_endpoints)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, log_access=settings.access_log)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _internal(request) if exc.status == 500 else _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s (request id %s)", request.url.path,
                      request.scope.get("vggnet.request_id", ""))
        return _internal(request)

    # --- health and metadata ------------------------------------------------------------------------------

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "vggnet", "version": vggnet.__version__,
                "extensions": ["binary_tensor_data", "classification", "model_repository"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = server.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> list[dict[str, str]]:
        body = await read_body(request, 64 * 1024)
        only_ready = False
        if body.strip():
            try:
                options = json.loads(body)
            except ValueError as exc:
                raise bad_request(f"repository index body is not valid JSON: {exc}") from None
            if not isinstance(options, dict):
                raise bad_request("repository index body must be a JSON object, e.g. {\"ready\": true}")
            only_ready = bool(options.get("ready", False))
        return [{"name": mv.name, "version": mv.version, "state": mv.state, "reason": mv.reason}
                for mv in server.all_versions() if mv.ready or not only_ready]

    def _metadata(name: str, version: str | None) -> dict[str, Any]:
        model = server.model(name)
        mv = server.version(name, version) if version else model.versions[model.config.default_version]
        versions = [mv.version] if version else list(model.versions)
        params: dict[str, Any] = {"runtime": mv.runtime_label, "max_batch_size": mv.max_batch_size}
        if not version:
            params.update(default_version=model.config.default_version, ab=model.config.ab)
        params["format"] = mv.format or "checkpoint"
        return v2.model_metadata(name, versions, mv.prep, platform=mv.platform, parameters=params)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> dict[str, Any]:
        return _metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}")
    async def model_version_metadata(name: str, version: str) -> dict[str, Any]:
        return _metadata(name, version)

    def _ready(name: str, version: str | None) -> JSONResponse:
        model = server.model(name)
        ok = server.version(name, version).ready if version else model.ready
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok and not server.closing else 503)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        return _ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str) -> JSONResponse:
        return _ready(name, version)

    def _config(name: str, version: str | None) -> dict[str, Any]:
        model = server.model(name)
        mv = server.version(name, version) if version else model.versions[model.config.default_version]
        return v2.model_config(name, mv.prep, max_batch_size=mv.max_batch_size, max_delay_ms=mv.max_delay_ms,
                               batching=mv.batching, platform=mv.platform)

    @app.get("/v2/models/{name}/config")
    async def model_config(name: str) -> dict[str, Any]:
        return _config(name, None)

    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_version_config(name: str, version: str) -> dict[str, Any]:
        return _config(name, version)

    # --- inference ----------------------------------------------------------------------------------------

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        header_length = request.headers.get(v2.HEADER_LENGTH)
        v2.check_json_media(media_type(request), header_length)
        mv = server.version(name, version)  # 404 / A/B choice before a byte of the body is read
        _note(request, model=mv.name, version=mv.version)
        with server.admitted(), server.arriving(mv):
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
            prep = mv.prep
            # inflating, JSON parsing and tensor building are CPU work: off the event loop, so a 32 MiB body
            # does not stall other connections (health probes included)
            parsed, x, outputs = await server.offload(
                _parse_infer, body, request.headers.get("content-encoding"), header_length, prep, mv.max_batch_size,
                settings.max_body_bytes)
            future = server.submit(mv, x)
        logits, info = await server.result(mv, future)
        _note(request, rows=int(x.shape[0]), batch=info.batch_rows, queue_ms=round(info.queue_s * 1000, 2),
              compute_ms=round(info.compute_s * 1000, 2))
        payload, headers = v2.encode_response(
            logits, outputs, prep, model_name=mv.name, model_version=mv.version, request_id=parsed.id,
            parameters={"batch_size": info.batch_rows, "queue_ms": round(info.queue_s * 1000, 3),
                        "compute_ms": round(info.compute_s * 1000, 3)})
        media = headers.pop("content-type")
        headers["x-model-version"] = mv.version
        return Response(payload, media_type=media, headers=headers)

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        return await _infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(request: Request, name: str, version: str) -> Response:
        return await _infer(request, name, version)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """An image (multipart upload or the raw body) → top-k labels; ?model=&version=&topk=."""
        media = _image_media(request)
        mv = server.version(server.default_model(request.query_params.get("model")),
                            request.query_params.get("version"))
        _note(request, model=mv.name, version=mv.version)
        prep = mv.prep
        k = _topk(request, settings.topk, prep.num_classes)
        with server.admitted(), server.arriving(mv):
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
            data = await _upload_bytes(request, body) if media == "multipart/form-data" else body
            if not data:
                raise bad_request("empty body; send an image")
            x = await server.offload(_image_batch, data, prep, settings.max_image_pixels)
            future = server.submit(mv, x)
        logits, info = await server.result(mv, future)
        _note(request, rows=1, batch=info.batch_rows, queue_ms=round(info.queue_s * 1000, 2),
              compute_ms=round(info.compute_s * 1000, 2))
        probs = logits.float().softmax(1)[0]
        values, indices = probs.topk(k)
        predictions = [{"label": prep.label(int(i)), "index": int(i), "probability": float(v)}
                       for v, i in zip(values, indices, strict=True)]
        return JSONResponse({"model_name": mv.name, "model_version": mv.version, "predictions": predictions},
                            headers={"x-model-version": mv.version})

    @app.post("/explain")
    async def explain(request: Request) -> Response:
        """An image (as for /predict) → Grad-CAM of one class at one layer over the crop the network saw:
        a PNG overlay, or JSON with the map (``format=json`` or ``Accept: application/json``);
        ?model=&version=&class=&layer=&format=. Runs on the version's worker, between batches (a bounded
        number at a time: ``max_explain_jobs``); an exported file cannot be explained (501)."""
        media = _image_media(request)
        mv = server.version(server.default_model(request.query_params.get("model")),
                            request.query_params.get("version"))
        _note(request, model=mv.name, version=mv.version)
        prep = mv.prep
        model = mv.explain_model
        # 501 for an exported file, 400 for a bad class / layer / format: all before a byte of the body is read
        spec = cam.parse_spec(model, prep, request.query_params, request.headers.get("accept"),
                              f"model {mv.name!r} version {mv.version} ({mv.runtime_label})")
        server.check_accepting(mv)
        with server.admitted():
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
            data = await _upload_bytes(request, body) if media == "multipart/form-data" else body
            if not data:
                raise bad_request("empty body; send an image")
            x = await server.offload(_image_batch, data, prep, settings.max_image_pixels)
            future = server.submit_job(mv, functools.partial(cam.run_cam, model, x, spec))
        out, info = await server.result(mv, future)
        metrics.explain_latency.labels(mv.name, mv.version).observe(info.compute_s)
        _note(request, rows=1, batch=1, queue_ms=round(info.queue_s * 1000, 2),
              compute_ms=round(info.compute_s * 1000, 2), explained=out.target, layer=out.layer)
        payload, media_out, headers = await server.offload(cam.render, out, x, prep, spec, mv.name, mv.version)
        return Response(payload, media_type=media_out, headers=headers)

    # --- the web page (public: static files only; see vggnet.serve.web) ----------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return web.page_response("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def page_file(name: str) -> Response:
        return web.page_response(name)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, headers={"content-type": content_type})

    return app


def run_server(repo: ModelRepository, settings: ServeSettings | None = None, host: str = "127.0.0.1",
               port: int = 8000, log_level: str = "info") -> None:
    """Serve ``repo`` with uvicorn until SIGINT/SIGTERM; shutdown drains queues (``drain_timeout_s``)."""
    import uvicorn

    settings = settings or ServeSettings()
    app = create_app(repo, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)), lifespan="on")
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn re-raises the captured signal once it has shut down, which with the default SIGTERM action kills
    # the process (exit -15) after a clean drain. A no-op handler underneath turns that into a normal exit 0,
    # so orchestrators and scripts can tell a graceful stop from a crash.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def with_overrides(settings: ServeSettings, **changes: Any) -> ServeSettings:
    """``dataclasses.replace`` that ignores ``None`` (an option not given on the command line)."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
