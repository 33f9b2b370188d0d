"""The server's routes, one ``APIRouter`` per concern, included by ``create_app`` in this order:
:mod:`.v2` (the Open Inference Protocol), :mod:`.images` (``/predict``, ``/explain``), :mod:`.page` (the web
page and ``/metrics``)."""

from .images import router as images_router
from .page import router as page_router
from .v2 import router as v2_router

__all__ = ["images_router", "page_router", "v2_router"]
