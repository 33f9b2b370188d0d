"""What a run leaves behind for people: metrics files, TensorBoard events, curves and a confusion matrix.

``metrics.jsonl`` is the source of truth: appended and flushed every epoch, so a killed run keeps every
finished epoch, and reloaded on resume so the run continues the same files. ``metrics.csv`` is rewritten
from it for spreadsheet users. Plots use matplotlib's object API on the Agg canvas (no display, no global
pyplot state, whatever backend someone else selected) and replace their file atomically, so a viewer
never sees half a PNG. ``topk_correct`` / ``confusion_matrix`` (:mod:`vggnet.metrics`) and ``plot_confusion``
(:mod:`vggnet.plots`) are shared with test-time evaluation and re-exported here.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from vggnet.atomic import atomic_path, write_text
from vggnet.metrics import confusion_matrix, topk_correct
from vggnet.plots import plot_confusion
from vggnet.plots import save_figure as _save

__all__ = ["TENSORBOARD_MISSING", "RunLogger", "confusion_matrix", "format_epoch_line", "plot_confusion",
           "plot_curves", "tensorboard_missing", "topk_correct"]

# Not scalars worth a TensorBoard curve: the x axis itself, a constant and a wall-clock timestamp.
_NOT_SCALARS = ("epoch", "epochs", "time")


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, so records serialise to JSON and CSV alike."""
    if isinstance(value, torch.Tensor | np.generic) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


TENSORBOARD_MISSING = ("no tb/: TensorBoard is not installed (pip install 'vggnet[tensorboard]'), "
                       "or set train.tracking: none")


def tensorboard_missing() -> str | None:
    """Why ``tb/`` cannot be written (one line for the user), or None. TensorBoard is an optional extra while
    ``train.tracking: tensorboard`` is the default, so a plain ``pip install vggnet`` must hear why it has no tb/."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return TENSORBOARD_MISSING
    return None


class RunLogger:
    """Epoch records to ``metrics.jsonl`` + ``metrics.csv`` (+ TensorBoard under ``tb/`` when it imports;
    ``tensorboard_note`` says why not when it does not)."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.csv = self.out / "metrics.jsonl", self.out / "metrics.csv"
        self._records: list[dict[str, Any]] = []
        self.tensorboard_note = tensorboard_missing() if tensorboard else None
        self._tensorboard = tensorboard and self.tensorboard_note is None
        self._writer, self._purge_step = None, None
        if self.jsonl.is_file():
            text = self.jsonl.read_text()
            for line in text.splitlines():
                try:
                    self._records.append(json.loads(line))
                except json.JSONDecodeError:  # half-written when the run was killed
                    continue
            if text and (not text.endswith("\n") or len(self._records) != len(text.splitlines())):
                self._rewrite()  # else the next append would glue itself onto the broken line and be lost too

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _plain(v) for k, v in record.items()}
        line = json.dumps(record) + "\n"  # serialise first: a bad value must not leave memory and file disagreeing
        with open(self.jsonl, "a") as fh:
            fh.write(line)
            fh.flush()
        self._records.append(record)
        self._write_csv()
        writer = self._tb()
        if writer is not None:
            step = int(record.get("epoch", len(self._records)))
            for key, value in record.items():
                if key not in _NOT_SCALARS and (number := _number(value)) is not None:
                    writer.add_scalar(key, number, global_step=step)
            writer.flush()

    def truncate(self, after_epoch: int) -> None:
        """Forget epochs after ``after_epoch``: a resume from an earlier checkpoint redoes them, without duplicates.

        TensorBoard events cannot be edited, so the next writer is opened with ``purge_step``, which makes
        TensorBoard hide the old events from that epoch on.
        """
        kept = [r for r in self._records if int(r.get("epoch", 0)) <= after_epoch]
        if len(kept) != len(self._records):
            self._records = kept
            self._rewrite()
        self.close()
        self._purge_step = after_epoch + 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _tb(self) -> Any:
        """The SummaryWriter, opened on first use (so a truncate before it can set ``purge_step``); None without it."""
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional dependency
                self._tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.out / "tb"), purge_step=self._purge_step)
        return self._writer

    def _rewrite(self) -> None:
        write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self._records))
        self._write_csv()

    def _write_csv(self) -> None:
        columns: dict[str, None] = {}  # union of keys in first-seen order: later epochs may add e.g. val metrics
        for record in self._records:
            columns.update(dict.fromkeys(record))
        with atomic_path(self.csv, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(self._records)


def plot_curves(records: list[dict[str, Any]], path: Path, title: str | None = None) -> Path:
    """Loss and top-1 accuracy (train vs val) per epoch side by side, the learning rate faintly behind accuracy.

    Every key is optional: validation may run only every few epochs and early records may predate a metric.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)

    def series(key: str) -> tuple[list[float], list[float]]:
        pairs = [(float(r.get("epoch", i + 1)), _number(r.get(key))) for i, r in enumerate(records)]
        pairs = [(e, v) for e, v in pairs if v is not None and math.isfinite(v)]
        return [e for e, _ in pairs], [v for _, v in pairs]

    for ax, keys, ylabel in ((loss_ax, ("train_loss", "val_loss"), "loss"),
                             (acc_ax, ("train_top1", "val_top1", "val_top1_flip"), "top-1 accuracy (%)")):
        for key, style in zip(keys, ("-o", "-s", ":^"), strict=False):
            x, y = series(key)
            if x:
                ax.plot(x, y, style, markersize=3, label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    x, lr = series("lr")
    x, lr = [e for e, v in zip(x, lr, strict=True) if v > 0], [v for v in lr if v > 0]  # log scale: no zero warm-up
    if x:
        lr_ax = acc_ax.twinx()
        lr_ax.plot(x, lr, color="tab:gray", alpha=0.4, linewidth=1, drawstyle="steps-post")
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate", color="tab:gray")
        lr_ax.tick_params(axis="y", colors="tab:gray", which="both", labelsize=8)
        acc_ax.set_zorder(lr_ax.get_zorder() + 1)  # accuracy lines and legend above the lr line
        acc_ax.patch.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def format_epoch_line(record: dict[str, Any]) -> str:
    """One console line per epoch, readable in a scrolling log; absent (or None) fields are skipped."""
    get = {k: v for k, v in record.items() if _number(v) is not None}

    def group(name: str, fields: tuple[tuple[str, str], ...]) -> str:
        items = [fmt.format(get[key]) for key, fmt in fields if key in get]
        return f"{name} {' '.join(items)}" if items else ""

    parts = []
    if "epoch" in get:
        parts.append(f"epoch {get['epoch']:g}" + (f"/{get['epochs']:g}" if "epochs" in get else ""))
    parts.append(group("train", (("train_loss", "loss {:.3f}"), ("train_top1", "top1 {:.1f}%"))))
    parts.append(group("val", (("val_loss", "loss {:.3f}"), ("val_top1", "top1 {:.1f}%"), ("val_top5", "top5 {:.1f}%"),
                               ("val_top1_flip", "flip {:.1f}%"))))
    if "lr" in get:
        parts.append(f"lr {get['lr']:.4f}" if get["lr"] >= 1e-3 or get["lr"] == 0 else f"lr {get['lr']:.2e}")
    if "img_per_s" in get:
        parts.append(f"{get['img_per_s']:.0f} img/s")
    if "data_wait_frac" in get:
        parts.append(f"data {100 * get['data_wait_frac']:.0f}%")
    if "epoch_time" in get:
        parts.append(f"{get['epoch_time']:.1f}s")
    return "  ".join(p for p in parts if p)
