"""One served model version: loading it (a checkpoint with a runtime, or an exported file as it is), warming it
up, starting its batcher, and draining it at shutdown.

A version that fails to load stays UNAVAILABLE with its reason (paths cut out) while the others serve. Exported
files that run code when loaded (``.pt2``, TorchScript) load only with ``trust_model_code``; ONNX runs no code
from the file. ``vggnet.export`` is imported only when an exported version loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import threading

import torch

from vggnet.errors import UsageError, VggnetError
from vggnet.infer import CALIBRATED, Predictor, Preprocessing, find_calibration, read_calibration
from vggnet.infer.predictor import check_cpu_only
from vggnet.models import checkpoint_meta, load_checkpoint

from . import cam, drift, ood
from .batcher import Batcher
from .errors import unavailable
from .metrics import ServeMetrics
from .repository import ModelConfig, exported_kind
from .settings import ServeSettings

__all__ = ["CODE_KINDS", "ModelVersion", "calibration_batch", "check_exported", "ensure_runtime", "without_paths"]

log = logging.getLogger(__name__)

#: exported kinds whose loading runs code from the file: an AOTInductor package's shared library, a TorchScript
#: program; served only with ``trust_model_code``
CODE_KINDS = ("pt2", "torchscript")
# V2 / Triton ``platform`` of an exported format (Triton's names where it has one); checkpoints are "pytorch".
_PLATFORMS = {"onnx": "onnxruntime_onnx", "onnx-int8": "onnxruntime_onnx", "torchscript": "pytorch_libtorch",
              "executorch": "executorch", "executorch-int8": "executorch", "tflite": "tflite", "tflite-int8": "tflite"}
# The mobile formats' runtimes (the edge extra): module to look for, package to name.
_EDGE_RUNTIMES = {"executorch": ("executorch", "executorch"), "tflite": ("ai_edge_litert", "ai-edge-litert")}
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"():,/]+/)*([^\s'\"():,/]+)")
#: what the server's calibration error tells the user to pass
CALIB_HINT = "pass --calib-data PATH (a folder of training images) or set calib_data in the model's config.yaml"


def check_exported(file: str | os.PathLike, runtime: str, trust_model_code: bool, device: str | None = None,
                   precision: str | None = None) -> str | None:
    """The exported kind of ``file`` (None for a checkpoint), or a UsageError when it cannot be served so.

    Checked by the CLI before the server starts (a message, not a model that never gets ready) and again when a
    version loads, for servers built with ``create_app`` directly.
    """
    kind = exported_kind(file)
    if kind is None:
        return None
    name = os.path.basename(file)
    if runtime != "eager":
        raise UsageError(f"{name}: an exported file runs in its own runtime ({kind}, with its own quantization "
                         f"if INT8); drop --runtime {runtime} (or runtime: in the model's config.yaml), or serve "
                         "the checkpoint it was exported from to use a runtime")
    check_cpu_only(f"{name}: an exported file ({kind})", device, precision)
    if kind == "onnx" and importlib.util.find_spec("onnxruntime") is None:  # a message, not a load-time traceback
        raise UsageError(f"{name}: serving an ONNX file needs onnxruntime, which is not installed: "
                         "pip install 'vggnet[serve,export]'")
    if kind in _EDGE_RUNTIMES and importlib.util.find_spec(_EDGE_RUNTIMES[kind][0]) is None:
        raise UsageError(f"{name}: serving a {kind} file needs {_EDGE_RUNTIMES[kind][1]}, which is not installed: "
                         "pip install 'vggnet[serve,edge]'")
    if kind in CODE_KINDS and not trust_model_code:
        what = "a compiled shared library" if kind == "pt2" else "a TorchScript program"
        raise UsageError(f"{name}: a {kind} file holds {what} that runs when it loads; serve it only if you trust "
                         "it, with --trust-model-code (ServeSettings.trust_model_code), or export ONNX instead")
    return kind


def ensure_runtime(name: str) -> None:
    """Let the optional runtimes register before ``name`` is looked up (the eager runtime needs nothing)."""
    from vggnet.infer import RUNTIMES

    if name in RUNTIMES:
        return
    try:
        importlib.import_module("vggnet.infer.runtimes")
    except ModuleNotFoundError as exc:
        if exc.name != "vggnet.infer.runtimes":
            raise
    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {name!r}; available: {', '.join(sorted(RUNTIMES))}")


def calibration_batch(source: str | os.PathLike | None, n: int, prep: Preprocessing,
                      ckpt: str | os.PathLike | None = None) -> torch.Tensor:
    """``n`` calibration images spread evenly and preprocessed as requests are, from ``source`` (``calib_data``: a
    folder, glob or file) when given, else from the training split of the run ``ckpt`` belongs to: the rule of
    ``vggnet predict`` and ``vggnet export`` (:func:`vggnet.infer.find_calibration`), read the same way, so a
    served int8 model matches the predicted one."""
    return read_calibration(find_calibration(ckpt, source, needed_by="calibration", hint=CALIB_HINT), n, prep)


def without_paths(text: str) -> str:
    """``text`` with every absolute path cut to its file name: load errors reach the repository index and
    503 bodies, which must not map the server's filesystem for a client."""
    return _ABS_PATH.sub(r"\1", text)


