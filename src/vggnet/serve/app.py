"""The HTTP service: ``create_app`` wires a FastAPI app over a model repository, speaking the Open Inference
Protocol (V2); ``run_server`` runs it with uvicorn.

The parts live in their own modules: the settings (:mod:`.settings`), a model version's loading
(:mod:`.versions`), the models' lifecycle and request routing (:mod:`.lifecycle`), what stands before the routes
(:mod:`.middleware`, :mod:`.auth`), the dependencies routes reach the app's state through (:mod:`.deps`), and the
routes, one router per concern (:mod:`.routes`). The names below stay importable from here.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Sequence

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

import vggnet

from .auth import AuthMiddleware
from .hosts import ANY_HOST, allowed_hosts_for, app_default_hosts, is_wildcard
from .lifecycle import Background, ModelServer, lifespan
from .metrics import ServeMetrics
from .middleware import ObservabilityMiddleware, install_error_handlers
from .record import PredictionRecorder
from .repository import ModelRepository
from .routes import feedback_router, images_router, page_router, review_router, v2_router
from .settings import ServeSettings, with_overrides
from .versions import CODE_KINDS, ModelVersion, calibration_batch, check_exported, ensure_runtime, without_paths

__all__ = ["CODE_KINDS", "ModelServer", "ModelVersion", "ServeSettings", "calibration_batch", "check_exported",
           "create_app", "ensure_runtime", "run_server", "with_overrides", "without_paths"]

log = logging.getLogger(__name__)


def create_app(repo: ModelRepository, settings: ServeSettings | None = None,
               metrics: ServeMetrics | None = None, background: Sequence[Background] = ()) -> FastAPI:
    """The service for ``repo``. Models load in the lifespan (run it: uvicorn does; in tests use
    ``with TestClient(app)``); ``app.state.server`` is the :class:`ModelServer`. ``background``: work the lifespan
    starts beside it (e.g. a :class:`~vggnet.serve.follow.RegistryFollower`).

    What stands before the routes, outermost first: observability (request id, ``nosniff``, metrics, the access
    log: refusals are counted too), the Host check (see :mod:`.hosts`), then authentication, so a request for a
    wrong host is refused before its key is looked at and before a byte of its body is read."""
    settings = settings or ServeSettings()
    metrics = metrics or ServeMetrics()
    # /docs and /redoc load Swagger UI / ReDoc from a CDN: off unless asked for (ServeSettings.docs)
    app = FastAPI(title="vggnet", version=vggnet.__version__, lifespan=lifespan,
                  description="VGG classifiers over the Open Inference Protocol (V2)",
                  docs_url="/docs" if settings.docs else None, redoc_url="/redoc" if settings.docs else None)
    app.state.server = ModelServer(repo, settings, metrics, background)
    app.state.metrics = metrics
    app.state.recorder = PredictionRecorder(settings, metrics)
    if settings.api_keys:
        app.add_middleware(AuthMiddleware, keys=settings.api_keys, public=settings.public_endpoints)
    hosts = app_default_hosts() if settings.allowed_hosts is None else settings.allowed_hosts
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts), www_redirect=False)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, log_access=settings.access_log)
    install_error_handlers(app)
    for router in (v2_router, images_router, feedback_router, page_router, review_router):
        app.include_router(router)
    return app


def run_server(repo: ModelRepository, settings: ServeSettings | None = None, host: str = "127.0.0.1",
               port: int = 8000, log_level: str = "info", background: Sequence[Background] = ()) -> None:
    """Serve ``repo`` with uvicorn until SIGINT/SIGTERM; shutdown drains queues (``drain_timeout_s``).

    Without ``settings.allowed_hosts`` the Host allow-list comes from ``host`` (:func:`.hosts.allowed_hosts_for`):
    a wildcard bind then accepts any Host, which is logged as a warning."""
    import uvicorn

    settings = settings or ServeSettings()
    if settings.allowed_hosts is None:
        settings = dataclasses.replace(settings, allowed_hosts=allowed_hosts_for(host))
        if settings.allowed_hosts == (ANY_HOST,) and is_wildcard(host):
            log.warning("bound to %s with no --allowed-hosts: any Host header is accepted, so a DNS-rebinding "
                        "page can reach this server through a browser that can reach it; list the names clients "
                        "use with --allowed-hosts (or set --api-key-file)", host or "every interface")
    app = create_app(repo, settings, background=background)
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
