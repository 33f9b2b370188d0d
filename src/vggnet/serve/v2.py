"""The Open Inference Protocol (KServe V2 / Triton HTTP) for a VGG classifier: request parsing, input
checks, response encoding — pure functions, no web framework, so they are tested on bytes.

Tensors. One input, ``input``, in either of two datatypes: FP32 ``[N, C, S, S]``, already normalised with the
model's mean/std (the model metadata carries them as ``parameters.preprocessing``), or UINT8 image pixels 0-255,
``[N, H, W, C]`` or ``[N, C, H, W]`` of any size, as Triton's image clients send them, which the server resizes,
crops and normalises exactly as ``POST /predict`` does an upload. The metadata's ``inputs`` names the FP32 form
(clients that read it keep working); ``parameters.accepted_inputs`` lists all three. Outputs: ``logits`` and
``probabilities``, FP32 ``[N, classes]``. Unnamed ``outputs`` returns both.

Conventions honoured (Triton's, which tritonclient relies on):

* request ``id`` is echoed;
* binary tensor extension: an input with ``parameters.binary_data_size`` is read from the bytes after the
  JSON header, whose length is the ``Inference-Header-Content-Length`` header; outputs requested with
  ``parameters.binary_data: true`` (or all outputs with request ``parameters.binary_data_output: true``)
  are returned the same way (little-endian, row-major);
* classification extension: an output requested with ``parameters.classification: k`` becomes BYTES
  ``[N, k]`` of ``"value:index:label"`` strings, best first;
* tensor ``data`` may be flat (row-major) or nested.

Every violation is a :class:`~vggnet.serve.errors.ServeError` with a 4xx status and a message that says
what was expected.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vggnet.infer import Preprocessing, preprocess

from .errors import ServeError, bad_request

__all__ = ["DATATYPES", "INPUT_NAME", "OUTPUT_NAMES", "InferRequest", "OutputSpec", "accepted_inputs",
           "encode_response", "input_tensor", "model_config", "model_metadata", "parse_request", "requested_outputs",
           "uint8_images", "uint8_layout"]

INPUT_NAME = "input"
#: V2 datatype of an input -> (bytes per value, little-endian numpy type of the binary tensor extension)
DATATYPES = {"FP32": (4, np.dtype("<f4")), "UINT8": (1, np.dtype("u1"))}
OUTPUT_NAMES = ("logits", "probabilities")
HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    """A parsed V2 request body: the JSON header and the binary part after it (possibly empty)."""

    header: dict[str, Any]
    binary: bytes = b""

    @property
    def id(self) -> str | None:
        value = self.header.get("id")
        return None if value is None else str(value)

    @property
    def parameters(self) -> dict[str, Any]:
        params = self.header.get("parameters") or {}
        return params if isinstance(params, dict) else {}


@dataclass
class OutputSpec:
    """One requested output: which tensor, binary or JSON, plain or top-k classification."""

    name: str
    binary: bool = False
    classification: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise bad_request("request JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Split the body into the JSON header and the binary tensor data (Triton's binary extension)."""
    if not body:
        raise bad_request("empty request body; expected a V2 inference request (JSON)")
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise bad_request(f"invalid Inference-Header-Content-Length {header_length!r}") from None
        if not 0 < length <= len(body):
            raise bad_request(f"Inference-Header-Content-Length {length} outside the body of {len(body)} bytes")
        body, binary = body[:length], body[length:]
    header = _parse_json(body)
    if not isinstance(header, dict):
        raise bad_request("the inference request must be a JSON object with an 'inputs' list")
    return InferRequest(header, binary)


def _expected_shape(prep: Preprocessing) -> tuple[int, int, int]:
    return prep.in_channels, prep.image_size, prep.image_size


