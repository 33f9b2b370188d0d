"""The models of one server process over their life: loaded in the app's lifespan (in a background thread by
default, so liveness probes are answered while a big model loads), routed to while they serve, unloaded and
loaded again on request (Triton's model repository extension: :meth:`ModelServer.unload_model`,
:meth:`ModelServer.load_model`) or when a source they follow changes (:meth:`ModelServer.replace_model`, the one
routine of every swap: load beside, warm, take traffic, then drain and close the old), drained at shutdown
(SIGTERM under uvicorn: it stops accepting connections and waits for in-flight requests, then each model's queue
is finished before its worker stops).

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
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

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

__all__ = ["Background", "ModelServer", "Replaced", "ServedModel", "lifespan"]

log = logging.getLogger(__name__)

#: how long a replaced version must stay idle (nothing announced, queued or computing) before it is closed: a
#: request that picked it just before the swap may still submit follow-up work on it (the adversarial guard's
#: squeezed copies right after its answer), and that must not meet a closed queue
RETIRE_QUIET_S = 0.25


def _lower_priority() -> None:
    """Lower this worker thread's scheduling priority (nice +5; Linux, where the nice value is per thread):
    on two cores a storm of decodes would otherwise share the CPU evenly with the event loop, and a liveness
    probe would wait behind them; the decoders still get every cycle the loop leaves idle."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5))


class ServedModel:
    """A model name: its versions and the router for requests that name no version."""

    def __init__(self, config: ModelConfig, settings: ServeSettings,
                 kept: Mapping[str, ModelVersion] | None = None) -> None:
        self.config = config
        kept = kept or {}  # versions already loaded and serving, carried over from the model this one replaces
        self.versions = {v: kept.get(v) or ModelVersion(config, v, settings) for v in config.ordered_versions}
        self.router = VersionRouter(config.default_version, config.ab)
        #: unloaded on request: it no longer counts towards the server's readiness
        self.unloaded = False
        #: versions the last change tried and could not load (kept for the index's reason only, never routed to)
        self.failed: dict[str, ModelVersion] = {}

    @property
    def routed_versions(self) -> list[str]:
        """The versions unversioned requests go to: the A/B set, else the default."""
        return [v for v, w in self.config.ab.items() if w > 0] or [self.config.default_version]

    @property
    def ready(self) -> bool:
        return all(self.versions[v].ready for v in self.routed_versions)


class Background(Protocol):
    """Work the lifespan runs beside the server (e.g. :class:`vggnet.serve.follow.RegistryFollower`): started once
    the startup loading has begun, stopped before the queues are drained."""

    def start(self, server: ModelServer) -> None: ...

    def stop(self, timeout: float) -> None: ...


@dataclass(frozen=True)
class Replaced:
    """What :meth:`ModelServer.replace_model` did: whether the new configuration (or, leaving out failed optional
    versions, part of it) now serves, and the versions that failed to load (state UNAVAILABLE, with the reason)."""

    served: bool
    failed: tuple[ModelVersion, ...] = ()


def without_versions(config: ModelConfig, left_out: Collection[str]) -> ModelConfig:
    """``config`` without ``left_out`` (never its default version): gone from the versions, the shadows and the
    A/B split (a split left with one version is no split)."""
    ab = {v: w for v, w in config.ab.items() if v not in left_out}
    return replace(config, versions={v: f for v, f in config.versions.items() if v not in left_out},
                   shadow=tuple(v for v in config.shadow if v not in left_out),
                   ab=ab if sum(1 for w in ab.values() if w > 0) > 1 else {})


