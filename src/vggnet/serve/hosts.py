"""Which ``Host`` headers the server answers: the defence against DNS rebinding.

A page on ``evil.example`` whose DNS record is switched to ``127.0.0.1`` after it loads can make a browser call a
server on the visitor's own machine as if it were the page's own origin; the only trace is the ``Host`` header,
which still says ``evil.example``. So the server answers only the names it is known by: the address it is bound to,
plus ``localhost``, ``127.0.0.1`` and ``[::1]`` when that address is a loopback one, plus ``--allowed-hosts``.
The check is Starlette's :class:`~starlette.middleware.trustedhost.TrustedHostMiddleware` (400 ``Invalid host
header``), placed before authentication and before any body is read.

Bound to every interface (``0.0.0.0``, ``::``) with no list, the server cannot know the names clients use (a
container's Service name, an ingress host, the pod IP a kubelet probe sends), so it accepts any ``Host`` and
says so in its log; ``--allowed-hosts`` closes that. ``*`` accepts any host, but only when given explicitly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from vggnet.errors import UsageError

__all__ = ["ANY_HOST", "LOOPBACK_NAMES", "TESTCLIENT_HOST", "WILDCARD_BINDS", "allowed_hosts_for", "app_default_hosts",
           "bind_hosts", "is_wildcard", "normalise_host", "parse_allowed_hosts"]

ANY_HOST = "*"
#: the names of this machine's loopback interface (IPv6 literals are bracketed in a Host header)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
#: the Host Starlette's TestClient sends: accepted by an app built without a list (``create_app`` in tests); a
#: single-label name that no public DNS serves, so a rebinding page cannot stand behind it. ``vggnet serve`` and
#: ``run_server`` never accept it unless it is listed.
TESTCLIENT_HOST = "testserver"
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def is_wildcard(bind: str) -> bool:
    """True for an address that binds every interface."""
    return bind.strip() in WILDCARD_BINDS


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def normalise_host(name: str) -> str:
    """``name`` as it is compared with a ``Host`` header: lower case, an IPv6 literal in brackets; a port, a
    scheme or a misplaced ``*`` is a :class:`UsageError` (Starlette would only assert)."""
    host = name.strip().lower()
    if not host:
        raise UsageError("an empty host name in --allowed-hosts")
    if host == ANY_HOST:
        return host
    if "*" in host and not (host.startswith("*.") and "*" not in host[1:]):
        raise UsageError(f"host pattern {name!r}: a wildcard must be the whole name (*) or lead it (*.example.com)")
    ip = _ip(host)
    if ip is not None:
        return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    if "/" in host or ":" in host or host.startswith("["):
        raise UsageError(f"host {name!r}: give a host name or address without a scheme or port, e.g. "
                         "models.example.com, 10.0.0.5 or ::1")
    return host


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """The comma-separated list of ``--allowed-hosts``, normalised."""
    return tuple(normalise_host(part) for part in text.split(",") if part.strip())


def bind_hosts(bind: str) -> tuple[str, ...]:
    """The Host names that reach a server bound to ``bind`` on this machine: the address itself, and the
    loopback names when it is a loopback address (or ``localhost``); only the loopback names for a wildcard
    bind (the health check of ``deploy/Dockerfile`` calls ``127.0.0.1``)."""
    if is_wildcard(bind):
        return LOOPBACK_NAMES
    host = normalise_host(bind)
    ip = _ip(host)
    if host == "localhost" or (ip is not None and ip.is_loopback):
        return tuple(dict.fromkeys((host, *LOOPBACK_NAMES)))
    return (host,)


def allowed_hosts_for(bind: str, listed: Iterable[str] | None = None) -> tuple[str, ...]:
    """The Host allow-list of a server bound to ``bind``: its own names plus ``listed`` (``--allowed-hosts``);
    ``("*",)`` when ``listed`` holds ``*``, or when the bind is a wildcard and nothing is listed."""
    listed = None if listed is None else tuple(normalise_host(h) for h in listed)
    if listed is not None and ANY_HOST in listed:
        return (ANY_HOST,)
    if not listed and is_wildcard(bind):
        return (ANY_HOST,)
    return tuple(dict.fromkeys((*bind_hosts(bind), *(listed or ()))))


def app_default_hosts() -> tuple[str, ...]:
    """The list of an app built without one (``ServeSettings.allowed_hosts`` None, as in tests): the loopback
    names and Starlette's TestClient."""
    return (*LOOPBACK_NAMES, TESTCLIENT_HOST)
