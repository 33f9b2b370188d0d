"""Export a checkpoint for deployment — ONNX, an AOTInductor ``.pt2`` package, TorchScript, the mobile formats
(an ExecuTorch ``.pte`` program, a LiteRT ``.tflite`` model), and INT8 versions of all but TorchScript — and read it
back.

Every exported file carries the checkpoint's preprocessing (see :mod:`vggnet.capture.metadata`) and is checked
after writing: loaded back and run at batch 1, 3 and 8 against the eager fp32 model (max relative error within
:data:`~vggnet.export.common.TOLERANCE`). It is written through :func:`vggnet.atomic.atomic_path` and takes its
name only when the check passes, so a failed export never leaves a file that looks good.

INT8 formats (``onnx-int8``: ONNX Runtime static QDQ; ``pt2-int8``: torchao PT2E + AOTInductor; ``executorch-int8``
and ``tflite-int8``: torchao PT2E with the backend's quantizer) are calibrated at export time, by default on the
run's own training images (:mod:`vggnet.capture.calibration`), so the file runs without calibration data. Their
check is top-1 agreement with eager fp32 on held-out images (at least :data:`~vggnet.export.common.MIN_AGREEMENT`),
with the max relative logit error reported.

The mobile formats are checked in their own runtimes (ExecuTorch's Python runtime, LiteRT's interpreter), like the
others: an ExecuTorch program runs batches of 1 to ``max_batch`` (default 32), a ``.tflite`` is written at batch 1 and
resized at run time (litert-torch converts no dynamic batch of a VGG); see :mod:`.executorch` and :mod:`.tflite`.

Layering: capturing and quantizing live in :mod:`vggnet.capture` (below ``infer``), preprocessing, the ONNX Runtime
session and the mobile runtimes in :mod:`vggnet.infer`; this package adds files, their checks and
:func:`load_exported`.
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vggnet.atomic import atomic_path
from vggnet.capture.onnx import needs_external_data
from vggnet.capture.quiet import MissingDependency, import_optional
from vggnet.errors import UsageError
from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG, checkpoint_file, checkpoint_meta, load_checkpoint

from .common import (
    CALIB_IMAGES,
    CHECK_BATCHES,
    CHECK_IMAGES,
    MIN_AGREEMENT,
    TOLERANCE,
    ExportedModel,
    ExportError,
    Int8Images,
    check_against,
    check_agreement,
    int8_images,
)

__all__ = ["FORMATS", "INT8_FORMATS", "ExportError", "ExportReport", "ExportedModel", "export_model", "format_for",
           "load_exported"]

FORMATS = ("onnx", "onnx-int8", "pt2", "pt2-int8", "torchscript", "executorch", "executorch-int8", "tflite",
           "tflite-int8")
INT8_FORMATS = ("onnx-int8", "pt2-int8", "executorch-int8", "tflite-int8")
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "pt2": ".pt2", "pt2-int8": ".int8.pt2", "torchscript": ".pt",
            "executorch": ".pte", "executorch-int8": ".int8.pte", "tflite": ".tflite", "tflite-int8": ".int8.tflite"}
# The suffix a file of each family must have: what vggnet predict and format_for tell it by.
_REQUIRED_SUFFIX = {"pt2-int8": ".pt2", "executorch": ".pte", "executorch-int8": ".pte", "tflite": ".tflite",
                    "tflite-int8": ".tflite"}
_EXECUTORCH = (("executorch.exir", "edge"), ("executorch.runtime", "edge"))
_LITERT = (("ai_edge_litert.interpreter", "edge"), ("litert_torch", "edge-convert"))
_TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")
# What each format needs beyond torch: (module, the vggnet extra that installs it).
_NEEDS = {"onnx": (("onnx", "export"), ("onnxruntime", "export"), ("onnxscript", "export")),
          "onnx-int8": (("onnx", "export"), ("onnxruntime.quantization", "export"), ("onnxscript", "export")),
          "pt2-int8": (("torchao.quantization", "quant"),),
          "executorch": _EXECUTORCH, "executorch-int8": (*_EXECUTORCH, ("torchao.quantization", "quant")),
          "tflite": _LITERT, "tflite-int8": (*_LITERT, ("torchao.quantization", "quant"))}


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how it compared with eager."""

    path: Path
    format: str
    bytes: int
    seconds: float
    max_rel_error: dict[int, float]
    #: the bound on ``max_rel_error`` (fp32 formats); None for INT8, checked by ``agreement`` instead
    tolerance: float | None
    checkpoint: Path
    preprocessing: dict[str, Any] = field(default_factory=dict)
    #: INT8 only: top-1 agreement with eager fp32 on the held-out images, and the bound it had to meet
    agreement: float | None = None
    min_agreement: float | None = None
    #: INT8 only: the scheme and calibration recorded in the file, and the images the check ran on
    quantization: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    #: onnx-int8 only: the size of the fp32 ONNX file it was quantized from (``reference`` names it)
    reference_bytes: int | None = None
    reference: str | None = None
    #: executorch only: the largest batch the program runs at once (its memory is planned for it)
    max_batch: int | None = None
    #: tflite only: whether the batch-1 file is resized to each batch (else it runs one image at a time)
    resizable: bool | None = None

    @property
    def size_ratio(self) -> float | None:
        """This file's size over the fp32 reference's (about 1/4 for a large INT8 model)."""
        return None if not self.reference_bytes else self.bytes / self.reference_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {"path": str(self.path), "format": self.format, "bytes": self.bytes, "seconds": self.seconds,
               "max_rel_error": {str(k): v for k, v in self.max_rel_error.items()}, "tolerance": self.tolerance,
               "checkpoint": str(self.checkpoint), "preprocessing": self.preprocessing}
        if self.max_batch is not None:
            out["max_batch"] = self.max_batch
        if self.resizable is not None:
            out["resizable"] = self.resizable
        if self.format in INT8_FORMATS:
            out.update(agreement=self.agreement, min_agreement=self.min_agreement, quantization=self.quantization,
                       check=self.check, reference=self.reference, reference_bytes=self.reference_bytes,
                       size_ratio=self.size_ratio)
        return out


