"""The mobile runtimes behind the runtime interface: ExecuTorch's Python runtime for ``.pte`` programs and LiteRT's
interpreter (``ai-edge-litert``) for ``.tflite`` files. Exported files of both formats
(``vggnet.export.load_exported``, ``vggnet predict``) run through them, each in its own runtime, as on a phone.

Both read the metadata document ``vggnet export`` stores inside the file (:mod:`vggnet.capture.metadata`): an
ExecuTorch constant method, a TFLite ``Model.metadata`` entry. A corrupt file or one of the other format fails in the
runtime's own loader, whose exception types :data:`EDGE_LOAD_ERRORS` names for the caller to turn into one line.

Both runtimes' native code writes to the process's stderr while loading: ExecuTorch its CPU probe (five
``[cpuinfo_utils.cpp]`` lines on a VM) and, for a bad file, the reason (``Program identifier 'TFL3' != expected
'ET12'``); LiteRT ``INFO: Created TensorFlow Lite XNNPACK delegate``. :func:`_native_stderr` takes those lines while
a file loads: the known noise is dropped, a reason goes into the error, anything else is written back to stderr.

ExecuTorch: a program is loaded from its path, never from bytes (a program loaded from a Python ``bytes`` object
that is freed later crashes the process on the next call). Its memory is planned for the largest batch it was
exported with (:attr:`ExecuTorchRuntime.max_batch`); a bigger batch runs in slices of that size.
LiteRT: a ``.tflite`` written at batch 1 is resized to each batch it is given (``resize_tensor_input``) when its graph
allows it (:attr:`LiteRTRuntime.resizable`; litert-torch bakes the batch of 1 into the ``fc`` and ``conv`` heads of a
VGG, whose files then run one image at a time); an INT8 file takes and returns int8 tensors, quantized and dequantized
here with the scales recorded in the file.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from vggnet.capture.quiet import quiet_logger

__all__ = ["EDGE_LOAD_ERRORS", "ET_METADATA_METHOD", "TFLITE_METADATA_NAME", "EdgeLoadError", "ExecuTorchRuntime",
           "LiteRTRuntime", "quiet_native", "tflite_metadata"]

ET_METADATA_METHOD = "vggnet_metadata"  # the constant method of a .pte that returns the metadata JSON
TFLITE_METADATA_NAME = "vggnet"  # the name of the Model.metadata entry of a .tflite holding the metadata JSON
# ExecuTorch raises RuntimeError ("Failed to load program, error: 0x:23"), LiteRT ValueError ("not a valid
# Flatbuffer buffer"); reading a damaged flatbuffer's metadata table can raise the others.
EDGE_LOAD_ERRORS = (RuntimeError, ValueError, OSError, IndexError, TypeError, UnicodeDecodeError, struct.error)
# What the runtimes' native code prints on every load, true and of no use to a user.
_NOISE = ("[cpuinfo_utils.cpp:", "INFO: Created TensorFlow Lite XNNPACK delegate",
          # litert-torch's converter, on import: its C++ log starting, and oneDNN's notice
          "WARNING: All log messages before absl::InitializeLog()", "oneDNN custom operations are on")
_SOURCE = re.compile(r"^\[[\w.]+:\d+\]\s*")  # ExecuTorch's "[program.cpp:168] " prefix
T = TypeVar("T")


class EdgeLoadError(RuntimeError):
    """A file the runtime refused, with the reason its native code printed."""


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """The lines written to stderr inside the block (the list is filled on exit): to file descriptor 2 by native
    code, and to ``sys.stderr``, where ExecuTorch's Python bindings send its log when ``sys.stderr`` is not fd 2."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    python = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python):
                yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace") + python.getvalue()
            lines.extend(line for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def quiet_native(said: list[str] | None = None) -> Iterator[None]:
    """Stderr of the mobile runtimes and converter inside the block: their known noise dropped, the rest (their
    source-file prefix cut) appended to ``said`` when given, for the caller to word an error with, else written
    back to stderr."""
    lines: list[str] = []
    try:
        with _native_stderr() as lines:
            yield
    finally:
        kept = [_SOURCE.sub("", line) for line in lines if not any(noise in line for noise in _NOISE)]
        if said is None:
            _echo(kept)
        else:
            said.extend(kept)


def _load_quietly(load: Callable[[], T]) -> T:
    """``load()`` inside :func:`quiet_native`: the runtime's reason for refusing a file goes into the
    :class:`EdgeLoadError` raised, anything else it printed back to stderr."""
    said: list[str] = []
    try:
        with quiet_native(said):
            result = load()
    except EDGE_LOAD_ERRORS as exc:
        reason = f" ({'; '.join(said)})" if said else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeLoadError(f"{first}{reason}") from exc
    except BaseException:
        _echo(said)
        raise
    _echo(said)
    return result


def _echo(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


class ExecuTorchRuntime:
    """A ``.pte`` program's ``forward`` method on ExecuTorch's CPU runtime (XNNPACK kernels for the delegated part).

    ``metadata`` is the text of the program's :data:`ET_METADATA_METHOD` constant method, None when it has none.
    Calls are serialised: one ``Method`` holds one set of planned buffers.
    """

    def __init__(self, path: str | os.PathLike, name: str = "executorch") -> None:
        self.name, self.path = name, Path(path)
        self.program, self.method, self.metadata = _load_quietly(self._load)
        self.max_batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any, str | None]:
        with quiet_logger("torch.utils._pytree"):  # torchao's import, through executorch's: a deprecation notice
            from executorch.runtime import Runtime as ETRuntime

        program = ETRuntime.get().load_program(self.path)  # a path: see the module docstring
        metadata = None
        if ET_METADATA_METHOD in program.method_names:
            (value,) = program.load_method(ET_METADATA_METHOD).execute([])
            metadata = value if isinstance(value, str) else None
        return program, program.load_method("forward"), metadata

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        with self._lock:
            outs = [self.method.execute([part.contiguous()])[0].clone() for part in x.split(self.max_batch)]
        return torch.cat(outs).float()


def tflite_metadata(path: str | os.PathLike, name: str = TFLITE_METADATA_NAME) -> str | None:
    """The text of the ``name`` entry of a ``.tflite`` file's ``Model.metadata`` (read through a memory map, so a
    large model is not copied), or None when it has none."""
    from ai_edge_litert.schema_py_generated import Model

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == name.encode():
                buffer = model.Buffers(entry.Buffer())
                if buffer.DataLength():
                    return bytes(buffer.DataAsNumpy()).decode()
                return data[buffer.Offset():buffer.Offset() + buffer.Size()].decode()  # stored after the flatbuffer
    return None


class LiteRTRuntime:
    """A ``.tflite`` model on LiteRT's interpreter (its XNNPACK delegate on the CPU), resized to each batch.

    ``threads`` defaults to ``torch.get_num_threads()``, as for ONNX Runtime, so the runtimes share a machine on
    equal terms. ``metadata`` is the text of the file's :data:`TFLITE_METADATA_NAME` metadata entry, or None.
    ``content`` (the model's bytes, for a model not yet written) replaces ``path``. ``resizable`` False runs a batch
    in slices of the file's own batch (:attr:`batch`) instead of resizing the input.
    """

    def __init__(self, path: str | os.PathLike | None = None, threads: int | None = None, name: str = "tflite", *,
                 content: bytes | None = None, resizable: bool = True) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.name, self.path, self.resizable = name, None if path is None else Path(path), resizable
        source = {"model_path": str(self.path)} if content is None else {"model_content": content}

        def load() -> tuple[Interpreter, str | None]:
            interpreter = Interpreter(**source, num_threads=threads or torch.get_num_threads())
            interpreter.allocate_tensors()  # where the XNNPACK delegate starts (and says so)
            # the metadata is read once the interpreter has verified the file
            return interpreter, None if self.path is None else tflite_metadata(self.path)

        self.interpreter, self.metadata = _load_quietly(load)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])
        self._shape: tuple[int, ...] | None = tuple(self.input["shape"])
        self._lock = threading.Lock()

    @staticmethod
    def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])

    @staticmethod
    def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
        scale, zero = detail["quantization"]
        return (y.astype(np.float32) - zero) * scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        if not self.resizable and len(x) != self.batch:
            return torch.cat([self._run(part.numpy()) for part in x.split(self.batch)])
        return self._run(x.numpy())

    def _run(self, x: np.ndarray) -> torch.Tensor:
        if self.input["dtype"] != np.float32:  # an INT8 file: int8 in, int8 out
            x = self._quantize(x, self.input)
        with self._lock:
            if self._shape != x.shape:
                self.interpreter.resize_tensor_input(self.input["index"], list(x.shape))
                self.interpreter.allocate_tensors()
                self._shape = x.shape
            self.interpreter.set_tensor(self.input["index"], x)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"])
        if self.output["dtype"] != np.float32:
            y = self._dequantize(y, self.output)
        return torch.from_numpy(np.array(y, dtype=np.float32))
