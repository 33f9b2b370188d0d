"""Training checkpoints: one folder per epoch, written whole or not at all.

Each ``checkpoints/epoch-NNNN/`` holds ``model.safetensors`` (a vggnet checkpoint any tool can
load), ``ema.safetensors`` when EMA is on, and ``state.pt`` (optimizer, schedule, scaler, epoch,
RNG and loader state, read back with ``weights_only=True``). The folder is written whole by
:func:`vggnet.atomic.atomic_dir`, so a kill or a full disk mid-save leaves the previous checkpoint
intact. ``last.safetensors`` and ``best.safetensors`` at the run root are hard links (copies where
links fail) for users who just want the weights.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggnet.atomic import atomic_dir, atomic_path
from vggnet.models import VGG, save_checkpoint

# epoch-NNNN: the end of epoch N; epoch-NNNN-step-SSSSSSSSS: global step S, inside epoch N + 1 (train.checkpoint_every)
_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})(?:-step-(\d+))?$")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


def _link(src: Path, dst: Path) -> None:
    with atomic_path(dst, suffix=dst.suffix) as tmp:
        tmp.unlink()  # os.link needs a free name
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def save_training_checkpoint(run_dir: Path, epoch: int, model: VGG, ema: VGG | None, state: dict[str, Any],
                             metadata: dict[str, Any], is_best: bool, keep: int, link: bool = True,
                             step: int | None = None) -> Path | None:
    """Write epoch ``epoch``; returns its folder, or None (with a warning) when the disk refused. ``link``: also
    point ``last`` (and, if ``is_best``, ``best``) ``.safetensors`` at its weights. ``step``: a checkpoint inside
    the epoch after ``epoch``, at that global step (``train.checkpoint_every``)."""
    name = f"epoch-{epoch:04d}" + (f"-step-{step:09d}" if step is not None else "")
    final = run_dir / "checkpoints" / name
    try:
        with atomic_dir(final) as tmp:
            save_checkpoint(model, tmp / "model.safetensors", {**metadata, "epoch": epoch})
            if ema is not None:
                save_checkpoint(ema, tmp / "ema.safetensors", {**metadata, "epoch": epoch, "ema": True})
            torch.save(state, tmp / "state.pt")
        weights = final / ("ema.safetensors" if ema is not None else "model.safetensors")
        if link:
            _link(weights, run_dir / "last.safetensors")
        if link and is_best:
            _link(weights, run_dir / "best.safetensors")
    except OSError as exc:
        warnings.warn(f"could not save the epoch {epoch} checkpoint ({exc}); the previous one is intact",
                      stacklevel=2)
        return None
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders of an interrupted save are ignored); a folder
    inside an epoch sorts after the end of the epoch before it."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _EPOCH_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=_order)


def _order(folder: Path) -> tuple[int, int]:
    match = _EPOCH_DIR.match(folder.name)
    assert match is not None  # list_checkpoints keeps matching names only
    return int(match.group(1)), int(match.group(2) or -1)


def load_training_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
