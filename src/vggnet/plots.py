"""Figures shared by training (``engine``) and evaluation (``evaluate``): matplotlib's object API on Agg.

No display, no global pyplot state, whatever backend someone else selected; files are replaced atomically,
so a viewer never sees half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, overload

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vggnet.atomic import atomic_path

__all__ = ["plot_confusion", "save_figure"]


@overload
def save_figure(fig: Figure, path: str | os.PathLike) -> Path: ...
@overload
def save_figure(fig: Figure, path: IO[bytes]) -> IO[bytes]: ...
def save_figure(fig: Figure, path: str | os.PathLike | IO[bytes]) -> Path | IO[bytes]:
    """Write ``fig`` as a PNG through :func:`vggnet.atomic.atomic_path`, so a viewer never sees half a file.

    An open binary file (``io.BytesIO``) gets the bytes as they are: a caller writing several files renders
    them all first, so a failed plot leaves none of them changed.
    """
    FigureCanvasAgg(fig)  # attach Agg explicitly: independent of the pyplot backend in this process
    if not isinstance(path, str | os.PathLike):
        fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
        return path
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


@overload
def plot_confusion(matrix: Any, classes: list[str], path: str | os.PathLike, normalize: bool = True,
                   title: str | None = None) -> Path: ...
@overload
def plot_confusion(matrix: Any, classes: list[str], path: IO[bytes], normalize: bool = True,
                   title: str | None = None) -> IO[bytes]: ...
def plot_confusion(matrix: Any, classes: list[str], path: str | os.PathLike | IO[bytes], normalize: bool = True,
                   title: str | None = None) -> Path | IO[bytes]:
    """Heat map with rows the true class; ``normalize`` makes rows sum to 1, so the diagonal is per-class recall
    and rare classes are as visible as common ones."""
    m = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    n = len(classes)
    if m.shape != (n, n):
        raise ValueError(f"matrix of shape {m.shape} for {n} classes")
    if normalize:
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = max(4.5, min(14.0, 0.55 * n + 2))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, m.max(initial=0)))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    if n <= 60:  # beyond that the names overlap; the colour pattern is what remains informative
        fontsize = 9 if n <= 12 else 7
        ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
        ax.set_yticks(range(n), labels=classes, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                text = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if n <= 12 else 6,
                        color="white" if m[i, j] > 0.55 * image.norm.vmax else "black")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    return save_figure(fig, path)
