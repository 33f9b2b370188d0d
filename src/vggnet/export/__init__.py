"""Export a checkpoint for deployment — ONNX, an AOTInductor ``.pt2`` package, TorchScript, and INT8 versions of
the first two — and read it back.

Every exported file carries the checkpoint's preprocessing (mean, std, input size, class names; see
:mod:`vggnet.export.common` for where each format keeps it) and is checked after writing: it is loaded back
and run at batch 1, 3 and 8 against the eager fp32 model (max relative error within
:data:`~vggnet.export.common.TOLERANCE`). The file is written under a temporary name and renamed only when
the check passes, so a failed export never leaves a file that looks good.

INT8 formats (``onnx-int8``: ONNX Runtime static QDQ; ``pt2-int8``: torchao PT2E + AOTInductor) are
calibrated at export time, by default on the run's own training images (see
:func:`~vggnet.export.common.int8_images`), so the file runs without any calibration data. They cannot meet
an fp32 tolerance; their check is top-1 agreement with eager fp32 on held-out images (at least
:data:`~vggnet.export.common.MIN_AGREEMENT`), with the max relative logit error reported.

Imports models and ``vggnet.infer.predictor`` (for :class:`~vggnet.infer.Preprocessing`); the ONNX runtimes of
:mod:`vggnet.infer.runtimes` import :mod:`vggnet.export.onnx` inside their factories. The INT8 paths import
:mod:`vggnet.infer.runtimes` (optional-dependency checks, the PT2E helpers) and ``vggnet.evaluate.sources``
(a run's own train / val split) when they run, not at import.
"""

from __future__ import annotations

import copy
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG, checkpoint_file, checkpoint_meta, load_checkpoint

from .common import (
    CALIB_IMAGES,
    CHECK_BATCHES,
    CHECK_IMAGES,
    METADATA_KEY,
    MIN_AGREEMENT,
    TOLERANCE,
    ExportedModel,
    ExportError,
    check_against,
    check_agreement,
    example_input,
    export_metadata,
    int8_images,
)

__all__ = ["FORMATS", "INT8_FORMATS", "ExportError", "ExportReport", "ExportedModel", "export_model", "format_for",
           "load_exported"]

FORMATS = ("onnx", "onnx-int8", "pt2", "pt2-int8", "torchscript")
INT8_FORMATS = ("onnx-int8", "pt2-int8")
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "pt2": ".pt2", "pt2-int8": ".int8.pt2", "torchscript": ".pt"}
_TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")
# What each format needs beyond torch: (module, the vggnet extra that installs it).
_NEEDS = {"onnx": (("onnx", "export"), ("onnxruntime", "export"), ("onnxscript", "export")),
          "onnx-int8": (("onnx", "export"), ("onnxruntime.quantization", "export"), ("onnxscript", "export")),
          "pt2-int8": (("torchao.quantization", "quant"),)}


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

    @property
    def size_ratio(self) -> float | None:
        """This file's size over the fp32 reference's (about 1/4 for a large INT8 model)."""
        return None if not self.reference_bytes else self.bytes / self.reference_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {"path": str(self.path), "format": self.format, "bytes": self.bytes, "seconds": self.seconds,
               "max_rel_error": {str(k): v for k, v in self.max_rel_error.items()}, "tolerance": self.tolerance,
               "checkpoint": str(self.checkpoint), "preprocessing": self.preprocessing}
        if self.format in INT8_FORMATS:
            out.update(agreement=self.agreement, min_agreement=self.min_agreement, quantization=self.quantization,
                       check=self.check, reference=self.reference, reference_bytes=self.reference_bytes,
                       size_ratio=self.size_ratio)
        return out


