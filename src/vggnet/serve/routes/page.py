"""The web page for people (public: static files only, see :mod:`vggnet.serve.web`) and Prometheus ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from .. import web
from ..deps import Metrics, Recorder, Settings

__all__ = ["router"]

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return web.page_response("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def page_file(name: str, settings: Settings) -> Response:
    """The page's files, and ``limits.json``: what the page checks before it uploads (a 36 MB file refused in
    the browser, not after the upload); public like the files: sizes and types only, nothing about the models."""
    if name == web.LIMITS_FILE:
        return web.limits_response(settings)
    return web.page_response(name)


@router.get("/metrics")
async def prometheus_metrics(metrics: Metrics, recorder: Recorder) -> Response:
    recorder.publish()  # the store writer's and the keeper's counts as they are now, not as of the last prediction
    body, content_type = metrics.render()
    return Response(body, headers={"content-type": content_type})
