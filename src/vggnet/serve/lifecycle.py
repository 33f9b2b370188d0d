"""The models of one server process over their life: loaded in the app's lifespan (in a background thread by
default, so liveness probes are answered while a big model loads), routed to while they serve, unloaded and
loaded again on request (Triton's model repository extension: :meth:`ModelServer.unload_model`,
:meth:`ModelServer.load_model`), drained at shutdown (SIGTERM under uvicorn: it stops accepting connections and
waits for in-flight requests, then each model's queue is finished before its worker stops).

:class:`ModelServer` is what the routes reach through ``app.state.server`` (see :mod:`vggnet.serve.deps`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from vggnet.errors import VggnetError

from .batcher import Batcher, BatcherClosed, BatchInfo, QueueFull
from .errors import ServeError, bad_request, not_found, unavailable
from .metrics import ServeMetrics
from .middleware import Admission
from .repository import ModelConfig, ModelRepository, VersionRouter
from .settings import ServeSettings
from .versions import ModelVersion, without_paths

__all__ = ["ModelServer", "ServedModel", "lifespan"]

log = logging.getLogger(__name__)


def _lower_priority() -> None:
    """Lower this worker thread's scheduling priority (nice +5; Linux, where the nice value is per thread):
    on two cores a storm of decodes would otherwise share the CPU evenly with the event loop, and a liveness
    probe would wait behind them; the decoders still get every cycle the loop leaves idle."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5))


