"""Inference: preprocessing that travels with the model, interchangeable CPU runtimes, top-k prediction.

Builds on :mod:`vggnet.capture` (graph capture, PT2E and ONNX quantization, where calibration images come from)
and is used by ``vggnet.export``, ``vggnet.compress`` and ``vggnet.serve``; it imports none of them.
"""

from . import runtimes  # noqa: F401  (registers channels_last, bf16, compile, int8, ..., auto)
from .calibration import CALIBRATED, find_calibration, read_calibration
from .images import ImageLoadError, expand_image_paths, load_image, load_images
from .predictor import RUNTIMES, Predictor, Preprocessing, Runtime, make_runtime, preprocess, register_runtime
from .runtimes import AutoRuntime, RuntimeUnavailable, fold_batchnorm, top1_agreement

__all__ = ["CALIBRATED", "RUNTIMES", "AutoRuntime", "ImageLoadError", "Predictor", "Preprocessing", "Runtime",
           "RuntimeUnavailable", "expand_image_paths", "find_calibration", "fold_batchnorm", "load_image",
           "load_images", "make_runtime", "preprocess", "read_calibration", "register_runtime", "top1_agreement"]
