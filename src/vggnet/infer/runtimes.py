"""The CPU runtimes behind :class:`~vggnet.infer.Predictor`, each registered by name.

Every runtime maps a normalised float32 N×C×H×W batch to float32 logits, so they are interchangeable and
comparable against ``eager`` (the model as trained). What each one trades:

==================  ============================================================================================
``eager``           fp32, NCHW, the reference (in :mod:`vggnet.infer.predictor`)
``channels_last``   fp32, batch norm folded into the convs, NHWC memory: oneDNN's preferred conv layout
``bf16``            weights cast to bf16 once, NHWC, run under CPU bf16 autocast (native on AVX512-BF16/AMX)
``compile``         ``torch.compile`` (Inductor, weights frozen) of the BN-folded model, fp32
``compile-bf16``    the same with bf16 weights and activations: ``bf16`` plus Inductor's fusions
``int8``            static INT8 post-training quantization, torchao's PT2E flow with ``X86InductorQuantizer``:
                    per-channel weights, per-tensor activations calibrated on ``calib``, lowered by Inductor
``int8-dynamic``    INT8 weights and per-batch activation scales for the Linear (FC) layers only (torchao),
                    convolutions in fp32, compiled by Inductor; needs no calibration
``onnx``            the dynamo ONNX export run by ONNX Runtime, fp32
``onnx-int8``       the same ONNX model statically quantized by ONNX Runtime (QDQ, calibrated on ``calib``)
``openvino``        the ``torch.export`` graph converted to OpenVINO and run by its CPU plugin in its default
                    precision (bf16 on AVX512-BF16/AMX CPUs, else fp32; the runtime's ``precision`` says which)
``openvino-int8``   the same OpenVINO model quantized by NNCF (post-training, preset performance, on ``calib``)
``auto``            builds candidates, keeps those whose top-1 agrees with eager on ≥ 99 % of ``calib``, times
                    them on ``calib`` and runs the fastest (its ``report`` says what was measured)
==================  ============================================================================================

Optional dependencies (torchao, onnxruntime, onnx, openvino, nncf) are imported inside the factories, so
``import vggnet`` never pays for them and a missing one is a clear :class:`RuntimeUnavailable` naming the extra to
install.
Graph capture, PT2E quantization and the ONNX export these runtimes build on live in :mod:`vggnet.capture`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggnet.capture.graph import export_graph, fold_batchnorm
from vggnet.capture.pt2e import CALIB_CHUNK, quantize_static
from vggnet.capture.quiet import MissingDependency, import_optional, quiet_compiler_probe, quiet_lowering
from vggnet.errors import UsageError, VggnetError
from vggnet.models import VGG

from .predictor import RUNTIMES, EagerRuntime, Preprocessing, Runtime, make_runtime, register_runtime

__all__ = ["AUTO_CANDIDATES", "CALIB_CHUNK", "AutoRuntime", "RuntimeUnavailable", "TorchRuntime", "fold_batchnorm",
           "top1_agreement"]

log = logging.getLogger(__name__)

# What ``auto`` tries by default: everything. Building all of them for VGG-16 takes minutes (four Inductor
# compiles, an ONNX export and an ORT quantization, an OpenVINO conversion and an NNCF quantization); pass
# ``candidates=`` to try fewer. Candidates are built and timed in this order; OpenVINO's come last, so that its
# thread pool (TBB, idle between calls: see vggnet.infer.openvino) exists only once the PyTorch ones are timed.
AUTO_CANDIDATES = ("eager", "channels_last", "bf16", "compile", "compile-bf16", "int8", "int8-dynamic", "onnx",
                   "onnx-int8", "openvino", "openvino-int8")
# A backend failing to build on this machine (Inductor, the ONNX exporter, ONNX Runtime all raise RuntimeError
# subclasses; a half-installed extra raises ImportError): ``auto`` reports it and tries the next one.
_BUILD_ERRORS = (RuntimeError, ImportError, OSError)


class RuntimeUnavailable(VggnetError, RuntimeError):
    """A runtime that cannot be built here: an optional package is missing or the model does not fit it."""


def _require(module: str, extra: str, runtime: str) -> None:
    """Import an optional dependency or say which extra provides it."""
    try:
        import_optional(module, extra, f"runtime {runtime!r}")
    except MissingDependency as exc:
        raise RuntimeUnavailable(str(exc)) from exc


def _need_calib(calib: torch.Tensor | None, runtime: str) -> torch.Tensor:
    if calib is None or calib.dim() != 4 or len(calib) == 0:
        raise UsageError(f"runtime {runtime!r} needs a calibration batch (N×C×H×W preprocessed training images; "
                         "on the command line: --calib-data PATH)")
    return calib.float().contiguous()


class TorchRuntime:
    """A PyTorch module behind the runtime interface: input layout and dtype conversions, autocast, no grad.

    ``inference_mode`` is used for eager modules (cheapest). ``compiled`` modules run under ``no_grad`` and
    with Inductor's ``freezing`` switched on around each call (weights become constants: conv + BN folded,
    oneDNN weight prepacking, the int8 weight-prepack passes). Passing ``options={"freezing": True}`` to
    ``torch.compile`` instead is not enough in torch 2.14: the int8 graph then fails with
    "UnsupportedOperatorException: onednn.qconv_prepack"; and the global flag would leak into every other
    compile in the process. Compilation happens on the first call, so every call carries the patch.
    """

    def __init__(self, name: str, module: Callable[[torch.Tensor], torch.Tensor], *, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None,
                 compiled: bool = False) -> None:
        self.name, self.module = name, module
        self.channels_last, self.dtype, self.autocast, self.compiled = channels_last, dtype, autocast, compiled
        self._warm = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        grad = torch.no_grad() if self.compiled else torch.inference_mode()
        amp = (torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        frozen = _inductor_config().patch(freezing=True) if self.compiled else contextlib.nullcontext()
        quiet = quiet_lowering() if self.compiled else contextlib.nullcontext()
        with grad, amp, frozen, quiet, quiet_compiler_probe(self.compiled and not self._warm):
            out = self.module(x)
        self._warm = True
        return out.float()


def _inductor_config() -> Any:
    import torch._inductor.config

    return torch._inductor.config


def _channels_last(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, **_: Any) -> Runtime:
    module = fold_batchnorm(model).to(memory_format=torch.channels_last)
    return TorchRuntime("channels_last", module, channels_last=True)


def _bf16(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, **_: Any) -> Runtime:
    """Autocast alone re-casts every weight on every call (its cast cache is dropped when the context
    exits): for VGG-16 that is 138 M parameters per batch and made bf16 slower than fp32 here. So the
    weights are cast once, and autocast still guards the ops it keeps in fp32."""
    module = fold_batchnorm(model).to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    return TorchRuntime("bf16", module, channels_last=True, dtype=torch.bfloat16, autocast=torch.bfloat16)


def _example(prep: Preprocessing, calib: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Two inputs to capture a graph with: ``torch.export`` specialises a batch of one to a constant."""
    if calib is not None and calib.dim() == 4 and len(calib):
        example = calib[:2] if len(calib) >= 2 else calib.repeat(2, 1, 1, 1)
    else:
        example = torch.zeros(2, prep.in_channels, prep.image_size, prep.image_size)
    return example.to(dtype)


