"""INT8 through torchao's PT2E flow for x86 Inductor, the one place vggnet calls it: static post-training
quantization (the ``int8`` runtime, ``vggnet export --format pt2-int8``) and its quantization-aware variant
(``vggnet compress qat``).

Both use ``X86InductorQuantizer``'s default scheme (weights int8 symmetric per output channel, activations uint8
affine per tensor), so Inductor lowers either result to the same oneDNN INT8 kernels. Calibration runs in chunks
of :data:`CALIB_CHUNK`: 256 VGG-16 inputs at 224² would need ~3 GB for the first block's activations alone.

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

__all__ = ["CALIB_CHUNK", "CaptureError", "calibrate_qat", "convert_qat", "export_for_qat", "load_torchao",
           "pt2e_scheme", "prepare_qat", "quantize_static", "set_qat_mode"]

log = logging.getLogger(__name__)

CALIB_CHUNK = 16
_TRAINING = "_vggnet_qat_training"  # attribute: the form (training or eval) a prepared graph is in


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


def quantize_static(model: VGG, example: torch.Tensor, calib: torch.Tensor) -> torch.fx.GraphModule:
    """export (dynamic batch, so one calibration serves every batch size) → ``prepare_pt2e`` (observers; conv + BN
    folded) → calibration on ``calib`` in chunks → ``convert_pt2e``: the q/dq graph Inductor's x86 passes fuse into
    oneDNN INT8 kernels. ``model`` is copied, not changed."""
    _, quantize_pt2e, xiq = load_torchao()
    with torch.no_grad():
        graph = export_graph(copy.deepcopy(model).eval(), example)
        prepared = quantize_pt2e.prepare_pt2e(graph, _x86_quantizer(xiq, is_qat=False))
        for chunk in calib.float().contiguous().split(CALIB_CHUNK):
            prepared(chunk)
        return quantize_pt2e.convert_pt2e(prepared)


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
