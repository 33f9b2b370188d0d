"""The web page for people (public: static files only, see :mod:`vggnet.serve.web`) and Prometheus ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from .. import web
from ..deps import Metrics

__all__ = ["router"]

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return web.page_response("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def page_file(name: str) -> Response:
    return web.page_response(name)


@router.get("/metrics")
async def prometheus_metrics(metrics: Metrics) -> Response:
    body, content_type = metrics.render()
    return Response(body, headers={"content-type": content_type})
