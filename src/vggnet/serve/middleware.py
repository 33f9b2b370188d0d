"""What stands between a connection and the routes: request ids, metrics and the access log
(:class:`ObservabilityMiddleware`), the admission gate for request bodies (:class:`Admission`), and the error
handlers that turn every failure into the V2 body ``{"error": ...}``.

Authentication is :class:`vggnet.serve.auth.AuthMiddleware` (ASGI, before routing: FastAPI's own ``/docs`` and
``/openapi.json`` take no dependencies, and an unknown path must not tell a stranger it is unknown). A body's
size and receive timeout are enforced while it is read (:func:`vggnet.serve.limits.read_body`); the web page's
security headers travel with its files (:mod:`vggnet.serve.web`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ServeError, unavailable
from .metrics import ServeMetrics

__all__ = ["NOSNIFF", "Admission", "ObservabilityMiddleware", "error_response", "install_error_handlers", "note"]

log = logging.getLogger(__name__)
#: one JSON line per request; the CLI sends it to stdout, apart from the service's log
access_log = logging.getLogger("vggnet.serve.access")


#: sent with every response: a browser must not guess a type (an error body read as HTML, a tensor as script)
NOSNIFF = (b"x-content-type-options", b"nosniff")


class ObservabilityMiddleware:
    """Request id, ``X-Content-Type-Options: nosniff``, in-flight gauge, per-route counters and latency, and one
    JSON access-log line per request.

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
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
                if not any(name.lower() == NOSNIFF[0] for name, _ in headers):  # the web page's files carry it
                    headers.append(NOSNIFF)
                message["headers"] = headers
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, request_id, status, time.perf_counter() - start, info)

    def _record(self, scope: Scope, request_id: str, status: int, seconds: float, info: dict[str, Any]) -> None:
        template = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.observe_request(template, scope.get("method", ""), status, seconds)
        if self.log_access:
            client = scope.get("client")
            record = {"ts": round(time.time(), 3), "request_id": request_id, "method": scope.get("method"),
                      "path": scope.get("path"), "route": template, "status": status,
                      "ms": round(seconds * 1000, 2), "client": f"{client[0]}:{client[1]}" if client else None,
                      **info}
            access_log.info(json.dumps(record, separators=(",", ":")))


def note(request: Request, **fields: Any) -> None:
    """Add fields (model, version, batch...) to this request's access-log line."""
    info = request.scope.get("vggnet.log")
    if info is not None:
        info.update(fields)


class Admission:
    """At most ``limit`` request bodies received or decoded at once (0: no bound): bounds the memory a storm
    of large uploads can take. Used on the event loop only, so the count needs no lock."""

    def __init__(self, limit: int, metrics: ServeMetrics) -> None:
        self.limit, self.metrics = limit, metrics
        self.receiving = 0

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """A slot for one body; 503 at once, before any byte of it is read, when every slot is taken."""
        if self.limit and self.receiving >= self.limit:
            self.metrics.admission_refused.inc()
            raise unavailable(f"{self.limit} requests are being received already; retry shortly", retry_after_s=1)
        self.receiving += 1
        try:
            yield
        finally:
            self.receiving -= 1


# --- error handlers ---------------------------------------------------------------------------------------


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _internal(request: Request) -> JSONResponse:
    """A 500 says nothing of what failed (exception text can hold paths, code or data): only a request id
    that finds the logged details. Sent by Starlette's outermost middleware, around the observability one, so
    it carries its own ``nosniff``."""
    request_id = request.scope.get("vggnet.request_id", "")
    return JSONResponse({"error": "internal error", "request_id": request_id}, status_code=500,
                        headers={NOSNIFF[0].decode(): NOSNIFF[1].decode()})


async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
    return _internal(request) if exc.status == 500 else error_response(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, f"invalid request: {exc.errors()}")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s (request id %s)", request.url.path, request.scope.get("vggnet.request_id", ""))
    return _internal(request)


def install_error_handlers(app: FastAPI) -> None:
    """Client mistakes as 4xx ``{"error": message}`` (the V2 error body); anything else a logged 500."""
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
