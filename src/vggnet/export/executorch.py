"""``.pte``: an ExecuTorch program (``vggnet export --format executorch`` / ``executorch-int8``), the PyTorch runtime
for phones and edge devices, with the convolutions and the classifier delegated to XNNPACK; read back by ExecuTorch's
Python runtime (:class:`vggnet.infer.edge.ExecuTorchRuntime`).

Dynamic batch, 1 to ``max_batch`` (default :data:`MAX_BATCH`), captured with an example batch *of* ``max_batch``:
captured at a smaller example, the XNNPACK lowering can plan memory for fewer images than the maximum (a 32-px VGG
captured at batch 8 with a maximum of 64, or at 9 with a maximum of 16, is planned for 15 and fails at 16); captured
at the maximum, it runs every batch up to it. The runtime allocates that plan when the program loads (memory grows
with ``max_batch`` × the image size) and runs a larger batch in slices. Both are checked after lowering
(:func:`_check_batch`, :func:`_write`): on a 32-px VGG (seen at widths 0.125 and 0.25, GAP and fc heads) an example
batch of 16 makes the lowering fix the batch at 16, which ends as a clear error asking for another ``--max-batch``,
never as a program that fails at batch 1.

INT8: torchao PT2E with ExecuTorch's ``XNNPACKQuantizer`` (:func:`vggnet.capture.pt2e.edge_quantizer`), calibrated at
export time like ``pt2-int8``; the program takes and returns float32 and quantizes inside.

The metadata document (:mod:`vggnet.capture.metadata`) is a constant method of the program,
:data:`~vggnet.infer.edge.ET_METADATA_METHOD`, returning the JSON text: inside the file, beside ``forward``
(C++: ``module.execute("vggnet_metadata")``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from vggnet.capture.graph import example_input
from vggnet.capture.metadata import export_metadata
from vggnet.capture.pt2e import edge_quantizer, edge_scheme, quantize_static
from vggnet.errors import UsageError
from vggnet.infer.edge import EDGE_LOAD_ERRORS, ET_METADATA_METHOD, ExecuTorchRuntime
from vggnet.infer.predictor import Preprocessing
from vggnet.models import VGG

from .common import ExportedModel, ExportError, _Checked, parse_metadata

__all__ = ["MAX_BATCH", "export_executorch", "export_executorch_int8", "load_executorch"]

# The largest batch a .pte runs at once unless --max-batch says otherwise: vggnet predict's default batch.
MAX_BATCH = 32


def _capture(prep: Preprocessing, max_batch: int) -> tuple[torch.Tensor, Any]:
    """The example batch (of ``max_batch``: see the module docstring) and torch.export's ``dynamic_shapes``."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
    if max_batch == 1:  # export specialises a batch of one to a constant: a program of batch 1
        return example_input(prep, 1), None
    return example_input(prep, max_batch), ({0: torch.export.Dim("batch", min=1, max=max_batch)},)


def _check_batch(lowered: torch.export.ExportedProgram, max_batch: int) -> None:
    """An :class:`ExportError` when lowering fixed the batch dimension the capture left free."""
    if max_batch == 1:
        return
    name = lowered.graph_signature.user_inputs[0]
    node = next(n for n in lowered.graph.nodes if n.op == "placeholder" and n.name == name)
    batch = node.meta["val"].shape[0]
    if is_concrete_int(batch):  # an int, or a SymInt whose symbol a guard replaced by a number
        raise ExportError(f"executorch: lowering to XNNPACK fixed the batch dimension at {batch}, so the program "
                          f"would run no other batch; pass another --max-batch (e.g. {max_batch + 1})")


def _write(program: torch.export.ExportedProgram, metadata: str, out: Path, max_batch: int) -> Path:
    """Lower ``program`` to the edge dialect, delegate what XNNPACK runs, and write the ``.pte`` with
    ``metadata`` as a constant method; then load it and confirm its memory plan holds ``max_batch`` images."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    manager = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                          constant_methods={ET_METADATA_METHOD: metadata})
    _check_batch(manager.exported_program(), max_batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(manager.to_executorch().buffer)
    planned = ExecuTorchRuntime(out).max_batch
    if planned != max_batch:
        raise ExportError(f"executorch: the program's memory is planned for batches up to {planned}, not the "
                          f"{max_batch} asked for; pass --max-batch {planned}")
    return out


def export_executorch(model: VGG, prep: Preprocessing, out: str | os.PathLike, *,
                      source: str | os.PathLike | None = None, max_batch: int = MAX_BATCH) -> Path:
    """``model`` as an fp32 ExecuTorch program (XNNPACK) running batches of 1 to ``max_batch``, written to ``out``."""
    example, shapes = _capture(prep, max_batch)
    with torch.no_grad():
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=shapes)
        return _write(program, export_metadata(model, prep, source), Path(out), max_batch)


def export_executorch_int8(model: VGG, prep: Preprocessing, out: str | os.PathLike, calib: torch.Tensor, *,
                           source: str | os.PathLike | None = None, calibration: dict[str, Any] | None = None,
                           max_batch: int = MAX_BATCH) -> Path:
    """PT2E static INT8 for XNNPACK, calibrated on ``calib``, as an ExecuTorch program of batch 1 to ``max_batch``;
    the quantization (scheme and ``calibration``, where the images came from) goes into its metadata."""
    example, shapes = _capture(prep, max_batch)
    with torch.no_grad():
        converted = quantize_static(model, example, calib, edge_quantizer("xnnpack"), dynamic_shapes=shapes)
        program = torch.export.export(converted, (example,), dynamic_shapes=shapes)
        quantization = {**edge_scheme("xnnpack", "ExecuTorch (XNNPACK)"), "calibration": dict(calibration or {})}
        return _write(program, export_metadata(model, prep, source, quantization), Path(out), max_batch)


def load_executorch(path: str | os.PathLike) -> ExportedModel:
    """A ``.pte`` written by :func:`export_executorch` (or its INT8 variant), as an :class:`ExportedModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ExecuTorch program not found: {path}")
    try:
        runtime = ExecuTorchRuntime(path)
    except EDGE_LOAD_ERRORS as exc:  # "Failed to load program, error: 0x:23" for a damaged or foreign file
        raise ExportError(f"{path}: not a loadable ExecuTorch program: {exc}") from exc
    prep, meta = parse_metadata(runtime.metadata, path)
    return ExportedModel(path, "executorch", prep, _Checked("executorch", runtime, prep), meta)
