"""What an evaluation will cost, said before it starts.

``multicrop@1.14,1.5`` is 100 network inputs per image: on 5,000 images that is half a million forward passes,
twenty minutes on a laptop, and nothing in the protocol's name says so. :func:`cost_block` turns each protocol
into its views per image, the total, and a time estimated from one timed batch on the device that will run it,
so the user can stop and pass ``--limit`` before waiting. The estimate counts forward passes only (not image
decoding) and takes a dense view of scale Q as (Q / crop)² crops of work, as for a square image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from .protocols import Protocol, _prepare

__all__ = ["cost_block", "crop_units", "format_seconds", "seconds_per_crop"]

CPU_TIMING_BATCH = 16  # a full batch of VGG-16 at 224 px takes seconds on a CPU: time a few crops instead
TIMED_RUNS = 2  # the fastest of these counts: a busy machine slows single runs, never speeds them up


def crop_units(protocol: Protocol, crop: int) -> float:
    """The work of one image under ``protocol`` for one model, in forward passes of one crop-sized input."""
    per_flip = 0.0
    for q in protocol.pixel_scales(crop):
        for comp in protocol.components:
            per_flip += {"single": 1.0, "shift": 5.0, "multicrop": 25.0}.get(comp, (max(q, crop) / crop) ** 2)
    return per_flip * (2 if protocol.flip else 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_crop(models: Sequence[nn.Module], crop: int, channels: int, *, device: str | torch.device,
                     bf16: bool, batch_size: int) -> float:
    """Seconds one crop-sized input costs all ``models`` together: the fastest of two timed batches after a
    warm-up one (first-call allocations and cuDNN autotuning would otherwise count). The callers' models are
    not touched."""
    device = torch.device(device)
    batch = batch_size if device.type == "cuda" else min(batch_size, CPU_TIMING_BATCH)
    x = torch.rand(batch, channels, crop, crop).to(device).contiguous(memory_format=torch.channels_last)
    total = 0.0
    for model in models:
        net = _prepare(model, False, device, channels_last=True)
        runs = []
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(x)
            _sync(device)
            for _ in range(TIMED_RUNS):
                start = time.perf_counter()
                net(x)
                _sync(device)
                runs.append(time.perf_counter() - start)
        total += min(runs)
        del net
    return total / batch


def format_seconds(seconds: float) -> str:
    """``~40 s``, ``~12 min``, ``~3.5 h``: an estimate, so two figures at most."""
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


def cost_block(protocols: Sequence[Protocol], crop: int, images: int, per_crop: float | None,
               limit: int | None = None, models: int = 1, device: str = "") -> str:
    """The lines printed before an evaluation: per protocol its views per image, total views and estimated
    time (``per_crop`` from :func:`seconds_per_crop`; None leaves the time out), then how ``--limit`` helps."""
    ensemble = f" x {models} models" if models > 1 else ""
    where = f" on {device}" if device else ""
    timed = f"; time estimated from a timed batch{where} (forward passes only)" if per_crop is not None else ""
    lines = [f"vggnet eval: {images:,} images{ensemble}{timed}"]
    width = max(len(str(p)) for p in protocols)
    total = 0.0
    for protocol in protocols:
        views = protocol.views_per_image()
        per_image = f"{views} view{'s' if views > 1 else ''}/image"
        line = f"  {str(protocol):<{width}}  {per_image:>15}  {views * images * models:>12,} forward passes"
        if per_crop is not None:
            seconds = crop_units(protocol, crop) * images * per_crop
            total += seconds
            line += f"  {format_seconds(seconds)}"
        lines.append(line)
    if limit is not None:
        lines.append(f"  --limit {limit}: only these {images:,} images, evenly spread over the split")
    elif per_crop is not None and total > 60 and images > 1:
        n = max(1, images * 60 // round(total))
        lines.append(f"  to try it first: --limit {n} (about a minute: {n:,} images evenly spread over the split)")
    else:
        lines.append("  --limit N evaluates only N images, evenly spread over the split")
    return "\n".join(lines)
