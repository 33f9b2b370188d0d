"""Dependencies through which routes reach the app's state, instead of closures over ``create_app``'s locals:
a route module holds no server of its own, so one process can run several apps (tests, A/B servers side by side).

``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .lifecycle import ModelServer
from .metrics import ServeMetrics
from .record import PredictionRecorder
from .settings import ServeSettings

__all__ = ["Metrics", "Recorder", "Server", "Settings", "get_metrics", "get_recorder", "get_server", "get_settings"]


async def get_server(request: Request) -> ModelServer:
    return request.app.state.server


async def get_settings(request: Request) -> ServeSettings:
    return request.app.state.server.settings


async def get_metrics(request: Request) -> ServeMetrics:
    return request.app.state.metrics


async def get_recorder(request: Request) -> PredictionRecorder:
    return request.app.state.recorder


Server = Annotated[ModelServer, Depends(get_server)]
Settings = Annotated[ServeSettings, Depends(get_settings)]
Metrics = Annotated[ServeMetrics, Depends(get_metrics)]
Recorder = Annotated[PredictionRecorder, Depends(get_recorder)]
