"""ONNX files: ``vggnet export --format onnx`` / ``onnx-int8`` and reading them back.

Capturing the graph and ORT's static INT8 quantization live in :mod:`vggnet.capture.onnx` (the ``onnx`` runtimes
need them too), the ONNX Runtime session in :mod:`vggnet.infer.ort`; this module adds what only a kept file needs:
the ``quantization`` record of an INT8 file, the check of the result, and :func:`load_onnx`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from vggnet.capture.metadata import METADATA_KEY
from vggnet.capture.onnx import (
    INPUT,
    OUTPUT,
    export_onnx,
    metadata_props,
    needs_external_data,
    onnx_int8_scheme,
    quantize_onnx_static,
)
from vggnet.infer.ort import OnnxRuntime, ort_errors
from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG

from .common import ExportedModel, ExportError, _Checked, parse_metadata

__all__ = ["INPUT", "OUTPUT", "OnnxRuntime", "export_onnx", "export_onnx_int8", "load_onnx", "needs_external_data",
           "onnx_int8_scheme", "quantize_onnx_static"]

log = logging.getLogger(__name__)

_metadata_props = metadata_props  # the name tests and older callers import


def export_onnx_int8(model: VGG, prep: Preprocessing, out: str | os.PathLike, calib: torch.Tensor, *,
                     source: str | os.PathLike | None = None, opset: int | None = None,
                     calibration: dict[str, Any] | None = None, activation: str = "uint8") -> tuple[Path, int]:
    """Export ``model`` as fp32 ONNX to a temporary folder, quantize it statically on ``calib`` into ``out`` and
    record the quantization (scheme + ``calibration``, where the images came from) in its metadata. Returns the
    path and the fp32 file's size, for the size ratio a user wants to see.

    The scales and zero points are constants of the graph, so the result runs without the calibration images.
    """
    import onnx

    if needs_external_data(model):
        raise ExportError("onnx-int8: weights over 1.8 GB go to an external data file, which the INT8 export does "
                          "not handle; export fp32 ONNX and quantize it with onnxruntime.quantization")
    out = Path(out)
    quantization = {**onnx_int8_scheme(activation), "calibration": dict(calibration or {})}
    with tempfile.TemporaryDirectory(prefix="vggnet-onnx-int8-") as tmp:
        fp32 = export_onnx(model, prep, Path(tmp) / "model.onnx", source=source, opset=opset)
        fp32_bytes = fp32.stat().st_size
        quantize_onnx_static(fp32, out, calib, activation=activation,
                             metadata=metadata_props(model, prep, source, quantization))
    onnx.checker.check_model(str(out), full_check=True)
    return out, fp32_bytes


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> ExportedModel:
    """An ONNX file written by :func:`export_onnx` (or quantized from one), as an :class:`ExportedModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        runtime = OnnxRuntime(path, threads=threads)
    except ort_errors() as exc:  # ONNX Runtime's own exception types: an invalid protobuf or graph
        raise ExportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    prep, meta = parse_metadata(runtime.metadata.get(METADATA_KEY), path)
    return ExportedModel(path, "onnx", prep, _Checked("onnx", runtime, prep), meta)