def _require(fmt: str) -> None:
    """Import what ``fmt`` needs, or an :class:`ExportError` naming the extra to install (a CLI message, not
    an ImportError traceback half-way through an export)."""
    from vggnet.infer.runtimes import RuntimeUnavailable
    from vggnet.infer.runtimes import _require as require

    for module, extra in _NEEDS.get(fmt, ()):
        try:
            require(module, extra, fmt)
        except RuntimeUnavailable as exc:
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
    ``model.predictor()`` labels for raw images. ``options`` go to the format's loader (``threads`` for ONNX).

    INT8 files load like their fp32 counterparts (no calibration data: it is baked into the file); their
    ``format`` is ``onnx-int8`` / ``pt2-int8``, from the ``quantization`` record in their metadata, whatever
    the file is called. Asking for an INT8 format of an fp32 file is an :class:`ExportError`.
    """
    fmt = fmt or format_for(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    base = fmt.removesuffix("-int8")
    if base == "onnx":
        from .onnx import load_onnx

        loaded = load_onnx(path, **options)
    elif base == "pt2":
        from .pt2 import is_program, load_program, load_pt2

        loaded = load_program(path) if is_program(path) else load_pt2(path)
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


def export_model(ckpt: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                 check_batches: tuple[int, ...] = CHECK_BATCHES, opset: int | None = None,
                 calib_data: str | os.PathLike | None = None, calib_images: int = CALIB_IMAGES,
                 check_images: int = CHECK_IMAGES, min_agreement: float = MIN_AGREEMENT) -> ExportReport:
    """Export the checkpoint ``ckpt`` (a run folder or ``.safetensors`` file) as ``fmt`` to ``out``.

    ``out`` defaults to the checkpoint's name with the format's suffix (``.onnx``, ``.int8.onnx``, ``.pt2``,
    ``.int8.pt2``, ``.pt``); a path without a suffix gets one. Raises :class:`ExportError` when the exported
    model disagrees with eager.

    INT8 formats calibrate on ``calib_images`` training images of the run (its ``recipe.yaml``), or of
    ``calib_data`` (a folder, glob or file), and must agree with eager fp32 on the top-1 class of at least
    ``min_agreement`` of up to ``check_images`` held-out images (see :func:`~vggnet.export.common.int8_images`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    int8 = fmt in INT8_FORMATS
    if calib_data is not None and not int8:
        raise ValueError(f"calibration images apply to the INT8 formats ({', '.join(INT8_FORMATS)}), not {fmt}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be between 0 and 1, got {min_agreement}")
    start = time.perf_counter()
    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    out = Path(out) if out is not None else file.with_name(file.stem + SUFFIXES[fmt])
    if not out.suffix:
        out = out.with_name(out.name + SUFFIXES[fmt])
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / ('model' + SUFFIXES[fmt])}")
    if fmt == "pt2-int8" and out.suffix != ".pt2":
        raise ValueError(f"{out}: an AOTInductor package must end in .pt2")
    _require(fmt)
    # the calibration and check images are read before anything slow, so bad data fails in seconds
    data = int8_images(file, prep, calib_data, calib_images, check_images) if int8 else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    reference_bytes: int | None = None
    agreement: float | None = None
    quantization: dict[str, Any] | None = None
    try:
        if fmt == "onnx":
            from .onnx import export_onnx, needs_external_data

            # weights over 2 GiB go to a side file whose name is recorded in the graph: no renaming then
            written = export_onnx(model, prep, out if needs_external_data(model) else tmp, source=file, opset=opset)
        elif fmt == "onnx-int8":
            from .onnx import export_onnx_int8

            written, reference_bytes = export_onnx_int8(model, prep, tmp, data.calib, source=file, opset=opset,
                                                        calibration=data.calibration)
        elif fmt == "pt2":
            from .pt2 import export_pt2

            written = export_pt2(model, prep, tmp, source=file)
        elif fmt == "pt2-int8":
            # no size ratio: an fp32 .pt2 to compare with is a second C++ compile, and the package's code, not
            # its weights, dominates a small model's size (tiny VGG: 1.95 MB int8 vs 2.41 MB fp32)
            written = _export_pt2_int8(model, prep, tmp, data.calib, source=file, calibration=data.calibration)
        else:
            from .torchscript import export_torchscript

            written = export_torchscript(model, prep, tmp, source=file)
        loaded = load_exported(written, fmt)
        if loaded.prep != prep:
            raise ExportError(f"{fmt}: the metadata read back ({loaded.prep}) differs from the checkpoint's ({prep})")
        if int8:
            quantization = loaded.meta["quantization"]
            errors, agreement = check_agreement(model, loaded.runtime, data.held, min_agreement, check_batches,
                                                what=f"{fmt} export")
        else:
            errors = check_against(model, loaded.runtime, prep, TOLERANCE[fmt], check_batches, what=f"{fmt} export")
        if written != out:
            os.replace(written, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(path=out, format=fmt, bytes=out.stat().st_size, seconds=time.perf_counter() - start,
                        max_rel_error=errors, tolerance=None if int8 else TOLERANCE[fmt], checkpoint=file,
                        preprocessing=prep.to_dict(), agreement=agreement,
                        min_agreement=min_agreement if int8 else None, quantization=quantization,
                        check=data.check if data else None, reference_bytes=reference_bytes,
                        reference="fp32 ONNX file" if reference_bytes else None)


def _export_pt2_int8(model: VGG, prep: Preprocessing, out: Path, calib: torch.Tensor, *,
                     source: str | os.PathLike | None = None, calibration: dict[str, Any] | None = None) -> Path:
    """torchao PT2E static INT8 (the ``int8`` runtime's recipe: ``X86InductorQuantizer``, conv+BN folded,
    weights int8 per channel, activations uint8 per tensor, calibrated on ``calib``), then re-exported with a
    dynamic batch and compiled by AOTInductor with Inductor's freezing on, which fuses the quantize /
    dequantize pairs into oneDNN int8 conv/linear kernels with the int8 weights as constants of the package.

    ``torch.export.save`` of the converted program also works, but its loader needs torchao imported (the
    ``quantized_decomposed`` ops) and runs simulated quantization in fp32 unless compiled again; the
    AOTInductor package loads with ``torch._inductor.aoti_load_package`` alone, without torchao or the
    calibration images.
    """
    import torchao
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from vggnet.infer.runtimes import CALIB_CHUNK, _exported, _quiet_compiler_probe, _quiet_lowering

    example = example_input(prep)
    with torch.no_grad():
        graph = _exported(copy.deepcopy(model).eval(), example)
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        for chunk in calib.float().contiguous().split(CALIB_CHUNK):
            prepared(chunk)
        converted = convert_pt2e(prepared)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(converted, (example,), dynamic_shapes=({0: batch},))
        quantization = {"dtype": "int8", "method": "static post-training", "format": "AOTInductor",
                        "tool": f"torchao {torchao.__version__} PT2E, X86InductorQuantizer",
                        "calibration_method": "histogram (activations), min-max (weights)",
                        "weights": "int8, symmetric, per output channel",
                        "activations": "uint8, asymmetric, per tensor", "calibration": dict(calibration or {})}
        metadata = {METADATA_KEY: export_metadata(model, prep, source, quantization)}
        with _quiet_lowering(), _quiet_compiler_probe(True):
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(out),
                inductor_configs={"freezing": True, "aot_inductor.metadata": metadata})
    return out
