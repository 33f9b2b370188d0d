"""TorchScript: ``torch.jit.trace`` + ``torch.jit.save`` with the metadata as the extra file ``vggnet.json``.

TorchScript is deprecated upstream (``torch.export`` / ``.pt2`` replaces it); it stays for consumers that
still load ``.pt`` files with libtorch's ``torch::jit::load``. A trace of a VGG has no data-dependent
control flow to lose, and the batch dimension stays symbolic, which the export check at batch 1, 3 and 8
confirms. The deprecation warnings are silenced here, once, rather than shown to every user.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from vggnet.capture.graph import example_input
from vggnet.capture.metadata import METADATA_FILE, export_metadata
from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG

from .common import LOAD_ERRORS, ExportedModel, ExportError, _Checked, parse_metadata

__all__ = ["EXTRA_FILE", "export_torchscript", "load_torchscript"]

EXTRA_FILE = METADATA_FILE


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*TorchScript.*", category=DeprecationWarning)
        yield


def export_torchscript(model: VGG, prep: Preprocessing, out: str | os.PathLike, *,
                       source: str | os.PathLike | None = None) -> Path:
    """Trace ``model`` and save it to ``out`` with the metadata as the extra file ``vggnet.json``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model.eval(), example_input(prep), check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={EXTRA_FILE: export_metadata(model, prep, source)})
    return out


def load_torchscript(path: str | os.PathLike) -> ExportedModel:
    """A file written by :func:`export_torchscript`, as an :class:`ExportedModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript file not found: {path}")
    extra = {EXTRA_FILE: ""}
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except LOAD_ERRORS as exc:  # torch.jit raises RuntimeError / ValueError from C++ for other zip files
        raise ExportError(f"{path}: not a loadable TorchScript file ({type(exc).__name__}: {exc})") from exc
    prep, meta = parse_metadata(extra[EXTRA_FILE], path)
    module.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return ExportedModel(path, "torchscript", prep, _Checked("torchscript", run, prep), meta)
