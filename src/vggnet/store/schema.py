"""The prediction store's tables: one row per served (or shadow) prediction, one per label a person gave.

Why SQLAlchemy Core tables rather than ORM classes: the writer inserts batches of plain dicts off the request
path and the reports run a few aggregate queries; neither needs identity maps or sessions, and the same
``Table`` objects drive Alembic's migrations, SQLite on one machine and PostgreSQL behind several replicas.
Times are UTC. Class names, not indices, are stored: a version with another class order still joins.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

__all__ = ["ROLES", "SOURCES", "labels", "metadata", "predictions", "server_settings"]

metadata = MetaData()

#: served: the answer the client got; shadow: a challenger version run on the same input, not answered
ROLES = ("served", "shadow")
#: review: a person working the review queue; user: the client's own report ("is this right?")
SOURCES = ("review", "user")

predictions = Table(
    "predictions", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),  # the V2 request id or /predict's id
    Column("item", Integer, nullable=False, default=0),  # the image's index within a batched request
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", String(32), nullable=False),
    Column("role", String(16), nullable=False, default="served"),
    Column("route", String(64), nullable=False),
    Column("predicted", String(128), nullable=False),  # the top-1 class name
    Column("confidence", Float, nullable=False),  # its probability (the max softmax)
    Column("topk", JSON, nullable=False),  # [[class name, probability], ...] best first
    Column("latency_ms", Float),
    Column("input_sha256", String(64)),  # of the request's image bytes (or the tensor's), not the pixels
    Column("input_bytes", Integer),
    Column("input_stats", JSON),  # {"width", "height", "mean", "std"} of the decoded image, 0-1 scale
    Column("ood_score", Float),  # out-of-domain score (serve.ood), null when the model has no reference
    Column("adv_score", Float),  # the adversarial detector's score, null when it is off
    Column("sampled", Boolean, nullable=False, default=False),  # in the uniform random review sample
    Column("input_path", String(512)),  # the kept input (--keep-inputs), relative to that folder
    Index("ix_predictions_request", "request_id", "item"),
    Index("ix_predictions_model_time", "model", "created_at"),
    Index("ix_predictions_time", "created_at"),  # purge (--store-keep-days) and reads across models by time
)

labels = Table(
    "labels", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("item", Integer, nullable=False, default=0),
    Column("model", String(128), nullable=False),
    Column("label", String(128)),  # the true class name; null: "none of these" (not one of the model's classes)
    Column("source", String(16), nullable=False),  # one of SOURCES
    Column("who", String(128), nullable=False),  # the reviewer's name or "anonymous" for a client report
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_labels_request", "request_id", "item"),
)

#: what a server says about itself that a later reader needs (key -> value, the last writer wins): so far
#: ``keep_inputs``, the absolute folder its --keep-inputs crops are in, which ``vggnet retrain`` reads the images from
server_settings = Table(
    "server_settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(1024), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
