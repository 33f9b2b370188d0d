"""PredictionWriter: rows from the request path into the database in batches, on a thread of its own.

Why a bounded queue and a daemon thread: a prediction must never wait for, or fail because of, the database. put()
only appends to the queue (or drops the row when it is full); the thread inserts batches with one executemany.
Nothing is lost silently: every row dropped (queue full, database error, bad row, after close) is counted in
stats() and said in a warning, at most one a minute per cause, so a database that is down is no log storm.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Engine

from .engine import first_line, safe_url
from .schema import predictions

__all__ = ["PredictionWriter", "utc"]

log = logging.getLogger(__name__)

WARN_EVERY_S = 60.0
_COLUMNS = [c for c in predictions.columns if c.name != "pk"]
_DEFAULTS = {c.name: (c.default.arg if c.default is not None and c.default.is_scalar else None) for c in _COLUMNS}


def utc(value: datetime | None = None) -> datetime:
    """An aware UTC datetime (now when None): naive values are taken as UTC already, as the store keeps them."""
    if value is None:
        return datetime.now(UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class _Warner:
    """One warning per cause at most every WARN_EVERY_S, saying how many rows were dropped since the last one."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def __call__(self, cause: str, rows: int, message: str) -> str | None:
        """The line to log now, or None (said less than a minute ago); the caller logs it outside its lock."""
        self._pending[cause] = self._pending.get(cause, 0) + rows
        now = time.monotonic()
        if now - self._last.get(cause, -WARN_EVERY_S) < WARN_EVERY_S:
            return None
        self._last[cause] = now
        dropped = self._pending.pop(cause)
        return f"{dropped} row{'s' if dropped != 1 else ''} dropped: {message}" if dropped else message


