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

__all__ = ["REVIEW_REASONS", "add_label", "purge", "read_labels", "read_predictions", "review_queue",
           "review_queue_size", "reviewed_counts"]


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


#: why an image is in the review queue, in the queue's order of priority
REVIEW_REASONS = ("random", "low_confidence", "user_report", "disagreement")


def review_queue(engine: Engine, model: str | None = None, limit: int = 20,
                 low_confidence: float = 0.5) -> list[dict[str, Any]]:
    """The images that need a person and have no ``review`` label yet, one entry per model, request and item.

    In the queue (``reasons``, any of :data:`REVIEW_REASONS`): ``random``, the uniform random sample (any of its
    rows ``sampled``), the only unbiased basis of accuracy, so always first; ``low_confidence``, any version's top
    probability below ``low_confidence`` (that maximum softmax is also what :mod:`vggnet.serve.ood` thresholds to
    call an input out of domain, and no row keeps that per-model threshold, so the confidence stands for both);
    ``user_report``, a client's label (not shown: it would anchor the reviewer); ``disagreement``, two versions
    (served and shadow, or A/B) predicted different classes. Ordered by the first reason in that order, then
    oldest first, then by model, request and item, so one store state gives one queue. Each entry holds every
    version's prediction (``predictions``: served first, then by version).
    """
    _check_queue_args(limit, low_confidence)
    query = _queue_query(model, low_confidence).limit(limit)
    with engine.connect() as connection:
        groups = list(connection.execute(query))
        ids = sorted({g.request_id for g in groups})
        rows = [dict(r._mapping) for r in connection.execute(
            sa.select(predictions).where(predictions.c.request_id.in_(ids)))] if ids else []
    versions: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (r["role"] != "served", r["version"], r["pk"])):
        row["created_at"] = utc(row["created_at"])
        versions.setdefault((row["model"], row["request_id"], row["item"]), []).append(row)
    queue = []
    for g in groups:
        flags = (g.random, g.low, g.user, g.disagree)
        queue.append({"model": g.model, "request_id": g.request_id, "item": g.item, "created_at": utc(g.first_at),
                      "reasons": [reason for reason, flag in zip(REVIEW_REASONS, flags, strict=True) if flag],
                      "predictions": versions.get((g.model, g.request_id, g.item), [])})
    return queue


def review_queue_size(engine: Engine, model: str | None = None, low_confidence: float = 0.5) -> int:
    """How many images :func:`review_queue` would list without a limit."""
    _check_queue_args(1, low_confidence)
    with engine.connect() as connection:
        return int(connection.execute(
            sa.select(sa.func.count()).select_from(_queue_query(model, low_confidence).subquery())).scalar_one())


def _check_queue_args(limit: int, low_confidence: float) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"the review queue's limit must be a whole number >= 1, not {limit!r}")
    if isinstance(low_confidence, bool) or not isinstance(low_confidence, int | float) \
            or not 0 <= low_confidence <= 1:
        raise UsageError(f"the low-confidence threshold must be a probability in [0, 1], not {low_confidence!r}")


def _queue_query(model: str | None, low_confidence: float) -> Any:
    """One row per (model, request, item) that needs a review, with a 0/1 column per reason, in queue order.

    Plain aggregates and ``CASE`` / ``EXISTS`` only: the same SQL on SQLite and PostgreSQL (which has no
    ``max`` of a boolean, hence the 0/1 cases)."""
    p, lab = predictions.c, labels.c

    def any_row(condition: Any) -> Any:
        return sa.func.max(sa.case((condition, 1), else_=0))

    grouped = sa.select(p.model, p.request_id, p.item, sa.func.min(p.created_at).label("first_at"),
                        any_row(p.sampled.is_(True)).label("random"),
                        any_row(p.confidence < float(low_confidence)).label("low"),
                        sa.func.count(sa.distinct(p.predicted)).label("classes"))
    if model is not None:
        grouped = grouped.where(p.model == model)
    g = grouped.group_by(p.model, p.request_id, p.item).subquery()

    def labelled(source: str) -> Any:
        return sa.exists().where((lab.model == g.c.model) & (lab.request_id == g.c.request_id)
                                 & (lab.item == g.c.item) & (lab.source == source))

    user, disagree = labelled("user"), g.c.classes > 1
    rank = sa.case((g.c.random == 1, 0), (g.c.low == 1, 1), (user, 2), else_=3)
    return (sa.select(g.c.model, g.c.request_id, g.c.item, g.c.first_at, g.c.random, g.c.low,
                      sa.case((user, 1), else_=0).label("user"), sa.case((disagree, 1), else_=0).label("disagree"))
            .where(((g.c.random == 1) | (g.c.low == 1) | user | disagree) & ~labelled("review"))
            .order_by(rank, g.c.first_at, g.c.model, g.c.request_id, g.c.item))


def reviewed_counts(engine: Engine, model: str | None = None) -> list[dict[str, Any]]:
    """Per (model, version): the predictions in the uniform random review sample that a person has labelled from
    the review queue (``reviewed``) and how many of them were right (``correct``), for the live accuracy gauges.

    The same counting as ``vggnet monitor report``: an image (model, request, item) is in the sample when any of
    its rows is ``sampled``; its label is the latest ``review`` label (by time, then insertion); a null label
    ("none of these") is wrong for every version; user reports and reviews outside the sample never count; each
    version counts an image once (its latest row). Driven from the labels (few) through the request index, so a
    refresh every few seconds stays cheap on a large store. Versions with no such review are absent.
    """
    p, lab = predictions.c, labels.c
    ordered = sa.func.row_number().over(partition_by=(lab.model, lab.request_id, lab.item),
                                        order_by=(lab.created_at.desc(), lab.pk.desc()))
    ranked = sa.select(lab.model, lab.request_id, lab.item, lab.label, ordered.label("rank")) \
        .where(lab.source == "review")
    if model is not None:
        ranked = ranked.where(lab.model == model)
    ranked = ranked.subquery()
    latest = sa.select(ranked.c.model, ranked.c.request_id, ranked.c.item, ranked.c.label) \
        .where(ranked.c.rank == 1).subquery()
    other = predictions.alias("other")
    in_sample = sa.exists().where((other.c.model == latest.c.model) & (other.c.request_id == latest.c.request_id)
                                  & (other.c.item == latest.c.item) & other.c.sampled.is_(True))
    same_image = (p.model == latest.c.model) & (p.request_id == latest.c.request_id) & (p.item == latest.c.item)
    rows = (sa.select(sa.func.max(p.pk).label("pk")).join(latest, same_image).where(in_sample)
            .group_by(p.model, p.version, p.request_id, p.item).subquery())
    right = sa.case((latest.c.label.is_not(None) & (latest.c.label == p.predicted), 1), else_=0)
    query = (sa.select(p.model, p.version, sa.func.count().label("reviewed"), sa.func.sum(right).label("correct"))
             .join(rows, rows.c.pk == p.pk).join(latest, same_image)
             .group_by(p.model, p.version).order_by(p.model, p.version))
    with engine.connect() as connection:
        return [{"model": m, "version": v, "reviewed": int(n), "correct": int(k)}
                for m, v, n, k in connection.execute(query)]