class ModelVersion:
    """One loaded (or loading, or failed) version: its predictor, batcher and state."""

    def __init__(self, config: ModelConfig, version: str, settings: ServeSettings) -> None:
        self.name, self.version, self.file = config.name, version, config.versions[version]
        self.runtime_name = config.runtime or settings.runtime
        self.calib_data = config.calib_data or settings.calib_data
        self.calib_n = settings.calib_n
        self.trust_model_code = settings.trust_model_code
        self.device, self.precision = settings.device, settings.precision
        #: the export format ("onnx", then "onnx-int8" once loaded if it is one); None for a checkpoint
        self.format: str | None = exported_kind(self.file)
        self.max_batch_size = config.max_batch_size or settings.max_batch_size
        self.max_delay_ms = config.max_delay_ms if config.max_delay_ms is not None else settings.max_delay_ms
        self.batching = config.batching if config.batching is not None else settings.batching
        self.max_queue = max(config.max_queue or settings.max_queue, self.max_batch_size)
        self.max_explain_jobs = max(1, settings.max_explain_jobs)
        self.state, self.reason = "LOADING", ""
        self.ood: dict | None = None  # the page's out-of-domain reference (see vggnet.serve.ood)
        self.adversarial_guard = settings.adversarial_guard
        self.adversarial: dict | None = None  # adversarial.json with --adversarial-guard (see vggnet.serve.guard)
        self.drift: drift.DriftMonitor | None = None  # drift.json's reference and the live window (serve.drift)
        self.drift_options = {"window": settings.drift_window, "every": settings.drift_every,
                              "min_window": settings.drift_min_window}
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
        """Load, warm up, start the worker. A failure leaves this version UNAVAILABLE, never the server down."""
        metrics.set_state(self.name, self.version, "LOADING")
        try:
            predictor = self._load_exported() if self.format is not None else self._load_checkpoint()
            if warmup:  # first calls pick kernels / compile: pay that now, not in the first request's latency
                c, s = predictor.prep.in_channels, predictor.prep.image_size
                for n in sorted({1, self.max_batch_size}):
                    predictor.logits(torch.zeros(n, c, s, s))
            if predictor.model is not None:
                cam.preload()  # Grad-CAM's imports now, in the loader, not in the first /explain
            if self.adversarial_guard:  # no threshold, no guard: the version does not load (UsageError)
                from .guard import reference

                self.adversarial = reference(self.file)
            self.ood = ood.reference_for(self.file, predictor.logits, predictor.prep)
            self.drift = drift.monitor_for(self.file, predictor.prep.num_classes, **self.drift_options)
            self.predictor = predictor
            self.batcher = Batcher(predictor.logits, max_batch_size=self.max_batch_size,
                                   max_delay_ms=self.max_delay_ms, batching=self.batching, max_queue=self.max_queue,
                                   max_jobs=self.max_explain_jobs, compute_lock=compute_lock, metrics=metrics,
                                   labels=(self.name, self.version)).start()
        except (VggnetError, OSError) as exc:  # a file or setting the user gave: its message says what
            log.error("model %s version %s failed to load: %s: %s", self.name, self.version, type(exc).__name__, exc)
            self._failed(exc)
        except Exception as exc:  # anything else may be a bug: the traceback goes to the log
            log.exception("model %s version %s failed to load", self.name, self.version)
            self._failed(exc)
        else:
            self._loaded(predictor)
        metrics.set_state(self.name, self.version, self.state)

    def _failed(self, exc: Exception) -> None:
        self.state, self.reason = "UNAVAILABLE", without_paths(f"{type(exc).__name__}: {exc}")

    def _loaded(self, predictor: Predictor) -> None:
        self.state = "READY"
        if hasattr(predictor.runtime, "summary"):  # auto: what it measured and picked
            log.info("model %s version %s: runtime auto picked %s\n%s", self.name, self.version,
                     self.runtime_label, predictor.runtime.summary())
        log.info("model %s version %s ready (%s, runtime %s, batch <= %d, delay %.1f ms%s)", self.name,
                 self.version, self.file, self.runtime_label, self.max_batch_size, self.max_delay_ms,
                 "" if self.batching else ", batching off")

    def _load_checkpoint(self) -> Predictor:
        ensure_runtime(self.runtime_name)
        model, extra = load_checkpoint(self.file)
        prep = Preprocessing.from_meta(checkpoint_meta(self.file, model, extra))
        calib = self._calibration(prep)
        predictor = Predictor(model, prep, self.runtime_name, calib=calib, max_batch=self.max_batch_size,
                              device=self.device, precision=self.precision)
        predictor.source = self.file
        return predictor

    def _calibration(self, prep: Preprocessing) -> torch.Tensor | None:
        """The calibration batch of a calibrated runtime, by the rule of every INT8 path (``calib_data``, else the
        run's training split, else an error saying what to pass), logged with where it came from."""
        if self.runtime_name not in CALIBRATED and not self.calib_data:
            return None
        source = find_calibration(self.file, self.calib_data, hint=CALIB_HINT,
                                  needed_by=f"runtime {self.runtime_name} (model {self.name})")
        calib = read_calibration(source, self.calib_n, prep)
        if self.runtime_name in CALIBRATED:
            log.info("model %s version %s: calibrating %s on %d images of %s", self.name, self.version,
                     self.runtime_name, len(calib), source.description)
        return calib

    def _load_exported(self) -> Predictor:
        """The exported file behind the Predictor interface the batcher and routes use; an INT8 file carries
        its own scales, so calibration images are not needed."""
        from vggnet.export import load_exported  # only when a version is exported: ONNX Runtime is optional

        check_exported(self.file, self.runtime_name, self.trust_model_code, self.device, self.precision)
        if self.calib_data:
            log.info("model %s version %s: an exported file needs no calibration images; calib_data is not used",
                     self.name, self.version)
        exported = load_exported(self.file)
        self.format = exported.format
        return exported.predictor(max_batch=self.max_batch_size)

    def close(self, metrics: ServeMetrics, timeout: float, reason: str = "server shut down",
              release: bool = False) -> None:
        """Drain the queue (up to ``timeout``), then mark the version UNAVAILABLE with ``reason``; ``release``
        drops the model too (an unload: its memory is freed, and requests get 503 saying why)."""
        if self.batcher is not None:
            if self.state == "READY":  # new requests are refused from now on, queued ones are still answered
                self.state = "UNLOADING"
            metrics.set_state(self.name, self.version, "UNLOADING")
            if not self.batcher.close(timeout):
                log.warning("model %s version %s: queue not drained after %.0f s", self.name, self.version, timeout)
        self.state = "UNAVAILABLE"
        self.reason = reason
        if release:
            self.predictor, self.batcher = None, None
        metrics.set_state(self.name, self.version, self.state)