class PredictionWriter:
    """Writes prediction rows (dicts of schema.predictions' columns) in batches; see the module's docstring."""

    def __init__(self, engine: Engine, max_queue: int = 10_000, batch_size: int = 256, flush_s: float = 0.5) -> None:
        self.engine, self.batch_size, self.flush_s = engine, max(1, batch_size), max(0.0, flush_s)
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=max(1, max_queue))
        self._lock = threading.Lock()  # the counts and the warner: put() runs on many threads
        self._counts = {"written": 0, "dropped_full": 0, "dropped_error": 0, "dropped_closed": 0}
        self._accepted = self._done = 0  # queued = accepted - done: exact even while the thread holds a batch
        self._warn = _Warner()
        self._failing = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vggnet-prediction-writer", daemon=True)
        self._thread.start()

    def put(self, row: dict[str, Any]) -> bool:
        """Queue one row; False when it was dropped (queue full, closed, not a row). Never blocks, never raises."""
        try:
            if self._closing.is_set():
                self._drop("dropped_closed", 1, "the writer is closed")
                return False
            full = self._complete(row)
            with self._lock:
                self._accepted += 1
            try:
                self._queue.put_nowait(full)
            except queue.Full:
                with self._lock:
                    self._accepted -= 1
                raise
            return True
        except queue.Full:
            self._drop("dropped_full", 1, f"the queue of {self._queue.maxsize} rows is full: the database is "
                       "slower than the predictions")
        except Exception as e:  # noqa: BLE001 - a prediction must not fail because its row is odd
            self._drop("dropped_error", 1, f"a row it cannot store ({type(e).__name__}: {e})")
        return False

    def stats(self) -> dict[str, int]:
        """written, dropped_full, dropped_error, dropped_closed and queued (waiting or being inserted) rows."""
        with self._lock:
            return {**self._counts, "queued": self._accepted - self._done}

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread; rows still queued after ``timeout`` seconds are said."""
        self._closing.set()
        self._thread.join(timeout)
        stats = self.stats()
        if stats["queued"]:
            log.warning("prediction store: %d rows still queued after %.1f s when closing", stats["queued"], timeout)
        dropped = {k: v for k, v in stats.items() if k.startswith("dropped_") and v}
        if dropped:  # the once-a-minute warnings may not have said the last ones
            log.warning("prediction store: closed; %d rows written, dropped: %s", stats["written"],
                        ", ".join(f"{k.removeprefix('dropped_')} {v}" for k, v in dropped.items()))

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _complete(self, row: dict[str, Any]) -> dict[str, Any]:
        # Every row gets every column: executemany takes its columns from the first row, so a key that only a
        # later row has would be dropped without a word. A key that is no column is said, once a minute.
        if not isinstance(row, Mapping):
            raise TypeError(f"a row is a dict of column values, not {type(row).__name__}")
        unknown = set(row) - _DEFAULTS.keys()
        if unknown:
            self._warn_unknown(sorted(unknown))
        full = {name: row.get(name, default) for name, default in _DEFAULTS.items()}
        full["created_at"] = utc(full["created_at"])
        return full

    def _warn_unknown(self, names: list[str]) -> None:
        keys = ", ".join(names)
        with self._lock:  # once a minute per set of keys: each typo is said
            line = self._warn(f"unknown {keys}", 0, f"ignored keys that are no column of predictions: {keys}")
        if line:
            log.warning("prediction store: %s", line)

    def _drop(self, cause: str, rows: int, message: str) -> None:
        with self._lock:
            self._counts[cause] += rows
            line = self._warn(cause, rows, message)
        if line:  # outside the lock: a slow log handler must not hold up put() on other threads
            log.warning("prediction store: %s", line)

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                self._write(batch)
            elif self._closing.is_set() and self._queue.empty():
                return

    def _take(self) -> list[dict[str, Any]]:
        """Up to batch_size rows: the first as it comes (a short poll, to see close()), then what arrived in the
        flush_s after it. The wait is on the closing event, not on the queue: a thread blocked in ``get`` is woken
        by every ``put`` (one wake-up and GIL hand-over per row cost the request threads more than the inserts:
        measured with py-spy, 6 % of a serving process's samples in ``Queue.put``'s notify). A queue that already
        holds a batch is drained at once."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        if self._queue.qsize() < self.batch_size - 1:
            self._closing.wait(self.flush_s)  # returns at once when the writer is closing
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[dict[str, Any]]) -> None:
        written, failed = 0, 0
        try:
            self._insert(batch)
            written = len(batch)
        except Exception as e:  # noqa: BLE001 - counted and said; the thread must go on
            if _database_away(e):  # each row would fail alike, after as long a wait
                failed = len(batch)
                self._fail(failed, e)
            else:  # a bad row (NULL, too long) or a missing table: one by one, so only the bad ones are dropped
                written = self._one_by_one(batch)
                failed = len(batch) - written
        with self._lock:
            self._counts["written"] += written
            self._done += len(batch)
        if written and self._failing and not failed:
            self._failing = False
            log.warning("prediction store: writing again to %s", safe_url(self.engine.url))

    def _one_by_one(self, batch: list[dict[str, Any]]) -> int:
        written = 0
        for i, row in enumerate(batch):
            try:
                self._insert([row])
                written += 1
            except Exception as e:  # noqa: BLE001 - counted and said; the thread must go on
                if _database_away(e):
                    self._fail(len(batch) - i, e)
                    break
                self._fail(1, e)
        return written

    def _fail(self, rows: int, error: Exception) -> None:
        self._failing = True
        self._drop("dropped_error", rows, f"{safe_url(self.engine.url)}: {type(error).__name__}: {first_line(error)}")

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as connection:
            connection.execute(predictions.insert(), rows)


def _database_away(error: Exception) -> bool:
    """The server is down or unreachable (not one row's fault): OperationalError, or a connection SQLAlchemy dropped."""
    return isinstance(error, exc.OperationalError) or bool(getattr(error, "connection_invalidated", False))
