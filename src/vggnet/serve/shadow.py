"""Shadow mode: a model's ``shadow`` versions (``config.yaml``) run on the inputs of every answered request
without answering, and their predictions are recorded beside the served one under the same request id, with
the same review-sample draw. A person's label on such a request then scores both versions on the same image:
the paired comparison ``vggnet monitor report`` makes with McNemar's test.

The shadow pass starts after the answer is computed and is never awaited by the request: a shadow version that
is loading, overloaded or failing costs the client nothing (it is logged and counted in
``vggnet_shadow_skipped_total``). It does cost compute: one more forward pass per shadow version.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from .errors import ServeError
from .lifecycle import ModelServer
from .record import PredictionRecorder
from .versions import ModelVersion

__all__ = ["start_shadows"]

log = logging.getLogger(__name__)


def start_shadows(server: ModelServer, recorder: PredictionRecorder, served: ModelVersion, x: torch.Tensor,
                  request_id: str, route: str, sampled: bool, data: bytes | None = None) -> None:
    """Schedule ``x`` on each shadow version of ``served``'s model (none: nothing happens)."""
    try:
        model = server.model(served.name)
    except ServeError:  # unloaded meanwhile
        return
    for version in model.config.shadow:
        if version == served.version:  # asked for by name: it answered, it does not shadow itself
            continue
        task = asyncio.create_task(_shadow(server, recorder, model.versions[version], x, request_id, route,
                                           sampled, data))
        recorder.tasks.add(task)  # a reference until it ends (the loop keeps only weak ones)
        task.add_done_callback(recorder.tasks.discard)


async def _shadow(server: ModelServer, recorder: PredictionRecorder, mv: ModelVersion, x: torch.Tensor,
                  request_id: str, route: str, sampled: bool, data: bytes | None) -> None:
    try:
        logits, info = await server.result(mv, server.submit(mv, x))
    except ServeError as exc:
        recorder.metrics.shadow_skipped.labels(mv.name, mv.version).inc()
        log.debug("shadow %s version %s skipped request %s: %s", mv.name, mv.version, request_id, exc.message)
        return
    recorder.record(request_id, route, mv, logits.float().softmax(1), x, (info.queue_s + info.compute_s) * 1000,
                    data, role="shadow", sampled=sampled)