def _require(fmt: str) -> None:
    """Import what ``fmt`` needs, or an :class:`ExportError` naming the extra to install (a CLI message, not
    an ImportError traceback half-way through an export). The LiteRT converter is no extra: its error gives the
    command that installs it."""
    for module, extra in _NEEDS.get(fmt, ()):
        try:
            if extra == "edge-convert":
                from .tflite import _quiet_converter

                with _quiet_converter():
                    import_optional(module, extra, f"format {fmt!r}")
            else:
                import_optional(module, extra, f"format {fmt!r}")
        except MissingDependency as exc:
            if extra == "edge-convert":
                from .tflite import CONVERTER_HINT

                raise ExportError(f"format {fmt!r} needs litert-torch (the LiteRT converter), which is not "
                                  f"installed or incomplete ({exc.__cause__}): {CONVERTER_HINT}") from exc
            raise ExportError(f"format {fmt!r} needs {module.split('.')[0]}, which is not installed: "
                              f"pip install 'vggnet[{extra}]'") from exc


def format_for(path: str | os.PathLike) -> str:
    """The export format of a file, from its suffix, else from its content (ONNX is a protobuf; ``.pt2`` and
    TorchScript are zip archives, told apart by the PT2 archive's ``archive_format`` record)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "pt2"
    if suffix == ".pte":
        return "executorch"
    if suffix == ".tflite":
        return "tflite"
    if suffix in _TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if not zipfile.is_zipfile(path):
        return "onnx"
    with zipfile.ZipFile(path) as archive:
        return "pt2" if any(n.endswith("archive_format") for n in archive.namelist()) else "torchscript"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")


def load_exported(path: str | os.PathLike, fmt: str | None = None, **options: Any) -> ExportedModel:
    """Read an exported file back with its preprocessing: ``model.runtime`` / ``model(x)`` give logits,
    ``model.predictor()`` labels for raw images. ``options`` go to the format's loader (``threads`` for ONNX).

    INT8 files load like their fp32 counterparts (no calibration data: it is baked into the file); their
    ``format`` is ``onnx-int8`` / ``pt2-int8``, from the ``quantization`` record in their metadata, whatever
    the file is called. Asking for an INT8 format of an fp32 file is an :class:`ExportError`.
    """
    fmt = fmt or format_for(path)
    _check_format(fmt)
    base = fmt.removesuffix("-int8")
    if base == "onnx":
        from .onnx import load_onnx

        loaded = load_onnx(path, **options)
    elif base == "pt2":
        from .pt2 import is_program, load_program, load_pt2

        loaded = load_program(path) if is_program(path) else load_pt2(path)
    elif base in ("executorch", "tflite"):
        loaded = _load_edge(path, base, **options)
    else:
        from .torchscript import load_torchscript

        loaded = load_torchscript(path)
    if loaded.meta.get("quantization"):
        loaded.format = f"{base}-int8"
        if hasattr(loaded.runtime, "name"):  # what predict / serve print as the runtime
            loaded.runtime.name = loaded.format
    elif fmt in INT8_FORMATS:
        raise ExportError(f"{path}: an fp32 {base} export, not {fmt} (no quantization record in its metadata)")
    return loaded


def _load_edge(path: str | os.PathLike, base: str, **options: Any) -> ExportedModel:
    """A ``.pte`` or ``.tflite``, or an :class:`ExportError` naming the extra its runtime comes in."""
    module = "executorch.runtime" if base == "executorch" else "ai_edge_litert.interpreter"
    try:
        import_optional(module, "edge", f"a {base} file")
    except MissingDependency as exc:
        raise ExportError(f"{path}: running a {base} file needs {module.split('.')[0]}, which is not installed: "
                          "pip install 'vggnet[edge]'") from exc
    if base == "executorch":
        from .executorch import load_executorch

        return load_executorch(path)
    from .tflite import load_tflite

    return load_tflite(path, **options)


@dataclass
class _Job:
    """One export: what is written, from what, and how it is checked."""

    model: VGG
    prep: Preprocessing
    source: Path
    fmt: str
    data: Int8Images | None
    opset: int | None
    check_batches: tuple[int, ...]
    min_agreement: float
    max_batch: int | None = None


@dataclass
class _Outcome:
    """How a written file compared with eager, and (INT8) what it records."""

    errors: dict[int, float]
    agreement: float | None = None
    quantization: dict[str, Any] | None = None
    reference_bytes: int | None = None
    resizable: bool | None = None


def _write(job: _Job, path: Path) -> tuple[Path, int | None]:
    """Write the file in ``job.fmt`` to ``path``; the path written and (onnx-int8) the fp32 file's size."""
    model, prep, data, source = job.model, job.prep, job.data, job.source
    if job.fmt == "onnx":
        from .onnx import export_onnx

        return export_onnx(model, prep, path, source=source, opset=job.opset), None
    if job.fmt == "onnx-int8":
        from .onnx import export_onnx_int8

        return export_onnx_int8(model, prep, path, data.calib, source=source, opset=job.opset,
                                calibration=data.calibration)
    if job.fmt == "pt2":
        from .pt2 import export_pt2

        return export_pt2(model, prep, path, source=source), None
    if job.fmt == "pt2-int8":
        # no size ratio: an fp32 .pt2 to compare with is a second C++ compile, and the package's code, not
        # its weights, dominates a small model's size (tiny VGG: 1.95 MB int8 vs 2.41 MB fp32)
        from .pt2 import export_pt2_int8

        return export_pt2_int8(model, prep, path, data.calib, source=source, calibration=data.calibration), None
    if job.fmt in ("executorch", "executorch-int8"):
        from .executorch import MAX_BATCH, export_executorch, export_executorch_int8

        max_batch = job.max_batch or MAX_BATCH
        if job.fmt == "executorch":
            return export_executorch(model, prep, path, source=source, max_batch=max_batch), None
        return export_executorch_int8(model, prep, path, data.calib, source=source, calibration=data.calibration,
                                      max_batch=max_batch), None
    if job.fmt == "tflite":
        from .tflite import export_tflite

        return export_tflite(model, prep, path, source=source), None
    if job.fmt == "tflite-int8":
        from .tflite import export_tflite_int8

        return export_tflite_int8(model, prep, path, data.calib, source=source, calibration=data.calibration), None
    from .torchscript import export_torchscript

    return export_torchscript(model, prep, path, source=source), None


