"""``--keep-inputs DIR``: the image a reviewer looks at, kept for the predictions that may need a person.

Off by default (the images are the users' data: SECURITY.md). What is kept is the crop the network saw, as a PNG
(un-normalised from the model's input): bounded in size whatever was uploaded (a 32-px crop is about 3 KB, a
224-px one about 100 KB), and all a reviewer needs to judge the answer. Files are content-addressed by the
SHA-256 of the request's input (``ab/abcdef....png``), so the same image sent twice, or a shadow version's row of
the same request, shares one file. Which rows: the uniform random review sample and low-confidence answers (the
review queue's first reasons). Writing happens on one background thread; when more than ``MAX_PENDING`` images
wait, or the folder holds ``max_bytes``, an image is not kept and ``vggnet_kept_inputs{outcome}`` counts it:
never a slower or failed prediction.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vggnet.atomic import write_bytes

__all__ = ["MAX_PENDING", "InputKeeper"]

log = logging.getLogger(__name__)

#: images waiting to be written at most; beyond, an image is not kept
MAX_PENDING = 64


class InputKeeper:
    """Keeps network crops as PNGs under ``folder``, at most ``max_bytes`` in all."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.used = sum(p.stat().st_size for p in self.folder.glob("??/*.png"))
        self.counts = {"kept": 0, "full": 0, "busy": 0, "failed": 0}
        self._pending = 0
        self._reserved = 0  # bytes held for images queued but not written yet
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vggnet-keep")

    def keep(self, sha256: str, x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> str | None:
        """The path (relative to the folder) the crop ``x`` (C×S×S, normalised) is or will be kept at, else None."""
        relative = f"{sha256[:2]}/{sha256}.png"
        if (self.folder / relative).exists():
            return relative
        # Until a PNG is written its size is unknown: it holds the raw pixels' size (a PNG of 8-bit pixels is
        # rarely larger) against the budget, so images queued together cannot overrun it.
        reserve = x.numel() + 1024
        with self._lock:
            if self.used + self._reserved >= self.max_bytes:
                self.counts["full"] += 1
                return None
            if self._pending >= MAX_PENDING:
                self.counts["busy"] += 1
                return None
            self._pending += 1
            self._reserved += reserve
        pixels = (x.detach().float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1))
        self._pool.submit(self._write, relative, pixels, reserve)
        return relative

    def _write(self, relative: str, pixels: torch.Tensor, reserve: int) -> None:
        try:
            array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            buffer = io.BytesIO()
            Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, "PNG")
            data = buffer.getvalue()
            write_bytes(self.folder / relative, data)  # atomic: a reader never sees half a file
            with self._lock:
                self.used += len(data)
                self.counts["kept"] += 1
        except OSError as exc:  # a full disk or a removed folder: the image is not kept, the server goes on
            with self._lock:
                self.counts["failed"] += 1
            log.warning("kept input %s not written: %s", relative, exc)
        finally:
            with self._lock:
                self._pending -= 1
                self._reserved -= reserve

    def path(self, relative: str) -> Path | None:
        """The file of a kept input, or None (a name that is not a kept file's is never resolved: no traversal)."""
        parts = relative.split("/")
        if len(parts) != 2 or not parts[1].endswith(".png") or len(parts[1]) != 68 or parts[1][:2] != parts[0] \
                or not all(c in "0123456789abcdef" for c in parts[1][:64]):
            return None
        file = self.folder / relative
        return file if file.is_file() else None

    def purge(self, older_than_days: float) -> int:
        """Remove kept images older than the store's rows they belong to may be (``--store-keep-days``)."""
        cutoff = time.time() - older_than_days * 86400
        removed = 0
        for file in self.folder.glob("??/*.png"):
            try:
                stat = file.stat()
                if stat.st_mtime < cutoff:
                    file.unlink()
                    removed += 1
                    with self._lock:
                        self.used -= stat.st_size
            except OSError:  # removed meanwhile
                continue
        return removed

    def close(self) -> None:
        self._pool.shutdown(wait=True)
