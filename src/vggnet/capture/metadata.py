"""The metadata document every vggnet export carries, whatever the format (ONNX ``metadata_props``, an AOTInductor
package's metadata, a TorchScript or ``torch.export`` extra file, ``vggnet compress qat``'s ``qat.pt2``): one
writer, so every reader (``vggnet.export.load_exported``, ``vggnet serve``) parses them all.

``{"format": "vggnet-export", "version": 1, "preprocessing": {...}, "model": {...}, "source": ..., "torch": ...}``
plus ``quantization`` in INT8 files only: its presence is what tells a quantized file from an fp32 one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

import torch

from vggnet.models import VGG

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "METADATA_FILE", "METADATA_KEY", "export_metadata"]

EXPORT_FORMAT, EXPORT_VERSION = "vggnet-export", 1
METADATA_KEY = "vggnet"  # the key in ONNX metadata_props and AOTInductor metadata
METADATA_FILE = "vggnet.json"  # the extra file of a TorchScript file or a saved torch.export program


class Described(Protocol):
    """What the document needs of :class:`vggnet.infer.Preprocessing` (which sits above this package)."""

    def to_dict(self) -> dict[str, Any]: ...


def export_metadata(model: VGG, prep: Described, source: str | os.PathLike | None = None,
                    quantization: dict[str, Any] | None = None) -> str:
    """The JSON text stored in an exported file."""
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "preprocessing": prep.to_dict(),
            "model": model.config.to_dict(), "source": None if source is None else str(source),
            "torch": torch.__version__}
    if quantization is not None:
        meta["quantization"] = quantization
    return json.dumps(meta, sort_keys=True)
