"""ONNX: the dynamo exporter with the dynamic batch and the metadata in ``metadata_props``, and ONNX Runtime's
static INT8 quantization (QDQ). Here, below ``vggnet.infer`` and ``vggnet.export``, because both need them: the
``onnx`` / ``onnx-int8`` runtimes build a file in a temporary folder, ``vggnet export`` keeps it.

The graph's input is ``input`` (``batch``×C×S×S, float32, normalised) and its output ``logits``. Besides the
``vggnet`` document (:mod:`vggnet.capture.metadata`), ``mean``, ``std``, ``image_size``, ``test_scale``,
``in_channels`` and ``classes`` are separate JSON-valued ``metadata_props``, so a consumer in another language reads
them without parsing the whole document; an INT8 file adds ``quantization``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vggnet.errors import UsageError
from vggnet.models import VGG

from .graph import dynamic_batch, example_input
from .metadata import METADATA_KEY, export_metadata
from .pt2e import CALIB_CHUNK

__all__ = ["INPUT", "OUTPUT", "export_onnx", "metadata_props", "needs_external_data", "onnx_int8_scheme",
           "quantize_onnx_static"]

INPUT, OUTPUT = "input", "logits"
# ONNX files are protobufs, limited to 2 GiB; above this many bytes of weights they go to a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


def metadata_props(model: VGG, prep: Any, source: str | os.PathLike | None,
                   quantization: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported file; ``prep`` is a :class:`vggnet.infer.Preprocessing`."""
    flat = prep.to_dict()
    props = {METADATA_KEY: export_metadata(model, prep, source, quantization)}
    props.update({k: json.dumps(flat[k]) for k in ("mean", "std", "image_size", "test_scale", "in_channels",
                                                      "classes")})
    if quantization is not None:
        props["quantization"] = json.dumps(quantization, sort_keys=True)
    return props


def needs_external_data(model: VGG) -> bool:
    """Whether the weights are too large for one protobuf and go to a ``.data`` side file."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) > _EXTERNAL_DATA_BYTES


def export_onnx(model: VGG, prep: Any, out: str | os.PathLike, *, source: str | os.PathLike | None = None,
                opset: int | None = None) -> Path:
    """Write ``model`` as ONNX with a dynamic batch and the preprocessing in its metadata, then run
    ``onnx.checker`` (full check: types and shapes inferred). Returns the path written."""
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    program = torch.onnx.export(model, (example_input(prep),), dynamo=True, input_names=[INPUT],
                                output_names=[OUTPUT], dynamic_shapes=dynamic_batch(), opset_version=opset,
                                verbose=False)
    if program is None:  # the dynamo exporter always returns a program; guards against a legacy fallback
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    program.model.metadata_props.update(metadata_props(model, prep, source))
    program.save(str(out), external_data=needs_external_data(model))
    onnx.checker.check_model(str(out), full_check=True)
    return out


class _CalibrationReader:
    """ORT's CalibrationDataReader protocol (``get_next`` → feed dict or None) over a tensor, in chunks."""

    def __init__(self, calib: torch.Tensor, chunk: int = CALIB_CHUNK) -> None:
        self.chunks = iter(calib.float().contiguous().split(chunk))

    def get_next(self) -> dict[str, Any] | None:
        chunk = next(self.chunks, None)
        return None if chunk is None else {INPUT: chunk.numpy()}


def quantize_onnx_static(fp32: str | os.PathLike, out: str | os.PathLike, calib: torch.Tensor, *,
                         activation: str = "uint8", per_channel: bool = True,
                         metadata: Mapping[str, str] | None = None) -> Path:
    """ORT static INT8 post-training quantization, QDQ format, MinMax calibration on ``calib``.

    Weights are int8 per output channel; activations default to uint8 (U8S8), the fast integer path on x86 with
    AVX512-VNNI (``activation="int8"``: S8S8). The model first goes through ORT's ``quant_pre_process``, as ORT
    recommends. The ``vggnet`` metadata is carried over; ``metadata`` entries replace or add ``metadata_props``.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activation not in ("uint8", "int8"):
        raise UsageError(f"activation must be 'uint8' or 'int8', got {activation!r}")
    fp32, out = Path(fp32), Path(out)
    pre = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out), _CalibrationReader(calib), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel,
                        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8)
    finally:
        pre.unlink(missing_ok=True)
    source = onnx.load(str(fp32), load_external_data=False)
    quantized = onnx.load(str(out))
    kept = {p.key for p in quantized.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in kept:
            quantized.metadata_props.add(key=prop.key, value=prop.value)
    if metadata:
        props = {p.key: p.value for p in quantized.metadata_props}
        props.update(metadata)
        del quantized.metadata_props[:]
        for key, value in props.items():
            quantized.metadata_props.add(key=key, value=value)
    onnx.save(quantized, str(out))
    return out


def onnx_int8_scheme(activation: str = "uint8") -> dict[str, Any]:
    """How :func:`quantize_onnx_static` quantizes, as recorded in an INT8 file's ``quantization`` entry."""
    import onnxruntime

    return {"dtype": "int8", "method": "static post-training", "format": "QDQ",
            "tool": f"onnxruntime {onnxruntime.__version__}", "calibration_method": "MinMax",
            "weights": "int8, symmetric, per output channel",
            "activations": f"{activation}, {'asymmetric' if activation == 'uint8' else 'symmetric'}, per tensor"}