def _write_and_check(job: _Job, path: Path) -> _Outcome:
    """Write ``path``, read it back as a user would and compare it with eager fp32: an :class:`ExportError` when
    it disagrees."""
    written, reference_bytes = _write(job, path)
    loaded = load_exported(written, job.fmt)
    if loaded.prep != job.prep:
        raise ExportError(f"{job.fmt}: the metadata read back ({loaded.prep}) differs from the checkpoint's "
                          f"({job.prep})")
    what = f"{job.fmt} export"
    resizable = (loaded.meta.get("litert") or {}).get("resizable") if job.fmt.startswith("tflite") else None
    if job.data is None:
        errors = check_against(job.model, loaded.runtime, job.prep, TOLERANCE[job.fmt], job.check_batches, what)
        return _Outcome(errors, resizable=resizable)
    errors, agreement = check_agreement(job.model, loaded.runtime, job.data.held, job.min_agreement,
                                        job.check_batches, what)
    return _Outcome(errors, agreement, loaded.meta["quantization"], reference_bytes, resizable)


def _output_path(file: Path, fmt: str, out: str | os.PathLike | None) -> Path:
    out = Path(out) if out is not None else file.with_name(file.stem + SUFFIXES[fmt])
    if not out.suffix:
        out = out.with_name(out.name + SUFFIXES[fmt])
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {out / ('model' + SUFFIXES[fmt])}")
    required = _REQUIRED_SUFFIX.get(fmt)
    if required and out.suffix.lower() != required:
        what = {".pt2": "an AOTInductor package", ".pte": "an ExecuTorch program",
                ".tflite": "a LiteRT model"}[required]
        raise UsageError(f"{out}: {what} must end in {required}")
    return out