class ModelServer:
    """Everything behind the routes: the models, their loading and shutdown, and request routing."""

    def __init__(self, repo: ModelRepository, settings: ServeSettings, metrics: ServeMetrics,
                 background: Sequence[Background] = ()) -> None:
        self.repo, self.settings, self.metrics = repo, settings, metrics
        self.background = tuple(background)
        #: the event loop serving requests (set by the lifespan): a swap waits for it to turn (see _retire)
        self.loop: asyncio.AbstractEventLoop | None = None
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

    def index_versions(self) -> list[ModelVersion]:
        """What ``/v2/repository/index`` lists: the served versions, then those the last change of each model
        could not load (UNAVAILABLE, with the reason), which serve nothing."""
        return [mv for model in self.models.values() for mv in (*model.versions.values(), *model.failed.values())]

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
        self._controlled()  # 503 while starting up or shutting down, before the folder is read
        existed = name in self.models
        result = self.replace_model(self._read_config(name, self.models.get(name)))
        if result.failed:
            reasons = "; ".join(f"version {mv.version}: {mv.reason}" for mv in result.failed)
            kept = "the model stays as it was" if existed else "nothing is served under that name"
            raise bad_request(f"model {name!r} not loaded ({kept}): {reasons}")
        log.info("model %s loaded (versions %s)", name, ", ".join(self.models[name].versions))

    def replace_model(self, config: ModelConfig, *, keep: Collection[str] = (), optional: Collection[str] = (),
                      verify: Callable[[ModelVersion], None] | None = None, remember_failed: bool = False,
                      reason: str = "replaced by a new load") -> Replaced:
        """Serve ``config`` in place of the model of its name (or as a new one), without failing a request.

        Every version is loaded and warmed beside the running ones (``verify`` first, if given: an exception it
        raises is the version's failure), except those named in ``keep`` that already serve the same file, which
        carry over as they are (no reload, no second copy in memory). Then, in one assignment, new requests go
        to the new model; the versions it no longer has are drained (:meth:`_retire`) and closed with ``reason``.

        A version that fails to load leaves everything as it was, unless it is in ``optional`` (and is not the
        default version): then it is left out and the rest is served. ``remember_failed`` shows the failures in
        the index (:meth:`index_versions`) until the next change. Blocking: call it from a worker thread."""
        with self._controlled():
            old = self.models.get(config.name)
            kept = self._keepable(old, config, keep)
            new = ServedModel(config, self.settings, kept)
            fresh = [mv for v, mv in new.versions.items() if v not in kept]
            for mv in fresh:
                self._load_version(mv, verify)
            failed = tuple(mv for mv in fresh if not mv.ready)
            left_out = {mv.version for mv in failed}
            if failed and not left_out <= set(optional) - {config.default_version}:
                for mv in fresh:  # the ones that did load: abandoned with the change
                    if mv.ready:
                        mv.close(self.metrics, self.settings.drain_timeout_s, reason="load abandoned", release=True)
                if old is not None and remember_failed:
                    old.failed = {mv.version: mv for mv in failed}
                self._publish_states(old)
                return Replaced(False, failed)
            if failed:
                new = ServedModel(without_versions(config, left_out), self.settings,
                                  {v: mv for v, mv in new.versions.items() if v not in left_out})
            if remember_failed:
                new.failed = {mv.version: mv for mv in failed}
            # a new dict rather than an item assignment: the event loop may be iterating the old one
            self.models = {**self.models, config.name: new}
            serving = set(map(id, new.versions.values()))
            self._retire([mv for mv in (old.versions.values() if old else ()) if id(mv) not in serving], reason)
            self._publish_states(new)
            return Replaced(True, failed)

    def _keepable(self, old: ServedModel | None, config: ModelConfig, keep: Collection[str]) -> dict[str, ModelVersion]:
        """The running versions of ``old`` that ``config`` may keep as they are: named in ``keep``, READY and
        serving the file ``config`` names for them."""
        if old is None or old.unloaded:
            return {}
        return {v: mv for v, mv in old.versions.items()
                if v in keep and mv.ready and config.versions.get(v) == mv.file}

    def _load_version(self, mv: ModelVersion, verify: Callable[[ModelVersion], None] | None) -> None:
        """Load and warm ``mv`` (after ``verify``); a failure leaves it UNAVAILABLE with the reason, and logged."""
        if verify is not None:
            try:
                verify(mv)
            except (VggnetError, OSError) as exc:
                log.error("model %s version %s not loaded: %s", mv.name, mv.version, exc)
                mv.state, mv.reason = "UNAVAILABLE", without_paths(str(exc))
                self.metrics.set_state(mv.name, mv.version, mv.state)
                return
        mv.load(self.metrics, self.compute_lock, self.settings.warmup)

    def _retire(self, versions: list[ModelVersion], reason: str) -> None:
        """Close versions no request is routed to any more, without refusing one that was routed there before.

        The new model is already published; a request on the event loop may have picked an old version just
        before, and it announces itself (``Batcher.arriving``) before its first ``await``. So: wait for the loop
        to turn once (every such request is then announced or queued), then until the old versions are idle
        (nothing announced, queued or computing) for ``RETIRE_QUIET_S``, all within ``drain_timeout_s``, and
        close them (their queues are finished first)."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        batchers = [mv.batcher for mv in versions if mv.batcher is not None]  # none: nothing was serving
        if batchers:
            self._loop_turn(self.settings.drain_timeout_s)
            quiet_since: float | None = None
            while (now := time.monotonic()) < deadline:
                if not all(b.idle for b in batchers):
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= RETIRE_QUIET_S:
                    break
                time.sleep(0.01)
        for mv in versions:
            mv.close(self.metrics, max(1.0, deadline - time.monotonic()), reason=reason, release=True)

    def _loop_turn(self, timeout: float) -> None:
        """Return once the event loop has run a callback scheduled now (at most ``timeout``)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:  # called on the loop itself: nothing else runs meanwhile
                return
        turned = threading.Event()
        try:
            loop.call_soon_threadsafe(turned.set)
        except RuntimeError:  # closed meanwhile
            return
        turned.wait(timeout)

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
    server.loop = asyncio.get_running_loop()
    recorder = getattr(app.state, "recorder", None)
    if recorder is not None:
        await run_in_threadpool(recorder.open)
    if server.settings.load_in_background:
        server.start_loading()
    else:
        await run_in_threadpool(server.load_all)
    for task in server.background:
        task.start(server)
    yield
    for task in server.background:  # no swap may start while the queues drain
        await run_in_threadpool(task.stop, server.settings.drain_timeout_s)
    log.info("shutting down: draining queues")
    if recorder is not None and recorder.tasks:  # shadow passes of answered requests: stored like the rest
        await asyncio.wait(set(recorder.tasks), timeout=server.settings.drain_timeout_s)
    await run_in_threadpool(server.close)
    if recorder is not None:  # after the queues are drained: their predictions are stored too
        await run_in_threadpool(recorder.close)
    log.info("shutdown complete")
