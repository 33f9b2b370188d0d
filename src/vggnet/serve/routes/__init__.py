"""The server's routes, one ``APIRouter`` per concern, included by ``create_app`` in this order:
:mod:`.v2` (the Open Inference Protocol), :mod:`.images` (``/predict``, ``/explain``), :mod:`.feedback` (a
client's label for a stored prediction), :mod:`.page` (the web page and ``/metrics``), :mod:`.review` (the review
page and queue, key-only)."""

from .feedback import router as feedback_router
from .images import router as images_router
from .page import router as page_router
from .review import router as review_router
from .v2 import router as v2_router

__all__ = ["feedback_router", "images_router", "page_router", "review_router", "v2_router"]
