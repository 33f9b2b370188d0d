"""What every export format shares: the metadata that travels inside the file, the check against eager, and
:class:`ExportedModel`, an exported file read back behind the same runtime interface as a checkpoint.

The metadata is one JSON document (``{"format": "vggnet-export", "version": 1, "preprocessing": {...},
"model": {...}, "source": ..., "torch": ...}``) stored under the key ``vggnet``: an ONNX ``metadata_props``
entry, an AOTInductor package's metadata (``aot_inductor.metadata``), a TorchScript ``_extra_files`` entry
``vggnet.json``. ``preprocessing`` is :meth:`vggnet.infer.Preprocessing.to_dict` (mean, std, image_size,
in_channels, num_classes, classes), so whoever serves the file resizes, crops and normalises exactly as the
checkpoint did.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggnet.infer.predictor import Predictor, Preprocessing, Runtime
from vggnet.models import VGG

__all__ = ["CHECK_BATCHES", "EXPORT_FORMAT", "METADATA_KEY", "TOLERANCE", "ExportError", "ExportedModel",
           "check_against", "example_input", "export_metadata", "max_relative_error", "parse_metadata"]

EXPORT_FORMAT, EXPORT_VERSION = "vggnet-export", 1
METADATA_KEY = "vggnet"
# Batch sizes every export is run at after writing: 1 and a non-power of two catch a batch dimension that
# export specialised to a constant; 8 is the benchmark's batch.
CHECK_BATCHES = (1, 3, 8)
# Max relative error (max |exported − eager| / max |eager|) allowed per format, fp32. Relative to the
# largest logit because element-wise relative error is meaningless for logits near zero.
TOLERANCE = {"onnx": 1e-4, "pt2": 1e-4, "torchscript": 1e-5}
# Exported graphs are captured with this batch (export turns a batch of 1 into a constant).
_EXAMPLE_BATCH = 2


class ExportError(ValueError):
    """An export that failed its checks, or a file that is not a vggnet export (or not of the format named)."""


def example_input(prep: Preprocessing, batch: int = _EXAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
    """A deterministic normalised input batch of the model's shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, prep.in_channels, prep.image_size, prep.image_size, generator=g)


def export_metadata(model: VGG, prep: Preprocessing, source: str | os.PathLike | None = None) -> str:
    """The JSON text stored in every exported file."""
    return json.dumps({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "preprocessing": prep.to_dict(),
                       "model": model.config.to_dict(), "source": None if source is None else str(source),
                       "torch": torch.__version__}, sort_keys=True)


def parse_metadata(text: str | bytes | None, where: str | os.PathLike) -> tuple[Preprocessing, dict[str, Any]]:
    """Preprocessing and the whole metadata document from an exported file's ``vggnet`` entry."""
    if text is None or text in ("", b""):
        raise ExportError(f"{where}: no vggnet metadata in this file (not exported by `vggnet export`?); "
                          "its preprocessing (mean, std, input size, classes) is unknown")
    try:
        meta = json.loads(text)
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        return Preprocessing.from_meta(meta["preprocessing"]), meta
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"{where}: corrupt vggnet metadata ({exc})") from exc


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want|."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise ExportError(f"exported model returns shape {tuple(got.shape)}, eager {tuple(want.shape)}")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def check_against(model: VGG, runtime: Runtime, prep: Preprocessing, tolerance: float,
                  batches: tuple[int, ...] = CHECK_BATCHES, what: str = "export") -> dict[int, float]:
    """Run ``runtime`` and eager fp32 on the same random batches; the max relative error per batch size, or an
    :class:`ExportError` when one exceeds ``tolerance``."""
    errors: dict[int, float] = {}
    model = model.eval()
    for batch in batches:
        x = example_input(prep, batch, seed=batch)
        with torch.inference_mode():
            want = model(x).float()
        errors[batch] = max_relative_error(runtime(x), want)
        if not errors[batch] <= tolerance:  # also catches NaN
            raise ExportError(f"{what}: at batch {batch} the max relative error against eager fp32 is "
                              f"{errors[batch]:.3g} > {tolerance:g}")
    return errors


class _Checked:
    """Shape and dtype checks in front of an exported graph, whose own errors name internal tensors."""

    def __init__(self, name: str, fn: Any, prep: Preprocessing) -> None:
        self.name, self.fn, self.prep = name, fn, prep
        self.expected = (prep.in_channels, prep.image_size, prep.image_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.expected or not len(x):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: expected a batch of shape N×{'×'.join(map(str, self.expected))}, "
                             f"got {shape}")
        return self.fn(x.float().contiguous()).float()


@dataclass
class ExportedModel:
    """An exported file read back: ``runtime`` (a :class:`~vggnet.infer.Runtime`), its ``prep`` and the metadata.

    ``model(x)`` returns logits for a normalised batch; :meth:`predictor` gives labels and probabilities for
    raw images, exactly as :meth:`Predictor.from_checkpoint` does for the checkpoint it came from.
    """

    path: Path
    format: str
    prep: Preprocessing
    runtime: Runtime
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runtime(x)

    def predictor(self, max_batch: int = 32) -> Predictor:
        predictor = Predictor(None, self.prep, self.runtime, max_batch=max_batch)
        predictor.source = self.path
        return predictor
