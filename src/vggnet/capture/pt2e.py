"""INT8 through torchao's PT2E flow for x86 Inductor, the one place vggnet calls it: static post-training
quantization (the ``int8`` runtime, ``vggnet export --format pt2-int8``) and its quantization-aware variant
(``vggnet compress qat``).

Both use ``X86InductorQuantizer``'s default scheme (weights int8 symmetric per output channel, activations uint8
affine per tensor), so Inductor lowers either result to the same oneDNN INT8 kernels. Calibration runs in chunks
of :data:`CALIB_CHUNK`: 256 VGG-16 inputs at 224² would need ~3 GB for the first block's activations alone.

The mobile formats use the same flow with their backend's quantizer (:func:`quantize_static`'s ``quantizer``):
``XNNPACKQuantizer`` for ExecuTorch's ``.pte`` and litert-torch's ``PT2EQuantizer`` for LiteRT's ``.tflite``, both
int8 symmetric per channel (weights) and int8 per tensor (activations), from :func:`edge_quantizer`. LiteRT's converter
reads the converted graph's q/dq pairs only unfolded (``fold_quantize=False``); it re-captures the graph at batch 1
itself, so LiteRT's is calibrated with the usual dynamic batch.

QAT: an exported graph ignores ``.train()``/``.eval()`` (a prepared one refuses them), so dropout and batch norm
are switched with torchao's graph rewrites (:func:`set_qat_mode`), and observers only learn ranges while training
or calibrating, never from the images a graph is evaluated on.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from vggnet.errors import VggnetError
from vggnet.models import VGG

from .graph import export_graph, export_program, fold_batchnorm
from .quiet import import_optional, quiet_torchao

__all__ = ["CALIB_CHUNK", "EDGE_QUANTIZERS", "CaptureError", "calibrate_qat", "convert_qat", "edge_quantizer",
           "edge_scheme", "export_for_qat", "load_torchao", "pt2e_scheme", "prepare_qat", "quantize_static",
           "set_qat_mode"]

log = logging.getLogger(__name__)

CALIB_CHUNK = 16
_TRAINING = "_vggnet_qat_training"  # attribute: the form (training or eval) a prepared graph is in
_DYNAMIC = "dynamic"  # quantize_static's default capture: graph.dynamic_batch()
# The backends' quantizers for the mobile formats: (module, quantizer class, the extra or command that installs it).
EDGE_QUANTIZERS = {
    "xnnpack": ("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "XNNPACKQuantizer", "edge"),
    "litert": ("litert_torch.quantize.pt2e_quantizer", "PT2EQuantizer", "edge-convert"),
}


class CaptureError(VggnetError, ValueError):
    """A model ``torch.export`` cannot capture (a head with data-dependent control flow)."""


def load_torchao(what: str = "INT8 quantization") -> tuple[Any, Any, Any]:
    """torchao's PT2E modules (``pt2e``, ``quantize_pt2e``, ``x86_inductor_quantizer``), or a
    :class:`~vggnet.capture.quiet.MissingDependency` saying that ``what`` needs the ``quant`` extra."""
    with quiet_torchao():
        import_optional("torchao.quantization", "quant", what)
        from torchao.quantization import pt2e
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    return pt2e, quantize_pt2e, xiq


def _x86_quantizer(xiq: Any, is_qat: bool) -> Any:
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat))
    return quantizer


def pt2e_scheme() -> dict[str, Any]:
    """How :func:`quantize_static` quantizes, as a ``pt2-int8`` file records it (without its calibration)."""
    import torchao

    return {"dtype": "int8", "method": "static post-training", "format": "AOTInductor",
            "tool": f"torchao {torchao.__version__} PT2E, X86InductorQuantizer",
            "calibration_method": "histogram (activations), min-max (weights)",
            "weights": "int8, symmetric, per output channel", "activations": "uint8, asymmetric, per tensor"}


def edge_quantizer(backend: str) -> Any:
    """A fresh PT2E quantizer for a mobile backend (``"xnnpack"``: ExecuTorch; ``"litert"``: LiteRT), set to int8
    symmetric per-channel weights and per-tensor activations; a :class:`MissingDependency` when the backend's package
    is not installed."""
    if backend not in EDGE_QUANTIZERS:
        raise ValueError(f"unknown edge quantizer {backend!r}; choose from {', '.join(EDGE_QUANTIZERS)}")
    module_name, cls, extra = EDGE_QUANTIZERS[backend]
    with quiet_torchao():
        module = import_optional(module_name, extra, f"{backend} INT8 quantization")
    return getattr(module, cls)().set_global(module.get_symmetric_quantization_config(is_per_channel=True))


def edge_scheme(backend: str, fmt: str) -> dict[str, Any]:
    """How :func:`edge_quantizer`'s quantizer quantizes, as an ``executorch-int8`` / ``tflite-int8`` file records it
    (without its calibration)."""
    import torchao

    _, cls, _ = EDGE_QUANTIZERS[backend]
    return {"dtype": "int8", "method": "static post-training", "format": fmt,
            "tool": f"torchao {torchao.__version__} PT2E, {cls}",
            "calibration_method": "histogram (activations), min-max (weights)",
            "weights": "int8, symmetric, per output channel", "activations": "int8, asymmetric, per tensor"}


def quantize_static(model: VGG, example: torch.Tensor, calib: torch.Tensor, quantizer: Any = None, *,
                    dynamic_shapes: Any = _DYNAMIC, fold_quantize: bool = True) -> torch.fx.GraphModule:
    """export → ``prepare_pt2e`` (observers; conv + BN folded) → calibration on ``calib`` in chunks of at most
    :data:`CALIB_CHUNK` → ``convert_pt2e``: a q/dq graph. ``model`` is copied, not changed.

    By default the x86 Inductor scheme (the ``int8`` runtime, ``pt2-int8``: the graph Inductor fuses into oneDNN INT8
    kernels) on a graph with the dynamic batch of :func:`~vggnet.capture.graph.dynamic_batch`, so one calibration
    serves every batch size. ``quantizer`` (from :func:`edge_quantizer`) and ``dynamic_shapes`` (torch.export's, with
    the batch free up to the example's: ExecuTorch's bounded batch) serve the mobile formats. ``fold_quantize`` False
    keeps each weight's quantize op in the graph (LiteRT's converter needs it so)."""
    _, quantize_pt2e, xiq = load_torchao()
    quantizer = _x86_quantizer(xiq, is_qat=False) if quantizer is None else quantizer
    source = copy.deepcopy(model).eval()
    with torch.no_grad():
        if isinstance(dynamic_shapes, str) and dynamic_shapes == _DYNAMIC:
            graph, chunk = export_graph(source, example), CALIB_CHUNK
        else:  # the example's batch is the largest the graph takes
            graph = torch.export.export(source, (example,), dynamic_shapes=dynamic_shapes).module()
            chunk = min(CALIB_CHUNK, len(example))
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        for part in calib.float().contiguous().split(chunk):
            prepared(part)
        return quantize_pt2e.convert_pt2e(prepared, fold_quantize=fold_quantize)


# ---------------------------------------------------------------------------------------------------------- QAT

def export_for_qat(model: VGG, example: torch.Tensor, fold_bn: bool = True) -> nn.Module:
    """``model`` (a copy; BN folded into the convs unless ``fold_bn`` is False) captured in training form with a
    dynamic batch. A failed capture becomes a :class:`CaptureError` naming the head, the only part that varies."""
    source = fold_batchnorm(model) if fold_bn else copy.deepcopy(model)
    source.train()
    if len(example) < 2:  # export specialises a batch of one to a constant
        example = example.repeat(2, 1, 1, 1)
    try:
        with quiet_torchao():
            return export_program(source, example[:2].float().clone()).module()
    except RuntimeError as exc:  # torch.export's UserError, Unsupported, GuardOnDataDependentSymNode...
        log.exception("torch.export could not capture %s with the %r head", model.config.name, model.config.head)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CaptureError(f"{model.config.name} with the {model.config.head!r} head cannot be captured by "
                           f"torch.export for QAT ({type(exc).__name__}: {first}); QAT needs an exportable graph: "
                           "use a model with the fc, conv or gap head") from exc


def prepare_qat(model: VGG, example: torch.Tensor, fold_bn: bool = True) -> nn.Module:
    """The exported graph with fake quantizers where ``X86InductorQuantizer`` puts INT8 ops, in training form."""
    _, quantize_pt2e, xiq = load_torchao("quantization-aware training")
    graph = export_for_qat(model, example, fold_bn)
    quantizer = _x86_quantizer(xiq, is_qat=True)
    with quiet_torchao():
        prepared = quantize_pt2e.prepare_qat_pt2e(graph, quantizer)
    setattr(prepared, _TRAINING, True)  # exported from a model in training mode: already in training form
    return prepared


def set_qat_mode(prepared: nn.Module, train: bool) -> None:
    """Dropout and BN on in training, off otherwise; observers only learn ranges in training (and calibration)."""
    pt2e, _, _ = load_torchao("quantization-aware training")
    if getattr(prepared, _TRAINING, None) is not train:  # each rewrite re-traces its patterns: ~1 s, skip no-ops
        with quiet_torchao():
            (pt2e.move_exported_model_to_train if train else pt2e.move_exported_model_to_eval)(prepared)
        setattr(prepared, _TRAINING, train)
    prepared.apply(pt2e.enable_observer if train else pt2e.disable_observer)


def calibrate_qat(prepared: nn.Module, images: torch.Tensor) -> None:
    """Initial activation ranges from calibration images: eval form (no dropout, BN running stats), observers on,
    no gradients."""
    pt2e, _, _ = load_torchao("quantization-aware training")
    set_qat_mode(prepared, train=False)
    prepared.apply(pt2e.enable_observer)
    with torch.no_grad():
        for chunk in images.split(CALIB_CHUNK):
            prepared(chunk)
    prepared.apply(pt2e.disable_observer)


def convert_qat(prepared: nn.Module) -> torch.fx.GraphModule:
    """The INT8 q/dq graph of a fine-tuned prepared graph (which is left as it is, in eval form)."""
    _, quantize_pt2e, _ = load_torchao("quantization-aware training")
    set_qat_mode(prepared, train=False)
    with quiet_torchao():
        return quantize_pt2e.convert_pt2e(copy.deepcopy(prepared))
