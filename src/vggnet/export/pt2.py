"""``.pt2``: ``torch.export`` with a dynamic batch, compiled ahead of time by AOTInductor into a package that
runs without Python model code (``torch._inductor.aoti_load_package`` here, or the C++
``AOTIModelPackageLoader``).

The metadata goes into the package through Inductor's ``aot_inductor.metadata`` option: it is compiled into
the model library and read back with ``compiled.get_metadata()["vggnet"]`` (C++: ``get_metadata()``), so it
cannot be separated from the weights it describes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG

from .common import METADATA_KEY, ExportedModel, ExportError, _Checked, example_input, export_metadata, parse_metadata

__all__ = ["export_pt2", "is_program", "load_program", "load_pt2"]


def export_pt2(model: VGG, prep: Preprocessing, out: str | os.PathLike, *,
               source: str | os.PathLike | None = None) -> Path:
    """Export and AOT-compile ``model`` (CPU) to ``out`` (must end in ``.pt2``). Compiling runs a C++
    compiler: tens of seconds for a tiny model, minutes for VGG-16."""
    out = Path(out)
    if out.suffix != ".pt2":
        raise ValueError(f"{out}: an AOTInductor package must end in .pt2")
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(model.eval(), (example_input(prep),), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(out),
            inductor_configs={"aot_inductor.metadata": {METADATA_KEY: export_metadata(model, prep, source)}})
    return out


def load_pt2(path: str | os.PathLike) -> ExportedModel:
    """A package written by :func:`export_pt2`, as an :class:`ExportedModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".pt2 package not found: {path}")
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
        metadata = compiled.get_metadata()
    except Exception as exc:  # torch raises RuntimeError subclasses from C++ for anything malformed
        raise ExportError(f"{path}: not a loadable AOTInductor package ({type(exc).__name__}: {exc})") from exc
    prep, meta = parse_metadata(metadata.get(METADATA_KEY), path)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(x)

    return ExportedModel(path, "pt2", prep, _Checked("pt2", run, prep), meta)


PROGRAM_METADATA = "vggnet.json"  # the extra file a saved torch.export program keeps its metadata in


def is_program(path: str | os.PathLike) -> bool:
    """Whether a ``.pt2`` is a saved ``torch.export`` program (``torch.export.save``, e.g. ``vggnet compress qat``'s
    ``qat.pt2``) rather than an AOTInductor package: it has a serialized model and no compiled library."""
    import zipfile

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
    except Exception as exc:  # torch raises RuntimeError / SerializeError for foreign or damaged archives
        raise ExportError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
    prep, meta = parse_metadata(extra[PROGRAM_METADATA], path)
    module = program.module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return ExportedModel(path, "pt2-program", prep, _Checked("pt2-program", run, prep), meta)
