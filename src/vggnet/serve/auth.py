"""Optional bearer-token authentication, checked before routing and before a request's body is read, so an
unauthenticated upload costs the server nothing but its headers (and FastAPI's ``/docs``, which takes no
dependencies, is covered too).

Keys come from a file, so they never appear on a command line or in ``ps``; each is compared in constant time.
Health probes and Prometheus scrapes usually come from inside the cluster without credentials, so they stay public
unless ``public`` says otherwise. The web page's files (the same bytes for every server) are always public: a
browser cannot attach a token to a page load, and every call the page makes carries the key its visitor enters.
A token travels in clear text: put TLS in front whenever the network is not trusted.

Requests that change the server's state (loading and unloading models) need the key whenever keys are set,
whatever ``public`` says; without keys they are refused when a browser says they come from another site
(:func:`cross_site`), so a web page cannot drive them through its visitor's browser.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from vggnet.errors import UsageError

__all__ = ["PUBLIC_GROUPS", "AuthMiddleware", "cross_site", "read_api_keys"]

#: endpoint groups that may be left public: health probes, Prometheus, model metadata (never inference)
PUBLIC_GROUPS = ("health", "metrics", "metadata")


def read_api_keys(path: str | os.PathLike) -> tuple[str, ...]:
    """The keys in ``path``: one per line, blank lines and ``#`` comments ignored; at least one, each of
    16 characters or more (a short key is guessable)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"API key file not found: {file}")
    try:
        text = file.read_text()
    except UnicodeDecodeError:
        raise UsageError(f"{file} is not a text file of API keys (one per line)") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise UsageError(f"{file} holds no API key (one per line)")
    short = [i + 1 for i, key in enumerate(keys) if len(key) < 16]
    if short:
        raise UsageError(f"{file}: key(s) {short} shorter than 16 characters; use e.g. `openssl rand -hex 32`")
    return keys


def _is_public(path: str, public: tuple[str, ...]) -> bool:
    metadata = path == "/v2" or (path.startswith("/v2/models/") and not path.endswith(("/infer", "/feedback")))
    # the web pages (/ and /review): static files, public (see the docstring); /v2/review/* never is
    if path in ("/", "/review") or path.startswith("/static/"):
        return True
    return (("health" in public and path.startswith("/v2/health/")) or ("metrics" in public and path == "/metrics")
            or ("metadata" in public and metadata))


def cross_site(headers: Mapping[str, str]) -> bool:
    """True when a browser sent the request from another origin: ``Sec-Fetch-Site`` says so, or ``Origin`` names
    another host than ``Host`` (``null`` included: a sandboxed or opaque origin). A cross-site ``POST`` without
    custom headers needs no CORS preflight, so the browser sends it even though the page cannot read the answer;
    clients other than browsers send neither header."""
    if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    origin = origin.strip().lower()
    return origin == "null" or urlsplit(origin).netloc != headers.get("host", "").lower()


class AuthMiddleware:
    """Refuse (401) HTTP requests without ``Authorization: Bearer <one of keys>`` to non-public paths."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], public: tuple[str, ...] = ("health", "metrics")) -> None:
        unknown = sorted(set(public) - set(PUBLIC_GROUPS))
        if unknown:
            raise UsageError(f"unknown public endpoint group(s) {unknown}; choose from {', '.join(PUBLIC_GROUPS)}")
        self.app, self.keys, self.public = app, tuple(k.encode() for k in keys), tuple(public)

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        token = token.strip()
        return any(hmac.compare_digest(token, key) for key in self.keys)  # every key compared: no early exit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or _is_public(scope.get("path", ""), self.public) \
                or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "missing or invalid API key: send Authorization: Bearer <key>"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="vggnet"')]})
        await send({"type": "http.response.body", "body": body})
