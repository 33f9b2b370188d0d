"""The web page of ``vggnet serve`` (``GET /``): three package files, served as they are.

``static/index.html``, ``page.css`` and ``page.js`` are plain HTML, CSS and JavaScript: no build step, nothing
fetched from elsewhere (the Content-Security-Policy sent with them allows this origin only, so a stray external
reference would fail loudly in the browser rather than leak the visitor's address to a third party). The page
calls the same API as any client (``/v2/repository/index``, ``/v2/models/...`` metadata, ``/predict?explain=1``,
``/explain``) with relative URLs, so it works behind a path prefix too; ``static/limits.json`` (built from the
settings, not a file) tells it the upload limits it checks before sending an image.

The files are the same for every server and hold no model, configuration or data, so they are public even when
``--api-key-file`` is set (a browser cannot attach a bearer token to a page load); every call the page makes
carries the key the visitor enters, kept in the tab's ``sessionStorage``. See :mod:`vggnet.serve.auth`.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from starlette.responses import Response

from .errors import not_found
from .limits import IMAGE_MEDIA_TYPES
from .settings import ServeSettings

__all__ = ["LIMITS_FILE", "PAGE_FILES", "PAGE_PATHS", "limits_response", "page_response"]

#: file -> media type; nothing else under static/ is served
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "page.css": "text/css; charset=utf-8",
              "page.js": "text/javascript; charset=utf-8",
              # the review page (GET /review, serve/routes/review.py): public like the page, its API key-only
              "review.html": "text/html; charset=utf-8", "review.css": "text/css; charset=utf-8",
              "review.js": "text/javascript; charset=utf-8"}
#: static/limits.json: the upload limits of this server, for the page's checks before an upload
LIMITS_FILE = "limits.json"
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


def limits_response(settings: ServeSettings) -> Response:
    """``static/limits.json``: the upload limits the page checks before sending a file (bytes, pixels, types)."""
    types = sorted(t for t in IMAGE_MEDIA_TYPES if t.startswith("image/"))
    body = {"max_upload_bytes": settings.max_body_bytes, "max_image_pixels": settings.max_image_pixels,
            "image_types": types}
    return Response(json.dumps(body), media_type="application/json", headers=HEADERS)
