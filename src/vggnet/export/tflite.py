"""``.tflite``: a LiteRT model (LiteRT is TensorFlow Lite's current name; ``vggnet export --format tflite`` /
``tflite-int8``) converted by ``litert-torch``, no TensorFlow involved; read back by LiteRT's interpreter from
``ai-edge-litert`` (:class:`vggnet.infer.edge.LiteRTRuntime`).

Batch 1, resizable where the head allows: litert-torch 0.10 cannot convert a VGG with a dynamic batch (its lowering
fails on the head's flatten, and a graph without one runs only at the example batch), so the file is written for
batch 1 and the interpreter resizes its input to each batch before running it (``resize_tensor_input``). That works
for the ``gap`` head; the ``fc`` and ``conv`` heads come out with the batch of 1 baked into a reshape (resized, they
fail or return one row), so :func:`_resizes` tries it before the file is written — three images at once against the
same three one at a time — and records the answer in the metadata (``"litert": {"batch": 1, "resizable": ...}``);
a file that is not resizable runs one image at a time. Either way the check against eager runs it at batch 1, 3 and 8
before the file is kept.

INT8: torchao PT2E with litert-torch's ``PT2EQuantizer`` (:func:`vggnet.capture.pt2e.edge_quantizer`), calibrated on
a graph of dynamic batch (in chunks, as ``pt2-int8``), then converted at batch 1; the file's input and output are
int8 (the interpreter's ``get_input_details()["quantization"]`` gives the scale and zero point), which the runtime
handles.

The metadata document (:mod:`vggnet.capture.metadata`) is a ``Model.metadata`` entry named
:data:`~vggnet.infer.edge.TFLITE_METADATA_NAME` (``"vggnet"``), the flatbuffer's own place for such data: inside the
file, read with :func:`vggnet.infer.edge.tflite_metadata` (or any TFLite schema reader).

The converter is not in an extra: its ``litert-converter`` dependency pins a typing-extensions that clashes with the
project's, so ``make edge-convert`` installs it (see pyproject.toml); running a ``.tflite`` needs only the ``edge``
extra.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggnet.capture.graph import example_input
from vggnet.capture.metadata import export_metadata
from vggnet.capture.pt2e import edge_quantizer, edge_scheme, quantize_static
from vggnet.capture.quiet import quiet_torchao
from vggnet.infer.edge import EDGE_LOAD_ERRORS, TFLITE_METADATA_NAME, LiteRTRuntime, quiet_native
from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG

from .common import ExportedModel, ExportError, _Checked, parse_metadata

__all__ = ["CONVERTER_HINT", "export_tflite", "export_tflite_int8", "load_tflite"]

# What a missing converter's error tells the user to run (the Makefile's edge-convert target, spelled out).
CONVERTER_HINT = ("make edge-convert (pip install -c constraints.txt 'vggnet[edge,edge-convert]' && "
                  "pip install --no-deps litert-torch==0.10.0 litert-converter==0.5.0)")
# The converter's progress table (rich, on stdout) and the C++ runtime's informational log lines: off while
# converting, restored after (what its native code still prints on import goes through infer.edge.quiet_native).
_QUIET_ENV = {"LITERT_TORCH_SHOW_PROGRESS": "n", "TF_CPP_MIN_LOG_LEVEL": "2"}


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    try:
        with quiet_torchao(), quiet_native():
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _write(content: bytes, metadata: str, out: Path) -> Path:
    """The converter's flatbuffer with ``metadata`` added as the ``Model.metadata`` entry ``vggnet``, written to
    ``out`` (the object API re-packs the model: weights are copied once, not re-encoded)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata.encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = TFLITE_METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != TFLITE_METADATA_NAME.encode()] + [entry]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    return out


def _resizes(content: bytes, prep: Preprocessing) -> bool:
    """Whether the batch-1 model run on three images at once (its input resized) gives what it gives them one at a
    time: a self-comparison, so it holds for INT8 as for fp32."""
    x = example_input(prep, 3, seed=3)
    apart = LiteRTRuntime(content=content, threads=1, resizable=False)(x)
    try:
        together = LiteRTRuntime(content=content, threads=1)(x)
    except EDGE_LOAD_ERRORS:  # "XNNPack delegate failed to reshape runtimeNode"
        return False
    scale = float(apart.abs().max().clamp_min(1e-12))
    return together.shape == apart.shape and float((together - apart).abs().max()) <= 1e-4 * scale


def _metadata(model: VGG, prep: Preprocessing, source: str | os.PathLike | None, content: bytes,
              quantization: dict[str, Any] | None = None) -> str:
    """The metadata document, with how the file takes a batch (see the module docstring)."""
    document = json.loads(export_metadata(model, prep, source, quantization))
    document["litert"] = {"batch": 1, "resizable": _resizes(content, prep)}
    return json.dumps(document, sort_keys=True)


def export_tflite(model: VGG, prep: Preprocessing, out: str | os.PathLike, *,
                  source: str | os.PathLike | None = None) -> Path:
    """``model`` converted to an fp32 ``.tflite`` of batch 1 (resizable at run time where the head allows), written
    to ``out``."""
    with _quiet_converter():
        import litert_torch

        with torch.no_grad():
            content = litert_torch.convert(model.eval(), (example_input(prep, 1),)).model_content()
    return _write(content, _metadata(model, prep, source, content), Path(out))


def export_tflite_int8(model: VGG, prep: Preprocessing, out: str | os.PathLike, calib: torch.Tensor, *,
                       source: str | os.PathLike | None = None, calibration: dict[str, Any] | None = None) -> Path:
    """PT2E static INT8 for LiteRT, calibrated on ``calib``, converted to a ``.tflite`` of batch 1 with int8 input
    and output; the quantization (scheme and ``calibration``) goes into its metadata."""
    example = example_input(prep, 1)
    with _quiet_converter():
        import litert_torch
        from litert_torch.quantize.quant_config import QuantConfig

        quantizer = edge_quantizer("litert")
        with torch.no_grad():
            # unfolded weight quantize ops: the converter rejects folded int8 weights ("uniform_dequantize" operand)
            graph = quantize_static(model, example_input(prep), calib, quantizer, fold_quantize=False)
            graph.training = False  # captured in eval form; the converter warns about a module left training
            converted = litert_torch.convert(graph, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
            content = converted.model_content()
    quantization = {**edge_scheme("litert", "LiteRT"), "io": "int8 input and output (scale, zero point in the file)",
                    "calibration": dict(calibration or {})}
    return _write(content, _metadata(model, prep, source, content, quantization), Path(out))


def load_tflite(path: str | os.PathLike, threads: int | None = None) -> ExportedModel:
    """A ``.tflite`` written by :func:`export_tflite` (or its INT8 variant), as an :class:`ExportedModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LiteRT model not found: {path}")
    try:
        runtime = LiteRTRuntime(path, threads=threads)
    except EDGE_LOAD_ERRORS as exc:  # "The model is not a valid Flatbuffer buffer" for a damaged or foreign file
        raise ExportError(f"{path}: not a loadable LiteRT (.tflite) model: {exc}") from exc
    prep, meta = parse_metadata(runtime.metadata, path)
    # resized only when the export found it safe; a file without the record runs one image at a time
    runtime.resizable = bool((meta.get("litert") or {}).get("resizable", False))
    return ExportedModel(path, "tflite", prep, _Checked("tflite", runtime, prep), meta)
