"""OpenVINO's CPU plugin behind the runtime interface: the ``openvino`` and ``openvino-int8`` runtimes.

The model is captured by ``torch.export`` (batch norm folded, the batch dimension dynamic: :mod:`vggnet.capture.graph`,
as every other graph runtime) and converted by ``openvino.convert_model``; its channels and image size are then fixed
so that only the batch is left free. It is compiled for ``"CPU"`` with the latency hint (one stream: one batch at a
time, as ``Predictor`` runs them) and ``torch.get_num_threads()`` threads, so it shares a machine with PyTorch runtimes
on the same terms as :class:`~vggnet.infer.ort.OnnxRuntime`.

``openvino`` runs in OpenVINO's default CPU inference precision, what an OpenVINO user gets: bf16 on CPUs with
AVX512-BF16 or AMX, fp32 elsewhere. :attr:`OpenVINORuntime.precision` says which one it actually ran in (read back
from the compiled model), so a benchmark can name it. ``openvino-int8`` is NNCF post-training quantization (full
bias correction, preset ``performance``: symmetric int8 activations and weights) of the converted model, calibrated
on ``calib``.

Sharing the process with PyTorch: compiling creates OpenVINO's TBB worker threads (9 here, beside torch's 2 OpenMP
ones); they stay idle between calls and did not slow PyTorch down in the measurement made for this runtime (2-core
VM, width-1/4 VGG-16 at 224 px, eager batch 8, ``OMP_WAIT_POLICY=PASSIVE``, the machine shared with a training run):
10 eager batches took 2.16-2.60 s of CPU before and 2.31-2.53 s after an ``openvino`` runtime had been built and run
(with and without ``ENABLE_CPU_PINNING=False``; 6.64 s and 6.22 s with OpenMP's default spinning wait policy),
the OpenVINO threads used 0 ticks meanwhile, and the calling
thread's CPU affinity was unchanged; the wall-clock times moved with the machine's other load, in both directions,
with or without OpenVINO. A drop of eager VGG-16 from 428 to 149 img/s seen earlier in a benchmark that had run
OpenVINO, ExecuTorch and LiteRT in one process was not reproduced with OpenVINO alone. ``auto`` still times the
OpenVINO candidates last (:data:`~vggnet.infer.runtimes.AUTO_CANDIDATES`).

NNCF writes to stdout while it quantizes: a rich progress bar ("Statistics collection") and its log's warnings; both
are held back for the build (:func:`quiet_build`), as is torch's "No CUDA runtime" line that importing NNCF logs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vggnet.capture.graph import export_program, fold_batchnorm
from vggnet.capture.quiet import quiet_logger
from vggnet.models import VGG

__all__ = ["OpenVINOBuildError", "OpenVINORuntime", "compile_openvino", "convert_openvino", "quantize_openvino",
           "quiet_build"]

# OpenVINO's element type names, as the runtime names its precision (and the benchmarks print it)
_PRECISIONS = {"bf16": "bf16", "f32": "fp32", "f16": "fp16"}


class OpenVINOBuildError(RuntimeError):
    """OpenVINO could not convert or compile the model. Its frontend's failures (``OpConversionFailure``,
    ``GeneralFailure``...) derive from ``Exception`` directly; re-raised as a ``RuntimeError``, they are a build
    failure that ``auto`` reports and steps past, as it does for the other backends'."""


@contextlib.contextmanager
def _build_errors(what: str) -> Iterator[None]:
    import openvino.frontend as frontend

    failures = tuple(getattr(frontend, n) for n in ("OpConversionFailure", "GeneralFailure", "InitializationFailure",
                                                    "NotImplementedFailure", "OpValidationFailure")
                     if isinstance(getattr(frontend, n, None), type))
    try:
        yield
    except failures as exc:
        raise OpenVINOBuildError(f"OpenVINO could not {what} the model: {exc}") from exc


@contextlib.contextmanager
def quiet_build() -> Iterator[None]:
    """NNCF's progress bar and log lines (stdout) and torch's CUDA probe line, for the build only.

    The progress bar goes to rich's console, which writes to whatever ``sys.stdout`` is at the time, so stdout is
    redirected for the block: a ``print`` from another thread during a build would be lost too (logging handlers
    keep the stream they were made with and are not affected)."""
    with quiet_logger("nncf"), quiet_logger("torch.utils.cpp_extension"), contextlib.redirect_stdout(io.StringIO()):
        yield


@functools.cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def convert_openvino(model: VGG, example: torch.Tensor) -> Any:
    """``model`` (batch norm folded) as an ``openvino.Model`` whose batch dimension is dynamic.

    Converted from a ``torch.export`` program rather than the module (which OpenVINO would ``jit.trace``: deprecated,
    and a second capture path). The program leaves the image size symbolic too; fixing everything but the batch lets
    the CPU plugin plan its convolutions for the one image size the model takes."""
    import openvino as ov

    with torch.no_grad():
        program = export_program(fold_batchnorm(model), example)
    with _build_errors("convert"):
        ov_model = ov.convert_model(program)
        ov_model.reshape([-1, *example.shape[1:]])
    return ov_model


def quantize_openvino(ov_model: Any, calib: torch.Tensor) -> Any:
    """NNCF post-training quantization of ``ov_model``: statistics from every image of ``calib``, one at a time
    (NNCF's ``subset_size`` counts dataset items, and its statistics assume a batch of one).

    Full bias correction (``fast_bias_correction=False``) rather than NNCF's default fast one: on the CIFAR-10
    VGG-16-BN GAP net of ``benchmarks/phone.py`` (512 calibration images, 2,000 validation images, 2026-12-07) the
    default agreed with fp32 on 98.15 % of validation images and 97.66 % of the calibration ones, so ``auto`` (which
    keeps a candidate at >= 99 %) dropped it; full bias correction gave 99.30 % / 99.02 % at the same speed (2,965 vs
    3,029 img/s at batch 256, one measurement). The ``mixed`` preset (98.25 / 97.27 %) and SmoothQuant did not help."""
    import nncf

    dataset = nncf.Dataset(list(calib.split(1)), lambda image: image.numpy())
    return nncf.quantize(ov_model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(calib),
                         fast_bias_correction=False)


def compile_openvino(ov_model: Any, threads: int | None = None) -> Any:
    """``ov_model`` compiled for the CPU: latency hint, ``threads`` (default: torch's) inference threads."""
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    with _build_errors("compile"):
        return _core().compile_model(ov_model, "CPU", config)


class OpenVINORuntime:
    """A compiled OpenVINO model behind the runtime interface.

    An infer request holds its input and output buffers, so each thread that calls the runtime gets its own
    (``vggnet serve`` may run batches of one model from more than one thread); the output is copied out of it.
    """

    def __init__(self, compiled: Any, name: str = "openvino") -> None:
        self.name, self.compiled = name, compiled
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        #: the precision the CPU plugin runs the layers it does not quantize in: "bf16" or "fp32" (or "fp16")
        self.precision: str = _PRECISIONS.get(hint, hint)
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        request = self._request()
        request.infer({0: x.numpy()}, share_inputs=True)
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))