class ServedModel:
    """A model name: its versions and the router for requests that name no version."""

    def __init__(self, config: ModelConfig, settings: ServeSettings) -> None:
        self.config = config
        self.versions = {v: ModelVersion(config, v, settings) for v in config.ordered_versions}
        self.router = VersionRouter(config.default_version, config.ab)
        #: unloaded on request: it no longer counts towards the server's readiness
        self.unloaded = False

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
        self.admission = Admission(settings.max_concurrency, metrics)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = settings.decode_threads or cores
        # A pool of its own rather than anyio's 40 shared threads: more decoders than cores only adds memory
        # (every admitted body waits here, bounded by max_concurrency) and takes CPU from the event loop.
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="vggnet-decode", initializer=_lower_priority)
        self._loader: threading.Thread | None = None
        self._control = threading.Lock()  # one load or unload at a time, and none during shutdown
        for mv in self.all_versions():
            metrics.set_state(mv.name, mv.version, mv.state)

    # --- lifecycle ----------------------------------------------------------------------------------------

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
        of the load balancer instead of answering 503 to a share of the traffic. A model unloaded on request
        does not count (Triton's rule: the server is ready when the models it should serve are)."""
        return not self.closing and all(mv.ready for model in self.models.values() if not model.unloaded
                                        for mv in model.versions.values())

    def close(self) -> None:
        """Refuse new requests, let loading stop, drain every version's queue, stop the decoders."""
        self.closing = True
        self.wait_loaded(self.settings.drain_timeout_s)
        if self._control.acquire(timeout=self.settings.drain_timeout_s):  # a load in progress finishes first
            self._control.release()
        for mv in self.all_versions():
            mv.close(self.metrics, self.settings.drain_timeout_s)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # --- model control: Triton's model repository extension ---------------------------------------------------

    def _controlled(self) -> contextlib.AbstractContextManager[bool]:
        """The control lock, once the startup loading is over (503 before: it would race the loader)."""
        if self.closing:
            raise unavailable("the server is shutting down")
        if self._loader is not None and self._loader.is_alive():
            raise unavailable("the models are still loading; retry once /v2/health/ready answers", retry_after_s=5)
        return self._control

    def unload_model(self, name: str) -> None:
        """Stop serving ``name``: new requests get 503 at once, queued ones are answered, then its weights are
        dropped. Blocking (up to ``drain_timeout_s`` per version): call it from a worker thread."""
        with self._controlled():
            model = self.model(name)
            model.unloaded = True
            for mv in model.versions.values():
                mv.close(self.metrics, self.settings.drain_timeout_s, reason="unloaded", release=True)
            log.info("model %s unloaded", name)

    def load_model(self, name: str) -> None:
        """Serve ``name`` afresh: its folder (versions, ``config.yaml``) and files are read again and every version
        is loaded beside the running ones, which keep answering until the new ones are all READY and take over.
        A version that fails to load leaves the model as it was: 400 with the reasons. A model folder that was not
        served yet (``root/name``) is served from now on. Blocking: call it from a worker thread."""
        with self._controlled():
            old = self.models.get(name)
            new = ServedModel(self._read_config(name, old), self.settings)
            for mv in new.versions.values():
                mv.load(self.metrics, self.compute_lock, self.settings.warmup)
            failed = [mv for mv in new.versions.values() if not mv.ready]
            if failed:
                reasons = "; ".join(f"version {mv.version}: {mv.reason}" for mv in failed)
                for mv in new.versions.values():
                    mv.close(self.metrics, self.settings.drain_timeout_s, reason="load failed", release=True)
                self._publish_states(old)
                kept = "the model stays as it was" if old is not None else "nothing is served under that name"
                raise bad_request(f"model {name!r} not loaded ({kept}): {reasons}")
            # a new dict rather than an item assignment: the event loop may be iterating the old one
            self.models = {**self.models, name: new}
            if old is not None:
                for mv in old.versions.values():
                    mv.close(self.metrics, self.settings.drain_timeout_s, reason="replaced by a new load",
                             release=True)
            self._publish_states(new)
            log.info("model %s loaded (versions %s)", name, ", ".join(new.versions))

    def _read_config(self, name: str, old: ServedModel | None) -> ModelConfig:
        """The model's configuration as it is on disk now: its folder read again, its file for a --ckpt model,
        ``root/name`` for a model not served yet; a mistake in them is 400 (paths cut to file names)."""
        folder = old.config.folder if old is not None else self.repo.new_model_folder(name)
        if old is not None and folder is None:
            return old.config
        if folder is None:
            raise not_found(f"unknown model {name!r}; served: {', '.join(sorted(self.models))}"
                            + ("; a new model is loaded from the repository folder of its name" if self.repo.root
                               else ""))
        try:
            config = ModelConfig.from_dir(folder)
        except (VggnetError, OSError) as exc:
            raise bad_request(f"model {name!r} not loaded: {without_paths(str(exc))}") from None
        if config.name != name:
            raise bad_request(f"model {name!r} not loaded: its config.yaml names it {config.name!r}; a renamed model "
                              "is served under its new name after a restart")
        return config

    def _publish_states(self, model: ServedModel | None) -> None:
        """``vggnet_model_state`` of ``model``'s versions again: a closed load shares their labels."""
        for mv in (model.versions.values() if model is not None else ()):
            self.metrics.set_state(mv.name, mv.version, mv.state)

    # --- routing a request --------------------------------------------------------------------------------

    @property
    def receiving(self) -> int:
        """Request bodies being received or decoded now (see :meth:`admitted`)."""
        return self.admission.receiving

    def admitted(self) -> contextlib.AbstractContextManager[None]:
        """A slot for receiving and decoding one request body (``max_concurrency``); 503 when none is free."""
        return self.admission.admitted()

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

    def arriving(self, mv: ModelVersion) -> contextlib.AbstractContextManager[None]:
        """Announce a request to ``mv`` while its body is read and checked (see ``Batcher.arriving``);
        503 at once when the version cannot take requests, before the body is read."""
        return self._batcher(mv).arriving()

    def check_accepting(self, mv: ModelVersion) -> None:
        """503 at once when ``mv`` cannot take requests (loading, failed, draining), before a body is read."""
        self._batcher(mv)

    def submit(self, mv: ModelVersion, x: torch.Tensor) -> concurrent.futures.Future:
        try:
            return self._batcher(mv).submit(x)
        except QueueFull as exc:
            raise unavailable(f"model {mv.name!r} version {mv.version} is overloaded: {exc}") from None
        except BatcherClosed as exc:
            raise unavailable(str(exc)) from None

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
        except Exception:  # the worker's failure on validated input, whatever its type: the model's fault
            log.exception("inference failed for model %s version %s", mv.name, mv.version)
            raise ServeError(500, "internal error") from None  # details in the log, never to the client

    async def infer(self, mv: ModelVersion, x: torch.Tensor) -> tuple[torch.Tensor, BatchInfo]:
        return await self.result(mv, self.submit(mv, x))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the models when the app starts (``create_app`` puts the :class:`ModelServer` in ``app.state``),
    drain them when it stops."""
    server: ModelServer = app.state.server
    recorder = getattr(app.state, "recorder", None)
    if recorder is not None:
        await run_in_threadpool(recorder.open)
    if server.settings.load_in_background:
        server.start_loading()
    else:
        await run_in_threadpool(server.load_all)
    yield
    log.info("shutting down: draining queues")
    if recorder is not None and recorder.tasks:  # shadow passes of answered requests: stored like the rest
        await asyncio.wait(set(recorder.tasks), timeout=server.settings.drain_timeout_s)
    await run_in_threadpool(server.close)
    if recorder is not None:  # after the queues are drained: their predictions are stored too
        await run_in_threadpool(recorder.close)
    log.info("shutdown complete")