def _input_spec(request: InferRequest) -> dict[str, Any]:
    """The one input object of the request, with its name checked."""
    inputs = request.header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request(f"'inputs' must be a non-empty list; this model takes one input named {INPUT_NAME!r}")
    if len(inputs) != 1:
        raise bad_request(f"{len(inputs)} inputs; this model takes exactly one, named {INPUT_NAME!r}")
    spec = inputs[0]
    if not isinstance(spec, dict):
        raise bad_request("each input must be a JSON object with name, datatype, shape and data")
    name = spec.get("name")
    if name != INPUT_NAME:
        raise bad_request(f"unknown input {name!r}; this model's input is {INPUT_NAME!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise bad_request(f"input shape must be a list of integers, got {shape!r}")
    return spec


def _values(spec: dict[str, Any], request: InferRequest, count: int, datatype: str) -> np.ndarray:
    """The input's ``count`` values, flat, from its binary part or its JSON ``data``, as ``datatype``'s numpy
    type; JSON UINT8 data must be integers 0-255 (a float or a wider integer would be cut silently)."""
    size_of, dtype = DATATYPES[datatype]
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request("input parameters must be a JSON object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != count * size_of or size != len(request.binary):
            raise bad_request(f"binary input of {size!r} bytes declared, {len(request.binary)} sent; shape "
                              f"{spec['shape']} in {datatype} needs {count * size_of}")
        if "data" in spec:
            raise bad_request("an input has both 'data' and binary_data_size")
        return np.frombuffer(request.binary, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)
    if request.binary:
        raise bad_request("binary data after the JSON header but no input declares binary_data_size")
    data = spec.get("data")
    if not isinstance(data, list):
        raise bad_request("input 'data' must be a list of numbers (row-major, flat or nested)")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise bad_request(f"input 'data' is not a regular array: {exc}") from None
    if array.dtype.kind not in "iuf" or array.size != count:
        kind = "numbers" if array.dtype.kind in "iuf" else f"values of type {array.dtype}"
        raise bad_request(f"input 'data' holds {array.size} {kind}; shape {spec['shape']} needs {count} numbers")
    if datatype == "UINT8" and (array.dtype.kind == "f" or (array.size and (array.min() < 0 or array.max() > 255))):
        raise bad_request("UINT8 input 'data' must be integers from 0 to 255 (image pixels)")
    return array.astype(dtype.newbyteorder("=")).reshape(-1)


def _batch_size(n: int, max_batch_size: int) -> None:
    if not 1 <= n <= max_batch_size:
        raise bad_request(f"batch of {n}; this model takes 1 to {max_batch_size} images per request")


def input_tensor(request: InferRequest, prep: Preprocessing, max_batch_size: int,
                 max_pixels: int = 36_000_000) -> torch.Tensor:
    """The checked, normalised input batch [N, C, S, S], 1 <= N <= ``max_batch_size``: an FP32 ``input`` of that
    shape, every value finite, as it is; or a UINT8 one of pixels (:func:`uint8_images`), preprocessed here as
    ``POST /predict`` preprocesses a decoded upload. Binary data must be exactly the shape's bytes."""
    spec = _input_spec(request)
    datatype, shape = spec.get("datatype"), spec["shape"]
    if datatype == "UINT8":
        return uint8_images(spec, request, prep, max_batch_size, max_pixels)
    if datatype != "FP32":
        raise bad_request(f"input datatype {datatype!r}; expected 'FP32' (normalised [N, C, S, S]) or 'UINT8' "
                          "(image pixels, N×H×W×C or N×C×H×W)")
    c, s, _ = _expected_shape(prep)
    if len(shape) != 4 or tuple(shape[1:]) != (c, s, s):
        raise bad_request(f"input shape {shape}; expected [N, {c}, {s}, {s}] (N images, normalised)")
    n = shape[0]
    _batch_size(n, max_batch_size)
    array = _values(spec, request, n * c * s * s, "FP32")
    if not np.isfinite(array).all():
        raise bad_request("input contains NaN or infinite values")
    return torch.from_numpy(array.reshape(n, c, s, s))


def uint8_layout(shape: list[int], channels: int) -> str:
    """``"NHWC"`` or ``"NCHW"`` for a UINT8 image batch: the layout whose channel axis holds ``channels``; NHWC
    (the layout of decoded images, and of Triton's image clients by default) when both could."""
    if len(shape) == 4 and shape[3] == channels:
        return "NHWC"
    if len(shape) == 4 and shape[1] == channels:
        return "NCHW"
    raise bad_request(f"UINT8 input shape {shape}; expected images as [N, H, W, {channels}] or [N, {channels}, H, W]")


def uint8_images(spec: dict[str, Any], request: InferRequest, prep: Preprocessing, max_batch_size: int,
                 max_pixels: int) -> torch.Tensor:
    """A UINT8 batch of N images of any one size, pixels 0-255 as Triton's image clients send them, resized,
    centre-cropped and normalised by the model's own preprocessing (:func:`vggnet.infer.preprocess`, which
    ``POST /predict`` runs on a decoded upload: the same pixels give the same input). Each image's pixels are
    capped as an upload's are (413)."""
    shape = spec["shape"]
    layout = uint8_layout(shape, prep.in_channels)
    n, (h, w) = shape[0], ((shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3]))
    _batch_size(n, max_batch_size)
    if h < 1 or w < 1:
        raise bad_request(f"UINT8 input shape {shape}: images of {h}×{w} pixels")
    if h * w > max_pixels:
        raise ServeError(413, f"image of {w}×{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} pixels")
    pixels = torch.from_numpy(_values(spec, request, n * h * w * prep.in_channels, "UINT8").reshape(shape))
    chw = pixels.permute(0, 3, 1, 2) if layout == "NHWC" else pixels
    return preprocess(list(chw.contiguous()), prep)


def requested_outputs(request: InferRequest, prep: Preprocessing) -> list[OutputSpec]:
    """The outputs to return, checked before the request is queued. No ``outputs``: all of them, binary if
    the request parameter ``binary_data_output`` is true (what tritonclient sends by default)."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    outputs = request.header.get("outputs")
    if outputs is None:
        return [OutputSpec(name, binary_default) for name in OUTPUT_NAMES]
    if not isinstance(outputs, list) or not outputs:
        raise bad_request(f"'outputs' must be a non-empty list of objects naming one of {', '.join(OUTPUT_NAMES)}")
    specs = []
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") not in OUTPUT_NAMES:
            name = out.get("name") if isinstance(out, dict) else out
            raise bad_request(f"unknown output {name!r}; this model's outputs are {', '.join(OUTPUT_NAMES)}")
        params = out.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad_request("output parameters must be a JSON object")
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise bad_request(f"classification must be a non-negative integer, got {k!r}")
        specs.append(OutputSpec(out["name"], bool(params.get("binary_data", binary_default)),
                                min(k, prep.num_classes)))
    if len({s.name for s in specs}) != len(specs):
        raise bad_request("an output is requested twice")
    return specs


def _classification(values: torch.Tensor, k: int, prep: Preprocessing) -> list[list[str]]:
    top_v, top_i = values.topk(k, dim=1)
    return [[f"{float(v):f}:{int(i)}:{prep.label(int(i))}" for v, i in zip(vs, ids, strict=True)]
            for vs, ids in zip(top_v, top_i, strict=True)]


def _serialize_bytes(strings: list[list[str]]) -> bytes:
    """Triton's BYTES wire format: each element a 4-byte little-endian length, then the bytes."""
    out = bytearray()
    for row in strings:
        for s in row:
            b = s.encode()
            out += struct.pack("<I", len(b)) + b
    return bytes(out)


def encode_response(logits: torch.Tensor, outputs: list[OutputSpec], prep: Preprocessing, *, model_name: str,
                    model_version: str, request_id: str | None,
                    parameters: Mapping[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: plain JSON, or JSON + binary tensors with
    ``Inference-Header-Content-Length`` when any output is binary."""
    logits = logits.float()
    tensors = {"logits": logits, "probabilities": logits.softmax(1)}
    entries, blobs = [], []
    for spec in outputs:
        values = tensors[spec.name]
        entry: dict[str, Any] = {"name": spec.name}
        if spec.classification:
            rows = _classification(values, spec.classification, prep)
            entry.update(datatype="BYTES", shape=[len(rows), spec.classification])
            if spec.binary:
                blob = _serialize_bytes(rows)
            else:
                entry["data"] = [s for row in rows for s in row]
        else:
            entry.update(datatype="FP32", shape=list(values.shape))
            array = values.contiguous().numpy()
            if spec.binary:
                blob = array.astype("<f4", copy=False).tobytes()
            else:
                entry["data"] = array.reshape(-1).tolist()
        if spec.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        response["id"] = request_id
    if parameters:
        response["parameters"] = dict(parameters)
    header = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}


def model_metadata(name: str, versions: list[str], prep: Preprocessing, *, platform: str = "pytorch",
                   parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The V2 model metadata object; ``-1`` marks the batch dimension. ``parameters.preprocessing`` tells a
    client how to build ``input`` from an image (mean, std, image_size, classes); ``parameters.accepted_inputs``
    lists every accepted form of ``input`` (:func:`accepted_inputs`)."""
    c, s, _ = _expected_shape(prep)
    meta: dict[str, Any] = {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, c, s, s]}],
        "outputs": [{"name": out, "datatype": "FP32", "shape": [-1, prep.num_classes]} for out in OUTPUT_NAMES],
    }
    params = {"preprocessing": prep.to_dict(), "accepted_inputs": accepted_inputs(prep), **(parameters or {})}
    meta["parameters"] = params
    return meta


