"""The web page of ``vggnet serve`` (``GET /``): three package files, served as they are.

``static/index.html``, ``page.css`` and ``page.js`` are plain HTML, CSS and JavaScript: no build step, nothing
fetched from elsewhere (the Content-Security-Policy sent with them allows this origin only, so a stray external
reference would fail loudly in the browser rather than leak the visitor's address to a third party). The page
calls the same API as any client (``/v2/repository/index``, ``/predict``, ``/explain``) with relative URLs, so
it works behind a path prefix too.

The files are the same for every server and hold no model, configuration or data, so they are public even when
``--api-key-file`` is set (a browser cannot attach a bearer token to a page load); every call the page makes
carries the key the visitor enters, kept in the tab's ``sessionStorage``. See :mod:`vggnet.serve.auth`.
"""

from __future__ import annotations

import functools
from importlib import resources

from starlette.responses import Response

from .errors import not_found

__all__ = ["PAGE_FILES", "PAGE_PATHS", "page_response"]

#: file -> media type; nothing else under static/ is served
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "page.css": "text/css; charset=utf-8",
              "page.js": "text/javascript; charset=utf-8"}
#: URL paths of the page (public, see the module docstring)
PAGE_PATHS = ("/", *(f"/static/{name}" for name in PAGE_FILES if name != "index.html"))

HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("vggnet.serve").joinpath("static", name).read_bytes()


def page_response(name: str) -> Response:
    """One of the page's files, or 404 (an unknown name, or a package installed without its page files)."""
    media = PAGE_FILES.get(name)
    if media is None:
        raise not_found(f"no such file: {name!r}")
    try:
        body = _read(name)
    except (FileNotFoundError, OSError):
        raise not_found(f"the web page's file {name} is not installed with vggnet") from None
    return Response(body, media_type=media, headers=HEADERS)
