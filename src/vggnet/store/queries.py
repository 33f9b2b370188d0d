"""The store's small reads and writes off the hot path: labels, the purge, and plain reads for reports and tests.

Why plain lists of dicts: the reports aggregate a few thousand rows and the tests compare values; times come back
as aware UTC datetimes on every backend (SQLite keeps them naive, PostgreSQL as timestamptz).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..errors import UsageError
from .errors import UnknownPrediction
from .schema import SOURCES, labels, predictions
from .writer import utc

__all__ = ["add_label", "purge", "read_labels", "read_predictions"]


def add_label(engine: Engine, *, request_id: str, item: int = 0, model: str, label: str | None, source: str,
              who: str) -> None:
    """Record the true class (None: "none of these") of one stored prediction, as a reviewer or the client said."""
    if source not in SOURCES:
        raise UsageError(f"label source {source!r} is not one of {', '.join(SOURCES)}")
    values = {"request_id": request_id, "item": item, "model": model, "label": label, "source": source, "who": who}
    _check_lengths(values)
    same = (predictions.c.request_id == request_id) & (predictions.c.item == item) & (predictions.c.model == model)
    with engine.begin() as connection:
        if connection.execute(sa.select(predictions.c.pk).where(same).limit(1)).first() is None:
            raise UnknownPrediction(f"no stored prediction of model {model!r} for request {request_id!r} item {item}")
        connection.execute(labels.insert().values(**values, created_at=utc()))


def purge(engine: Engine, older_than_days: float) -> int:
    """Delete predictions older than ``older_than_days`` and the labels of those; returns the predictions deleted.

    A label goes with its prediction only when no newer prediction of the same request, item and model stays.
    """
    if not isinstance(older_than_days, int | float) or math.isnan(older_than_days) or older_than_days < 0:
        raise UsageError(f"keep days must be a number >= 0, not {older_than_days!r}")
    cutoff = utc() - timedelta(days=older_than_days)
    old, kept = predictions.alias("old"), predictions.alias("kept")

    def same(p: Any) -> Any:
        return (p.c.request_id == labels.c.request_id) & (p.c.item == labels.c.item) & (p.c.model == labels.c.model)

    orphaned = (sa.exists().where(same(old) & (old.c.created_at < cutoff))
                & ~sa.exists().where(same(kept) & (kept.c.created_at >= cutoff)))
    with engine.begin() as connection:
        connection.execute(labels.delete().where(orphaned))
        return connection.execute(predictions.delete().where(predictions.c.created_at < cutoff)).rowcount


def read_predictions(engine: Engine, model: str | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
    """Every stored prediction (of ``model``, at or after ``since``), oldest first."""
    query = sa.select(predictions).order_by(predictions.c.created_at, predictions.c.pk)
    if model is not None:
        query = query.where(predictions.c.model == model)
    if since is not None:
        query = query.where(predictions.c.created_at >= utc(since))
    return _rows(engine, query)


def read_labels(engine: Engine, model: str | None = None) -> list[dict[str, Any]]:
    """Every stored label (of ``model``), oldest first."""
    query = sa.select(labels).order_by(labels.c.created_at, labels.c.pk)
    if model is not None:
        query = query.where(labels.c.model == model)
    return _rows(engine, query)


def _rows(engine: Engine, query: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = [dict(row._mapping) for row in connection.execute(query)]
    for row in rows:
        row["created_at"] = utc(row["created_at"])
    return rows


def _check_lengths(values: dict[str, Any]) -> None:
    # PostgreSQL refuses a too-long string with a DataError (SQLite keeps it): one clear line on both instead
    for name, value in values.items():
        limit = getattr(labels.c[name].type, "length", None)
        if isinstance(value, str) and limit is not None and len(value) > limit:
            raise UsageError(f"label {name} is {len(value)} characters long, more than the {limit} the store keeps")