def accepted_inputs(prep: Preprocessing) -> list[dict[str, Any]]:
    """Every form ``input`` may take, for the metadata: the FP32 tensor the standard ``inputs`` entry describes,
    and UINT8 pixels in either layout (``-1``: any size), preprocessed by the server."""
    c, s, _ = _expected_shape(prep)
    pixels = (f"image pixels 0-255, any size: resized to {prep.test_scale} on the shorter side, centre-cropped to "
              f"{s}x{s} and normalised by the server, as POST /predict does an upload")
    return [
        {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, c, s, s], "layout": "NCHW",
         "values": "normalised: (pixel / 255 - mean) / std, resized and cropped by the client"},
        {"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, -1, -1, c], "layout": "NHWC", "values": pixels},
        {"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, c, -1, -1], "layout": "NCHW", "values": pixels},
    ]


def model_config(name: str, prep: Preprocessing, *, max_batch_size: int, max_delay_ms: float, batching: bool,
                 platform: str = "pytorch") -> dict[str, Any]:
    """Triton's model configuration (``GET .../config``), in its JSON form: with ``max_batch_size`` > 0
    the ``dims`` leave out the batch dimension, as Triton's do."""
    c, s, _ = _expected_shape(prep)
    config: dict[str, Any] = {
        "name": name,
        "platform": platform,
        "max_batch_size": max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": [c, s, s]}],
        "output": [{"name": out, "data_type": "TYPE_FP32", "dims": [prep.num_classes]} for out in OUTPUT_NAMES],
    }
    if batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": int(math.floor(max_delay_ms * 1000))}
    return config


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def check_json_media(media: str, header_length: str | None) -> None:
    """V2 bodies are JSON, or JSON + binary (octet-stream) with the header-length header."""
    if media in ("", "application/json"):
        return
    if media == "application/octet-stream" and header_length is not None:
        return
    raise ServeError(415, f"content type {media!r} not accepted; send application/json (or "
                          "application/octet-stream with Inference-Header-Content-Length for binary tensors)")
