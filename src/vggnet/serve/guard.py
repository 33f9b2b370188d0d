"""The gateway's guard against adversarial inputs (``--adversarial-guard``, ``--reject-adversarial``): feature
squeezing (:mod:`vggnet.infer.squeeze`) on every prediction, against the threshold that ``vggnet robustness`` set on
the run's validation split and wrote beside the checkpoint (``adversarial.json``).

Opt-in because it costs two extra forward passes per image: the squeezed copies are submitted to the version's
worker as requests of their own once the prediction is back (batched with whatever else is queued, never run on the
event loop), so a guarded request takes about one more trip through the queue. The score goes into the store row
(``adv_score``), flagged images are counted (``vggnet_adversarial_flagged_total{model,version}``), and with
``--reject-adversarial`` a request with a flagged image is answered 422, after it was stored and counted.

Without the reference the guard has no threshold, so a version refuses to load (the CLI checks first: one line
naming the command to run).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vggnet.errors import UsageError
from vggnet.infer import Preprocessing
from vggnet.infer import squeeze as sq

from .errors import ServeError

if TYPE_CHECKING:
    from .lifecycle import ModelServer
    from .settings import ServeSettings
    from .versions import ModelVersion

__all__ = ["Screening", "enforce", "reference", "screen"]


@dataclass(frozen=True)
class Screening:
    """The guard's verdict on one request's N images."""

    scores: list[float]
    flagged: list[bool]
    threshold: float


def reference(file: str | os.PathLike) -> dict[str, Any]:
    """The detector's reference beside ``file``, or a UsageError naming the command that writes it."""
    ref = sq.load_reference(file)
    if ref is None:
        name = Path(file)
        run = name.parent if name.suffix == ".safetensors" else name
        raise UsageError(f"--adversarial-guard needs {sq.REFERENCE_FILE} beside {name.name} (the detector's threshold "
                         f"on the validation split): run `vggnet robustness --ckpt {run}` first")
    return ref


def squeezer(prep: Preprocessing, ref: dict[str, Any]) -> sq.Squeezer:
    return sq.Squeezer(prep, int(ref.get("bits", sq.DEFAULT_BITS)))


async def screen(server: ModelServer, mv: ModelVersion, x: torch.Tensor, logits: torch.Tensor) -> Screening | None:
    """Score the N preprocessed images ``x`` whose ``logits`` the prediction gave; None when the guard is off.
    The squeezed copies run on ``mv``'s worker like any request (503 when its queue is full)."""
    ref = getattr(mv, "adversarial", None)
    if not server.settings.adversarial_guard or ref is None:
        return None
    squeezed = await server.offload(squeezer(mv.prep, ref).squeezed, x)
    futures = [server.submit(mv, s) for s in squeezed]
    results = await asyncio.gather(*(server.result(mv, f) for f in futures))
    scores = sq.squeeze_distances(logits, *(out for out, _ in results)).tolist()
    limit = float(ref["threshold"])
    return Screening(scores=[round(s, 6) for s in scores], flagged=[s > limit for s in scores], threshold=limit)


def enforce(settings: ServeSettings, screening: Screening | None) -> None:
    """With ``reject_adversarial``, 422 for a request with a flagged image (it is stored and counted already)."""
    if screening is None or not settings.reject_adversarial or not any(screening.flagged):
        return
    worst = max(screening.scores)
    items = [i for i, f in enumerate(screening.flagged) if f]
    which = "the input" if len(screening.flagged) == 1 else f"input(s) {', '.join(map(str, items))}"
    raise ServeError(422, f"{which} flagged as adversarial (feature-squeezing score {worst:.3f} > threshold "
                          f"{screening.threshold:.3f}); refused by --reject-adversarial")
