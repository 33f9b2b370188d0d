"""``.pt2``: ``torch.export`` with a dynamic batch, compiled ahead of time by AOTInductor into a package that
runs without Python model code (``torch._inductor.aoti_load_package`` here, or the C++
``AOTIModelPackageLoader``); fp32 or PT2E static INT8 (``pt2-int8``).

The metadata goes into the package through Inductor's ``aot_inductor.metadata`` option: it is compiled into
the model library and read back with ``compiled.get_metadata()["vggnet"]`` (C++: ``get_metadata()``), so it
cannot be separated from the weights it describes.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from vggnet.capture.graph import example_input, export_program
from vggnet.capture.metadata import METADATA_FILE, METADATA_KEY, export_metadata
from vggnet.capture.pt2e import pt2e_scheme, quantize_static
from vggnet.capture.quiet import quiet_compiler_probe, quiet_lowering
from vggnet.errors import UsageError
from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG

from .common import LOAD_ERRORS, ExportedModel, ExportError, _Checked, parse_metadata

__all__ = ["PROGRAM_METADATA", "export_pt2", "export_pt2_int8", "is_program", "load_program", "load_pt2"]

PROGRAM_METADATA = METADATA_FILE  # the extra file a saved torch.export program keeps its metadata in


def _check_suffix(out: Path) -> None:
    if out.suffix != ".pt2":
        raise UsageError(f"{out}: an AOTInductor package must end in .pt2")


def export_pt2(model: VGG, prep: Preprocessing, out: str | os.PathLike, *,
               source: str | os.PathLike | None = None) -> Path:
    """Export and AOT-compile ``model`` (CPU) to ``out`` (must end in ``.pt2``). Compiling runs a C++
    compiler: tens of seconds for a tiny model, minutes for VGG-16."""
    out = Path(out)
    _check_suffix(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = export_program(model.eval(), example_input(prep))
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(out),
            inductor_configs={"aot_inductor.metadata": {METADATA_KEY: export_metadata(model, prep, source)}})
    return out


def export_pt2_int8(model: VGG, prep: Preprocessing, out: str | os.PathLike, calib: torch.Tensor, *,
                    source: str | os.PathLike | None = None, calibration: dict[str, Any] | None = None) -> Path:
    """PT2E static INT8 (the ``int8`` runtime's recipe, calibrated on ``calib``), re-exported with a dynamic batch
    and compiled by AOTInductor with Inductor's freezing on, which fuses the quantize / dequantize pairs into oneDNN
    INT8 kernels with the int8 weights as constants of the package.

    Not ``torch.export.save`` of the converted program: its loader needs torchao (the ``quantized_decomposed``
    ops) and runs simulated quantization in fp32 unless compiled again; the package loads with
    ``torch._inductor.aoti_load_package`` alone, without torchao or the calibration images.
    """
    out = Path(out)
    example = example_input(prep)
    with torch.no_grad():
        converted = quantize_static(model, example, calib)
        program = export_program(converted, example)
        quantization = {**pt2e_scheme(), "calibration": dict(calibration or {})}
        metadata = {METADATA_KEY: export_metadata(model, prep, source, quantization)}
        with quiet_lowering(), quiet_compiler_probe(True):
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(out),
                inductor_configs={"freezing": True, "aot_inductor.metadata": metadata})
    return out


def _inference(fn: Any) -> Any:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return fn(x)

    return run


def load_pt2(path: str | os.PathLike) -> ExportedModel:
    """A package written by :func:`export_pt2`, as an :class:`ExportedModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".pt2 package not found: {path}")
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
        metadata = compiled.get_metadata()
    except LOAD_ERRORS as exc:  # torch raises RuntimeError subclasses from C++ for anything malformed
        raise ExportError(f"{path}: not a loadable AOTInductor package ({type(exc).__name__}: {exc})") from exc
    prep, meta = parse_metadata(metadata.get(METADATA_KEY), path)
    return ExportedModel(path, "pt2", prep, _Checked("pt2", _inference(compiled), prep), meta)


def is_program(path: str | os.PathLike) -> bool:
    """Whether a ``.pt2`` is a saved ``torch.export`` program (``torch.export.save``, e.g. ``vggnet compress qat``'s
    ``qat.pt2``) rather than an AOTInductor package: it has a serialized model and no compiled library."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("models/model.json") for n in names) and not any("aotinductor" in n for n in names)


def load_program(path: str | os.PathLike) -> ExportedModel:
    """A saved ``torch.export`` program with vggnet metadata, run eagerly (its INT8 q/dq ops in fp32 reference
    arithmetic: the same predictions as the compiled INT8 kernels up to rounding, no compiler needed)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the q/dq ops a converted graph calls

    path = Path(path)
    extra = {PROGRAM_METADATA: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except LOAD_ERRORS as exc:  # torch raises RuntimeError / SerializeError for foreign or damaged archives
        raise ExportError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
    prep, meta = parse_metadata(extra[PROGRAM_METADATA], path)
    return ExportedModel(path, "pt2-program", prep, _Checked("pt2-program", _inference(program.module()), prep), meta)
