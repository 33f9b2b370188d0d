"""The prediction store: ``vggnet serve`` writes one row per prediction into a database, the monitor reads them.

    engine = connect("sqlite:///runs/serve.db")         # or postgresql+psycopg://user:password@host/db
    writer = PredictionWriter(engine)                   # put() from the request path: never blocks, never raises
    writer.put({"request_id": ..., "model": ..., ...})  # the columns of schema.predictions
    writer.close()                                      # flushes what is queued
    add_label(engine, request_id=..., model=..., label="cat", source="review", who="ana")
    review_queue(engine, model="m")                     # what needs a person next, the random sample first
    record_setting(engine, KEEP_INPUTS, "/srv/kept")     # what a server says about itself (read_setting reads it)

A leaf package: SQLAlchemy, Alembic (imported when connecting), the standard library and vggnet.errors only; no
torch. Needs the ``store`` extra (``pip install 'vggnet[store]'``).
"""

from __future__ import annotations

from . import schema
from .engine import connect, head_revision, safe_url
from .errors import StoreError, UnknownPrediction
from .queries import (
    REVIEW_REASONS,
    add_label,
    purge,
    read_labels,
    read_predictions,
    review_queue,
    review_queue_size,
    reviewed_counts,
)
from .settings import KEEP_INPUTS, read_setting, record_setting
from .writer import PredictionWriter

__all__ = [
    "KEEP_INPUTS",
    "REVIEW_REASONS",
    "PredictionWriter",
    "StoreError",
    "UnknownPrediction",
    "add_label",
    "connect",
    "head_revision",
    "purge",
    "read_labels",
    "read_predictions",
    "read_setting",
    "record_setting",
    "review_queue",
    "review_queue_size",
    "reviewed_counts",
    "safe_url",
    "schema",
]
