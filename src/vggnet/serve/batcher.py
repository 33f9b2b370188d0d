"""Dynamic batching: concurrent requests to one model version become one forward pass.

A conv net's forward pass on a CPU costs much less per image on a batch (per-layer dispatch, weight reads and
thread start-up are paid once per call), so grouping requests raises throughput several-fold. Each version gets
one queue and **one worker thread**: it takes the oldest request and waits at most ``max_delay_ms`` for others to
join (up to ``max_batch_size`` rows), but only while another request is on its way in (:meth:`Batcher.arriving`),
so a lone request is not held back. One worker per model, and a ``compute_lock`` shared across models, keep the
cores on one forward pass at a time instead of parallel passes that each get slower.

Other work on the model (Grad-CAM, :meth:`Batcher.submit_job`) runs on the same worker, alone, in arrival order,
at most ``max_jobs`` at once: it never splits the cores with a batch, and delays a prediction by a bounded amount.

Requests are validated before :meth:`Batcher.submit`, so a bad one never enters a batch; should a batch still
fail, each request is retried alone and only the failing one gets the error. A request whose client went away
(a cancelled future) is skipped instead of computed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .metrics import ServeMetrics

__all__ = ["BatchInfo", "Batcher", "BatcherClosed", "QueueFull"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More rows waiting than ``max_queue``: shed load (503) rather than let latency grow without bound."""


class BatcherClosed(RuntimeError):
    """The batcher is draining for shutdown and takes no new requests."""


@dataclass(frozen=True)
class BatchInfo:
    """How a request was served: the batch it joined and where its time went."""

    batch_rows: int
    batch_requests: int
    queue_s: float
    compute_s: float


@dataclass
class _Item:
    x: torch.Tensor | None
    future: concurrent.futures.Future
    enqueued: float
    #: a job (see Batcher.submit_job): run alone instead of batched; takes one row of the queue
    job: Callable[[], object] | None = None

    @property
    def rows(self) -> int:
        return 1 if self.x is None else int(self.x.shape[0])


