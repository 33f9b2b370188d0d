"""An ONNX Runtime CPU session behind the runtime interface: the ``onnx`` / ``onnx-int8`` runtimes and every
exported ONNX file (``vggnet.export.load_onnx``) run through it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["OnnxRuntime", "ort_errors"]


def ort_errors() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises for a file it cannot load (its pybind types derive from Exception directly)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:
        return (RuntimeError, OSError)
    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented",
             "RuntimeException")
    return (RuntimeError, OSError, *(getattr(state, n) for n in names if hasattr(state, n)))


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