def _compile(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, *, dtype: str = "fp32",
             mode: str | None = None, **_: Any) -> Runtime:
    """Compiled lazily, on the first call (and once more, with a dynamic batch, on the first new batch size).
    Inductor's freezing picks the conv memory layout itself, so the input is left NCHW."""
    if dtype not in ("fp32", "bf16"):
        raise UsageError(f"compile: dtype must be 'fp32' or 'bf16', got {dtype!r}")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    module = fold_batchnorm(model).to(dtype=torch_dtype)
    compiled = torch.compile(export_graph(module, _example(prep, calib, torch_dtype)), mode=mode)
    return TorchRuntime("compile" if dtype == "fp32" else "compile-bf16", compiled, dtype=torch_dtype, compiled=True)


def _int8(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, **_: Any) -> Runtime:
    """torchao PT2E static quantization (:func:`vggnet.capture.pt2e.quantize_static`), lowered by Inductor, whose
    x86 passes fuse the quantize/dequantize pairs into oneDNN int8 conv/linear kernels."""
    calib = _need_calib(calib, "int8")
    _require("torchao.quantization", "quant", "int8")
    compiled = torch.compile(quantize_static(model, _example(prep, calib), calib))
    return TorchRuntime("int8", compiled, compiled=True)


def _int8_dynamic(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, **_: Any) -> Runtime:
    """torchao's int8 dynamic-activation / int8-weight config on the Linear layers. Its tensor subclasses
    are ~10× slower than fp32 in eager mode on CPU (measured), so the model is always compiled."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):  # before any import or copy: fails in ms
        raise RuntimeUnavailable(f"int8-dynamic quantizes Linear (FC) layers and this model's {model.config.head!r} "
                                 "head has none; use the int8 runtime")
    _require("torchao.quantization", "quant", "int8-dynamic")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    module = fold_batchnorm(model)
    quantize_(module, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, _fqn: isinstance(m, nn.Linear))
    compiled = torch.compile(export_graph(module, _example(prep, calib)))
    return TorchRuntime("int8-dynamic", compiled, compiled=True)


def _onnx(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, *, threads: int | None = None,
          **_: Any) -> Runtime:
    _require("onnxruntime", "export", "onnx")
    _require("onnxscript", "export", "onnx")
    from vggnet.capture.onnx import export_onnx

    from .ort import OnnxRuntime

    with tempfile.TemporaryDirectory(prefix="vggnet-onnx-") as tmp:
        path = export_onnx(model, prep, Path(tmp) / "model.onnx")
        return OnnxRuntime(path, threads=threads, name="onnx")


def _openvino(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, *, threads: int | None = None,
              **_: Any) -> Runtime:
    _require("openvino", "openvino", "openvino")
    from .openvino import OpenVINORuntime, compile_openvino, convert_openvino, quiet_build

    with quiet_build():
        return OpenVINORuntime(compile_openvino(convert_openvino(model, _example(prep, calib)), threads), "openvino")


def _openvino_int8(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, *,
                   threads: int | None = None, **_: Any) -> Runtime:
    calib = _need_calib(calib, "openvino-int8")
    _require("openvino", "openvino", "openvino-int8")
    from .openvino import OpenVINORuntime, compile_openvino, convert_openvino, quantize_openvino, quiet_build

    with quiet_build():  # importing NNCF logs torch's CUDA probe
        _require("nncf", "openvino", "openvino-int8")
        int8 = quantize_openvino(convert_openvino(model, _example(prep, calib)), calib)
        return OpenVINORuntime(compile_openvino(int8, threads), "openvino-int8")


def _onnx_int8(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, *, threads: int | None = None,
               activation: str = "uint8", **_: Any) -> Runtime:
    calib = _need_calib(calib, "onnx-int8")
    _require("onnxruntime", "export", "onnx-int8")
    _require("onnxscript", "export", "onnx-int8")
    from vggnet.capture.onnx import export_onnx, quantize_onnx_static

    from .ort import OnnxRuntime

    with tempfile.TemporaryDirectory(prefix="vggnet-onnx-") as tmp:
        fp32 = export_onnx(model, prep, Path(tmp) / "model.onnx")
        int8 = quantize_onnx_static(fp32, Path(tmp) / "model.int8.onnx", calib, activation=activation)
        return OnnxRuntime(int8, threads=threads, name="onnx-int8")


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows whose arg-max class is the same in two logit (or probability) batches."""
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def _run_chunked(runtime: Runtime, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([runtime(chunk) for chunk in x.split(CALIB_CHUNK)])


class AutoRuntime:
    """The fastest candidate that keeps top-1 agreement with eager ≥ ``min_agreement`` on the calibration batch.

    ``report`` lists every candidate: ``ok`` (built and accurate enough), ``agreement``, ``img_per_s`` (on a
    batch of ``timing_batch`` calibration images, best of ``repeats`` after a warm-up, so compile time is not
    counted) and ``error`` for the ones that could not be built. Eager is always a candidate, so something is
    always picked.
    """

    def __init__(self, chosen: Runtime, report: list[dict[str, Any]]) -> None:
        self.chosen, self.report = chosen, report
        self.name = f"auto:{chosen.name}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.chosen(x)

    def summary(self) -> str:
        """One line per candidate, the chosen one starred, for logs and the CLI's stderr."""
        return self.format_report(self.report, self.chosen.name)

    @staticmethod
    def format_report(report: list[dict[str, Any]], chosen: str | None) -> str:
        lines = []
        for r in report:
            mark = "*" if r["name"] == chosen else " "
            if r.get("error"):
                lines.append(f"{mark} {r['name']:<14} skipped: {r['error']}")
            else:
                lines.append(f"{mark} {r['name']:<14} {r['img_per_s']:9.1f} img/s  top-1 agreement "
                             f"{100 * r['agreement']:6.2f} %{'' if r['ok'] else '  (below the guard)'}")
        return "\n".join(lines)


def _auto(model: VGG, prep: Preprocessing, calib: torch.Tensor | None = None, *,
          candidates: Sequence[str] = AUTO_CANDIDATES, min_agreement: float = 0.99, timing_batch: int = 8,
          repeats: int = 2, **options: Any) -> Runtime:
    calib = _need_calib(calib, "auto")
    names = list(dict.fromkeys(["eager", *candidates]))
    unknown = [n for n in names if n == "auto" or n not in RUNTIMES]
    if unknown:
        raise UsageError(f"auto: unknown or recursive candidates {unknown}")
    timing = calib[:timing_batch]
    reference = _run_chunked(EagerRuntime(model), calib)
    report: list[dict[str, Any]] = []
    best: tuple[float, Runtime] | None = None  # only the fastest accurate runtime is kept alive (memory)
    for name in names:
        row: dict[str, Any] = {"name": name, "ok": False, "agreement": None, "img_per_s": None, "error": None}
        report.append(row)
        try:
            start = time.perf_counter()
            runtime = make_runtime(name, model, prep, calib, **options)
            row["agreement"] = top1_agreement(_run_chunked(runtime, calib), reference)  # also the warm-up
            row["build_s"] = time.perf_counter() - start
            runtime(timing)  # warm-up at the timing batch size (a compiled runtime may specialise on it)
            seconds = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                runtime(timing)
                seconds = min(seconds, time.perf_counter() - t0)
            row["img_per_s"] = len(timing) / seconds
            row["ok"] = row["agreement"] >= min_agreement
            if row["ok"] and (best is None or row["img_per_s"] > best[0]):
                best = (row["img_per_s"], runtime)
        except (RuntimeUnavailable, ValueError) as exc:
            row["error"] = str(exc)
        except _BUILD_ERRORS as exc:  # a backend failing to build on this machine must not break prediction
            row["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("auto: runtime %s failed to build", name)
    if best is None:  # eager agrees with itself, so only an eager failure gets here
        raise RuntimeError("auto: no runtime could be built:\n" + AutoRuntime.format_report(report, None))
    auto = AutoRuntime(best[1], report)
    log.info("auto picked %s\n%s", best[1].name, auto.summary())
    return auto


register_runtime("channels_last", _channels_last)
register_runtime("bf16", _bf16)
register_runtime("compile", _compile)
register_runtime("compile-bf16", functools.partial(_compile, dtype="bf16"))
register_runtime("int8", _int8)
register_runtime("int8-dynamic", _int8_dynamic)
register_runtime("onnx", _onnx)
register_runtime("onnx-int8", _onnx_int8)
register_runtime("openvino", _openvino)
register_runtime("openvino-int8", _openvino_int8)
register_runtime("auto", _auto)