def export_model(ckpt: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                 check_batches: tuple[int, ...] = CHECK_BATCHES, opset: int | None = None,
                 calib_data: str | os.PathLike | None = None, calib_images: int = CALIB_IMAGES,
                 check_images: int = CHECK_IMAGES, min_agreement: float = MIN_AGREEMENT,
                 max_batch: int | None = None) -> ExportReport:
    """Export the checkpoint ``ckpt`` (a run folder or ``.safetensors`` file) as ``fmt`` to ``out``.

    ``out`` defaults to the checkpoint's name with the format's suffix (``.onnx``, ``.int8.onnx``, ``.pt2``,
    ``.int8.pt2``, ``.pt``); a path without a suffix gets one. Raises :class:`ExportError` when the exported
    model disagrees with eager.

    INT8 formats calibrate on ``calib_images`` training images of the run (its ``recipe.yaml``), or of
    ``calib_data`` (a folder, glob or file), and must agree with eager fp32 on the top-1 class of at least
    ``min_agreement`` of up to ``check_images`` held-out images.

    ``max_batch`` (executorch formats only; default 32) is the largest batch the program runs at once.
    """
    _check_format(fmt)
    int8 = fmt in INT8_FORMATS
    if max_batch is not None and not fmt.startswith("executorch"):
        raise UsageError(f"max_batch applies to the executorch formats, not {fmt} (a .tflite is resized to any "
                         "batch at run time; the other formats take any batch)")
    if max_batch is not None and max_batch < 1:
        raise UsageError(f"max_batch must be at least 1, got {max_batch}")
    if calib_data is not None and not int8:
        raise UsageError(f"calibration images apply to the INT8 formats ({', '.join(INT8_FORMATS)}), not {fmt}")
    if not 0.0 <= min_agreement <= 1.0:
        raise UsageError(f"min_agreement must be between 0 and 1, got {min_agreement}")
    start = time.perf_counter()
    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    out = _output_path(file, fmt, out)
    _require(fmt)
    # the calibration and check images are read before anything slow, so bad data fails in seconds
    data = int8_images(file, prep, calib_data, calib_images, check_images) if int8 else None
    job = _Job(model, prep, file, fmt, data, opset, check_batches, min_agreement, max_batch)
    if fmt == "onnx" and needs_external_data(model):
        checked = _write_and_check(job, out)  # weights over 2 GiB go to a side file named in the graph: no rename
    else:
        with atomic_path(out, suffix=out.suffix) as tmp:
            checked = _write_and_check(job, tmp)
    return ExportReport(path=out, format=fmt, bytes=out.stat().st_size, seconds=time.perf_counter() - start,
                        max_rel_error=checked.errors, tolerance=None if int8 else TOLERANCE[fmt], checkpoint=file,
                        preprocessing=prep.to_dict(), agreement=checked.agreement,
                        min_agreement=min_agreement if int8 else None, quantization=checked.quantization,
                        check=data.check if data else None, reference_bytes=checked.reference_bytes,
                        reference="fp32 ONNX file" if checked.reference_bytes else None,
                        max_batch=_max_batch(fmt, max_batch), resizable=checked.resizable)


def _max_batch(fmt: str, max_batch: int | None) -> int | None:
    if not fmt.startswith("executorch"):
        return None
    from .executorch import MAX_BATCH

    return max_batch or MAX_BATCH