class Batcher:
    """Queue + worker thread around ``fn`` (N×... tensor → N×... tensor), e.g. ``Predictor.logits``.

    ``batching=False`` runs one request per forward pass (the same worker, no grouping): the baseline
    that the load benchmark compares against. ``adaptive=False`` always waits out ``max_delay_ms`` for a
    batch to fill (the classic rule; for callers that do not announce requests with :meth:`arriving`).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, max_batch_size: int = 16,
                 max_delay_ms: float = 5.0, batching: bool = True, max_queue: int = 256, adaptive: bool = True,
                 max_jobs: int = 2, compute_lock: threading.Semaphore | threading.Lock | None = None,
                 metrics: ServeMetrics | None = None, labels: tuple[str, str] = ("model", "1")) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {max_jobs}")
        if max_queue < max_batch_size:
            raise ValueError(f"max_queue ({max_queue}) must be at least max_batch_size ({max_batch_size})")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.batching = batching
        self.adaptive = adaptive
        self.max_queue = max_queue
        self.max_jobs = max_jobs
        self._jobs = 0  # jobs queued or running
        self.metrics = metrics
        self.labels = labels
        self._compute_lock = compute_lock if compute_lock is not None else contextlib.nullcontext()
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closing = False
        self._incoming = 0
        self._busy = False  # the worker holds a batch or job popped from the queue
        self._thread: threading.Thread | None = None

    # --- client side (any thread; the event loop in the service) ------------------------------------------

    def start(self) -> Batcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"batcher-{'-'.join(self.labels)}", daemon=True)
            self._thread.start()
        return self

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def idle(self) -> bool:
        """Nothing announced, queued or running: a replaced version may be closed without refusing anyone."""
        return self._incoming == 0 and not self._queue and not self._busy

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request that is being received (body read, parsed, validated) and will be submitted
        inside this block; while any is announced, a forming batch waits (up to ``max_delay_ms``) for it."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify_all()

    def submit(self, x: torch.Tensor) -> concurrent.futures.Future:
        """Queue one request (an N×... tensor with 1 <= N <= max_batch_size); the future resolves to
        ``(output rows, BatchInfo)``. Raises :class:`QueueFull` or :class:`BatcherClosed` at once."""
        rows = int(x.shape[0])
        if not 1 <= rows <= self.max_batch_size:
            raise ValueError(f"a request of {rows} rows; this model takes 1 to {self.max_batch_size} per request")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing or self._thread is None:
                raise BatcherClosed("the model is not accepting requests (not started or shutting down)")
            if self._queued_rows + rows > self.max_queue:
                raise QueueFull(f"queue full ({self._queued_rows} rows waiting, limit {self.max_queue})")
            self._queue.append(_Item(x, future, time.perf_counter()))
            self._queued_rows += rows
            self._set_depth()
            self._cond.notify()
        return future

    def submit_job(self, job: Callable[[], object]) -> concurrent.futures.Future:
        """Queue ``job()`` (e.g. a Grad-CAM pass on the model) to run on the worker, alone and in arrival order,
        under the compute lock; the future resolves to ``(job's result, BatchInfo)``. Raises :class:`QueueFull`
        when ``max_jobs`` jobs are queued or running (or the queue is full), :class:`BatcherClosed` when
        closing. A job counts as one row of ``max_queue``."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing or self._thread is None:
                raise BatcherClosed("the model is not accepting requests (not started or shutting down)")
            if self._jobs >= self.max_jobs:
                raise QueueFull(f"{self._jobs} explanations already queued or running (limit {self.max_jobs})")
            if self._queued_rows + 1 > self.max_queue:
                raise QueueFull(f"queue full ({self._queued_rows} rows waiting, limit {self.max_queue})")
            self._queue.append(_Item(None, future, time.perf_counter(), job))
            self._queued_rows += 1
            self._jobs += 1
            self._set_depth()
            self._cond.notify()
        return future

    async def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, BatchInfo]:
        """``submit`` awaited from asyncio; cancelling the await cancels the queued request."""
        return await asyncio.wrap_future(self.submit(x))

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop taking requests, finish every queued one (without waiting out ``max_delay_ms``), stop the
        worker. Returns False if the worker was still busy after ``timeout`` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- worker side --------------------------------------------------------------------------------------

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_rows.labels(*self.labels).set(self._queued_rows)

    def _pop(self) -> _Item:
        item = self._queue.popleft()
        self._queued_rows -= item.rows
        return item

    def _next_batch(self) -> list[_Item] | None:
        """Block until a batch is due; None once closing and empty. Holds the lock only while waiting."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            batch = [self._pop()]
            rows = batch[0].rows
            deadline = batch[0].enqueued + self.max_delay_s  # the oldest request's wait bounds the batch's
            while self.batching and rows < self.max_batch_size and batch[0].job is None:  # a job runs alone
                if self._queue:
                    if self._queue[0].job is not None or rows + self._queue[0].rows > self.max_batch_size:
                        break  # never split a request; it (or a job) leads the next batch
                    item = self._pop()
                    batch.append(item)
                    rows += item.rows
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._closing or (self.adaptive and self._incoming == 0):
                    break  # out of time, draining, or nobody on the way: waiting would only add latency
                self._cond.wait(remaining)
            self._set_depth()
            self._busy = True
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # a request whose client gave up (cancelled future) is dropped here, not computed
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if batch[0].job is not None:
                self._run_job(batch[0], started=bool(live))
            elif live:
                try:
                    self._compute(live)
                except BaseException as exc:  # the worker must outlive anything a batch does
                    log.exception("batch failed outside the model call")
                    for item in live:
                        if not item.future.done():
                            item.future.set_exception(exc)
            self._busy = False  # every failure above is caught: the flag always comes down

    def _run_job(self, item: _Item, started: bool) -> None:
        started_at = time.perf_counter()
        try:
            if not started:  # cancelled while queued: its client went away
                return
            with self._compute_lock:
                begin = time.perf_counter()
                result = item.job()  # type: ignore[misc]
                compute_s = time.perf_counter() - begin
        except BaseException as exc:  # the job's failure is its request's, never the worker's
            item.future.set_exception(exc)
        else:
            queue_s = started_at - item.enqueued
            if self.metrics is not None:
                self.metrics.queue_latency.labels(*self.labels).observe(queue_s)
            item.future.set_result((result, BatchInfo(1, 1, queue_s, compute_s)))
        finally:
            with self._cond:
                self._jobs -= 1

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        with self._compute_lock:
            start = time.perf_counter()
            y = self.fn(x)
            return y, time.perf_counter() - start

    def _compute(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        rows = sum(item.rows for item in items)
        x = items[0].x if len(items) == 1 else torch.cat([item.x for item in items])
        try:
            y, compute_s = self._forward(x)
            if y.shape[0] != rows:
                raise RuntimeError(f"the model returned {y.shape[0]} rows for {rows}")
        except Exception as exc:
            if len(items) > 1:  # isolate: whatever broke the batch fails only its own request
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(items), exc)
                for item in items:
                    self._compute_alone(item)
                return
            items[0].future.set_exception(exc)
            return
        self._deliver(items, y, rows, compute_s, started)

    def _compute_alone(self, item: _Item) -> None:
        started = time.perf_counter()
        try:
            y, compute_s = self._forward(item.x)
        except Exception as exc:
            item.future.set_exception(exc)
            return
        self._deliver([item], y, item.rows, compute_s, started)

    def _deliver(self, items: list[_Item], y: torch.Tensor, rows: int, compute_s: float, started: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(*self.labels, rows=rows, requests=len(items), compute_s=compute_s)
        for item, out in zip(items, y.split([item.rows for item in items]), strict=True):
            queue_s = started - item.enqueued
            if self.metrics is not None:
                self.metrics.queue_latency.labels(*self.labels).observe(queue_s)
            item.future.set_result((out, BatchInfo(rows, len(items), queue_s, compute_s)))
