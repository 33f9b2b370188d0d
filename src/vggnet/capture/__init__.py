"""Capture and quantize a VGG: the graph every CPU runtime, exported file and INT8 model is built from.

One place for ``torch.export`` with the dynamic batch (:mod:`.graph`), torchao's PT2E static INT8 and its QAT
variant (:mod:`.pt2e`), the ONNX export and ONNX Runtime's INT8 (:mod:`.onnx`), the metadata document every
exported file carries (:mod:`.metadata`), the images INT8 models are calibrated on (:mod:`.calibration`: one
rule, :func:`calibration_source`, for ``predict``, ``serve`` and ``export``) and the silencing of the noise these
tools make (:mod:`.quiet`), so ``vggnet.infer``, ``vggnet.export`` and ``vggnet.compress`` quantize the same way.

Sits below them: imports ``vggnet.models``, ``vggnet.errors`` and, when images are read, ``vggnet.data`` and
``vggnet.evaluate``; never ``infer``, ``export`` or ``compress`` (preprocessing and the files of ``--calib-data``
are passed in by the caller).
"""

from .calibration import (
    CalibrationError,
    CalibrationSource,
    Int8Images,
    calibration_batch,
    calibration_set,
    calibration_source,
    evenly_spaced,
    int8_images,
    read_images,
)
from .graph import batch_dim, dynamic_batch, example_input, export_graph, export_program, fold_batchnorm
from .metadata import EXPORT_FORMAT, EXPORT_VERSION, METADATA_FILE, METADATA_KEY, export_metadata
from .pt2e import (
    CALIB_CHUNK,
    CaptureError,
    calibrate_qat,
    convert_qat,
    export_for_qat,
    load_torchao,
    prepare_qat,
    quantize_static,
    set_qat_mode,
)
from .quiet import MissingDependency, import_optional, quiet_compiler_probe, quiet_lowering, quiet_torchao

__all__ = ["CALIB_CHUNK", "EXPORT_FORMAT", "EXPORT_VERSION", "METADATA_FILE", "METADATA_KEY", "CalibrationError",
           "CalibrationSource", "CaptureError", "Int8Images", "MissingDependency", "batch_dim", "calibrate_qat",
           "calibration_batch", "calibration_set", "calibration_source", "convert_qat", "dynamic_batch",
           "evenly_spaced", "example_input", "export_for_qat", "export_graph", "export_metadata", "export_program",
           "fold_batchnorm", "import_optional", "int8_images", "load_torchao", "prepare_qat", "quantize_static",
           "quiet_compiler_probe", "quiet_lowering", "quiet_torchao", "read_images", "set_qat_mode"]
