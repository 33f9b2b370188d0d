"""The calibration batch of a checkpoint's calibrated runtime (``int8``, ``onnx-int8``, ``openvino-int8``,
``auto``), as ``vggnet predict`` and ``vggnet serve`` build it.

Where the images come from is decided by :func:`vggnet.capture.calibration.calibration_source`, the rule
``vggnet export``'s INT8 formats use too: ``--calib-data PATH`` when given, else the run's own training split (its
``recipe.yaml``: the embedded digits for the demo), else a one-line error saying what to pass. This module adds
what sits above ``capture``: expanding ``--calib-data`` (a folder, glob or file) into files, and this package's
preprocessing, so a model is calibrated on exactly the pixels it is later fed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from vggnet.capture.calibration import CALIB_HINT, CalibrationSource, calibration_set, calibration_source

from .images import expand_image_paths
from .predictor import Preprocessing, preprocess

__all__ = ["CALIBRATED", "CALIB_N", "calibration_files", "find_calibration", "read_calibration"]

#: the runtimes built on a calibration batch
CALIBRATED = ("int8", "onnx-int8", "openvino-int8", "auto")
#: calibration images a runtime is built on unless told otherwise (``--calib-n``)
CALIB_N = 64


def calibration_files(calib_data: str | os.PathLike) -> list[Path]:
    """The image files of ``--calib-data`` (a folder, searched recursively, a glob or a file); a missing path is
    an error that says it was the calibration data."""
    try:
        return expand_image_paths([calib_data])
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"calibration data {calib_data}: {exc}") from exc


def find_calibration(ckpt: str | os.PathLike | None, calib_data: str | os.PathLike | None = None, *,
                     needed_by: str = "INT8 calibration", hint: str = CALIB_HINT) -> CalibrationSource:
    """Where the checkpoint ``ckpt`` is calibrated from: ``calib_data`` when given, else its run's training split,
    else a one-line error (``needed_by`` needs calibration images; ``hint``). Reads no image, so it is also the
    check a command makes before anything slow."""
    paths = calibration_files(calib_data) if calib_data is not None else None
    return calibration_source(ckpt, paths, calib_data, needed_by=needed_by, hint=hint)


def read_calibration(source: CalibrationSource, n: int, prep: Preprocessing) -> torch.Tensor:
    """``n`` images of ``source``, spread evenly and preprocessed by ``prep`` (as predictions are)."""
    return calibration_set(source, n, functools.partial(preprocess, prep=prep), prep.classes)
