"""Export a checkpoint for deployment — ONNX, an AOTInductor ``.pt2`` package, TorchScript — and read it back.

Every exported file carries the checkpoint's preprocessing (mean, std, input size, class names; see
:mod:`vggnet.export.common` for where each format keeps it) and is checked after writing: it is loaded back
and run at batch 1, 3 and 8 against the eager fp32 model (max relative error within
:data:`~vggnet.export.common.TOLERANCE`). The file is written under a temporary name and renamed only when
the check passes, so a failed export never leaves a file that looks good.

Imports models and ``vggnet.infer.predictor`` (for :class:`~vggnet.infer.Preprocessing`); the ONNX runtimes of
:mod:`vggnet.infer.runtimes` import :mod:`vggnet.export.onnx` inside their factories.
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vggnet.infer.predictor import Preprocessing
from vggnet.models import checkpoint_file, checkpoint_meta, load_checkpoint

from .common import CHECK_BATCHES, TOLERANCE, ExportedModel, ExportError, check_against

__all__ = ["FORMATS", "ExportError", "ExportReport", "ExportedModel", "export_model", "format_for", "load_exported"]

FORMATS = ("onnx", "pt2", "torchscript")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
_TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how it compared with eager."""

    path: Path
    format: str
    bytes: int
    seconds: float
    max_rel_error: dict[int, float]
    tolerance: float
    checkpoint: Path
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "bytes": self.bytes, "seconds": self.seconds,
                "max_rel_error": {str(k): v for k, v in self.max_rel_error.items()}, "tolerance": self.tolerance,
                "checkpoint": str(self.checkpoint), "preprocessing": self.preprocessing}


def format_for(path: str | os.PathLike) -> str:
    """The export format of a file, from its suffix, else from its content (ONNX is a protobuf; ``.pt2`` and
    TorchScript are zip archives, told apart by the PT2 archive's ``archive_format`` record)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "pt2"
    if suffix in _TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if not zipfile.is_zipfile(path):
        return "onnx"
    with zipfile.ZipFile(path) as archive:
        return "pt2" if any(n.endswith("archive_format") for n in archive.namelist()) else "torchscript"


def load_exported(path: str | os.PathLike, fmt: str | None = None, **options: Any) -> ExportedModel:
    """Read an exported file back with its preprocessing: ``model.runtime`` / ``model(x)`` give logits,
    ``model.predictor()`` labels for raw images. ``options`` go to the format's loader (``threads`` for ONNX)."""
    fmt = fmt or format_for(path)
    if fmt == "onnx":
        from .onnx import load_onnx

        return load_onnx(path, **options)
    if fmt == "pt2":
        from .pt2 import load_pt2

        return load_pt2(path)
    if fmt == "torchscript":
        from .torchscript import load_torchscript

        return load_torchscript(path)
    raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")


def export_model(ckpt: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                 check_batches: tuple[int, ...] = CHECK_BATCHES, opset: int | None = None) -> ExportReport:
    """Export the checkpoint ``ckpt`` (a run folder or ``.safetensors`` file) as ``fmt`` to ``out``.

    ``out`` defaults to the checkpoint's name with the format's suffix (``.onnx``, ``.pt2``, ``.pt``); a path
    without a suffix gets one. Raises :class:`ExportError` when the exported model disagrees with eager.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    start = time.perf_counter()
    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    out = Path(out) if out is not None else file.with_suffix(SUFFIXES[fmt])
    if not out.suffix:
        out = out.with_suffix(SUFFIXES[fmt])
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / ('model' + SUFFIXES[fmt])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        if fmt == "onnx":
            from .onnx import export_onnx, needs_external_data

            # weights over 2 GiB go to a side file whose name is recorded in the graph: no renaming then
            written = export_onnx(model, prep, out if needs_external_data(model) else tmp, source=file, opset=opset)
        elif fmt == "pt2":
            from .pt2 import export_pt2

            written = export_pt2(model, prep, tmp, source=file)
        else:
            from .torchscript import export_torchscript

            written = export_torchscript(model, prep, tmp, source=file)
        loaded = load_exported(written, fmt)
        if loaded.prep != prep:
            raise ExportError(f"{fmt}: the metadata read back ({loaded.prep}) differs from the checkpoint's ({prep})")
        errors = check_against(model, loaded.runtime, prep, TOLERANCE[fmt], check_batches, what=f"{fmt} export")
        if written != out:
            os.replace(written, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(path=out, format=fmt, bytes=out.stat().st_size, seconds=time.perf_counter() - start,
                        max_rel_error=errors, tolerance=TOLERANCE[fmt], checkpoint=file,
                        preprocessing=prep.to_dict())
