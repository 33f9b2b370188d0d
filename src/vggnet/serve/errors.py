"""The one error type of the service: a status, a message for the client, optional headers.

Every failure a client can cause is raised as :class:`ServeError` with a 4xx status and turned into
``{"error": message}`` by one handler — the body the Open Inference Protocol (V2) prescribes and that
``tritonclient`` reads — so no bad request reaches the inference worker or ends in a 500.
"""

from __future__ import annotations


class ServeError(Exception):
    """An HTTP error with a client-facing message (V2 error body: ``{"error": message}``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def __repr__(self) -> str:
        return f"ServeError({self.status}, {self.message!r})"


def bad_request(message: str) -> ServeError:
    return ServeError(400, message)


def not_found(message: str) -> ServeError:
    return ServeError(404, message)


def unavailable(message: str, retry_after_s: int = 1) -> ServeError:
    """503 with Retry-After: the server is loading, draining or its queue is full — retrying elsewhere helps."""
    return ServeError(503, message, {"Retry-After": str(retry_after_s)})
