"""HTTP serving: the Open Inference Protocol (V2) over a model repository, with dynamic batching,
A/B routing between versions, Prometheus metrics and input limits. Needs the ``serve`` extra
(FastAPI, uvicorn, prometheus-client, python-multipart); never imports the training engine."""

from .app import create_app, run_server
from .batcher import Batcher, BatcherClosed, BatchInfo, QueueFull
from .errors import ServeError
from .lifecycle import ModelServer
from .metrics import ServeMetrics
from .repository import ModelConfig, ModelRepository, VersionRouter
from .settings import ServeSettings

__all__ = [
    "BatchInfo", "Batcher", "BatcherClosed", "ModelConfig", "ModelRepository", "ModelServer", "QueueFull",
    "ServeError", "ServeMetrics", "ServeSettings", "VersionRouter", "create_app", "run_server",
]
