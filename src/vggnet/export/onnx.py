"""ONNX: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``), a dynamic batch dimension, metadata in
``metadata_props``, ``onnx.checker``; ONNX Runtime sessions and ORT static INT8 quantization (QDQ format).

The graph's input is ``input`` (``batch``×C×S×S, float32, normalised) and its output ``logits``
(``batch``×classes). Besides the ``vggnet`` JSON entry (see :mod:`vggnet.export.common`), ``mean``, ``std``,
``image_size``, ``test_scale`` (resize the shorter side to it, then centre-crop ``image_size``), ``in_channels``
and ``classes`` are stored as separate JSON-valued ``metadata_props`` so a
consumer in another language can read them without parsing the whole document. An INT8 file
(:func:`export_onnx_int8`) adds ``quantization`` (JSON: scheme, tool, calibration) to both.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG

from .common import METADATA_KEY, ExportedModel, ExportError, _Checked, example_input, export_metadata, parse_metadata

__all__ = ["OnnxRuntime", "export_onnx", "export_onnx_int8", "load_onnx", "needs_external_data",
           "quantize_onnx_static"]

INPUT, OUTPUT = "input", "logits"
# ONNX files are protobufs, limited to 2 GiB; above this many bytes of weights they go to a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


def _metadata_props(model: VGG, prep: Preprocessing, source: str | os.PathLike | None,
                    quantization: dict[str, Any] | None = None) -> dict[str, str]:
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


def export_onnx(model: VGG, prep: Preprocessing, out: str | os.PathLike, *, source: str | os.PathLike | None = None,
                opset: int | None = None) -> Path:
    """Write ``model`` as ONNX with a dynamic batch and the preprocessing in its metadata, then run
    ``onnx.checker`` (full check: types and shapes inferred). Returns the path written."""
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(model, (example_input(prep),), dynamo=True, input_names=[INPUT],
                                output_names=[OUTPUT], dynamic_shapes=({0: batch},), opset_version=opset,
                                verbose=False)
    if program is None:  # the dynamo exporter always returns a program; guards against a legacy fallback
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    program.model.metadata_props.update(_metadata_props(model, prep, source))
    program.save(str(out), external_data=needs_external_data(model))
    onnx.checker.check_model(str(out), full_check=True)
    return out


class OnnxRuntime:
    """An ONNX Runtime CPU session behind the runtime interface.

    ``threads`` defaults to ``torch.get_num_threads()`` so ORT and PyTorch runtimes are compared (and share
    a machine) on equal terms; ORT's own default is one thread per physical core.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, name: str = "onnx") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the QDQ model's informational messages are noise
        self.name, self.path = name, Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        (logits,) = self.session.run(None, {self.input: x.numpy()})
        return torch.from_numpy(logits).float()


class _CalibrationReader:
    """ORT's CalibrationDataReader protocol (``get_next`` → feed dict or None) over a tensor, in chunks."""

    def __init__(self, calib: torch.Tensor, chunk: int = 16) -> None:
        self.chunks = iter(calib.float().contiguous().split(chunk))

    def get_next(self) -> dict[str, Any] | None:
        chunk = next(self.chunks, None)
        return None if chunk is None else {INPUT: chunk.numpy()}


def quantize_onnx_static(fp32: str | os.PathLike, out: str | os.PathLike, calib: torch.Tensor, *,
                         activation: str = "uint8", per_channel: bool = True,
                         metadata: Mapping[str, str] | None = None) -> Path:
    """ORT static INT8 post-training quantization, QDQ format, MinMax calibration on ``calib``.

    Weights are signed int8 per output channel. Activations default to uint8 (U8S8): on x86 CPUs with
    AVX512-VNNI that is the fast integer path and has no saturation problem (``activation="int8"`` gives
    S8S8, ORT's general default). The model is first run through ORT's ``quant_pre_process`` (shape
    inference + graph optimisation), as ORT recommends. The ``vggnet`` metadata is carried over;
    ``metadata`` entries replace or add ``metadata_props`` (an INT8 export records its quantization).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activation not in ("uint8", "int8"):
        raise ValueError(f"activation must be 'uint8' or 'int8', got {activation!r}")
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


def export_onnx_int8(model: VGG, prep: Preprocessing, out: str | os.PathLike, calib: torch.Tensor, *,
                     source: str | os.PathLike | None = None, opset: int | None = None,
                     calibration: dict[str, Any] | None = None, activation: str = "uint8") -> tuple[Path, int]:
    """Export ``model`` as fp32 ONNX to a temporary folder, quantize it statically on ``calib`` (preprocessed
    training images) into ``out`` and record the quantization (scheme + ``calibration``, where the images came
    from) in its metadata. Returns the path and the fp32 file's size, for the size ratio a user wants to see.

    The result runs anywhere ONNX Runtime does without the calibration images: the scales and zero points are
    constants of the graph. ``onnx.checker`` runs on the result, as on every fp32 export.
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
                             metadata=_metadata_props(model, prep, source, quantization))
    onnx.checker.check_model(str(out), full_check=True)
    return out, fp32_bytes


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> ExportedModel:
    """An ONNX file written by :func:`export_onnx` (or quantized from one), as an :class:`ExportedModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        runtime = OnnxRuntime(path, threads=threads)
    except Exception as exc:  # onnxruntime raises its own exception types for invalid protobufs
        raise ExportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    prep, meta = parse_metadata(runtime.metadata.get(METADATA_KEY), path)
    return ExportedModel(path, "onnx", prep, _Checked("onnx", runtime, prep), meta)
