"""What every export format shares: reading the metadata back, the check against eager, and
:class:`ExportedModel`, an exported file read back behind the same runtime interface as a checkpoint.

The metadata document itself is written by :mod:`vggnet.capture.metadata` (one writer for every format and for
``vggnet compress qat``); ``preprocessing`` in it is :meth:`vggnet.infer.Preprocessing.to_dict`, so whoever serves
the file resizes, crops and normalises exactly as the checkpoint was validated (files written before
``test_scale`` was recorded read back with the crop as their test scale).

An INT8 model cannot meet the fp32 tolerance, so it is checked differently (:func:`check_agreement`): its top-1
must agree with eager fp32 on held-out images that were not used to calibrate it (:func:`int8_images`, from
:mod:`vggnet.capture.calibration`, picks both sets; the calibration images by the rule ``vggnet predict`` and
``vggnet serve`` use too).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggnet import progress as vprogress
from vggnet.capture import calibration
from vggnet.capture.calibration import CALIB_IMAGES, CHECK_IMAGES, MIN_CHECK_IMAGES, Int8Images, check_counts
from vggnet.capture.graph import example_input
from vggnet.capture.metadata import EXPORT_FORMAT, METADATA_KEY, export_metadata
from vggnet.errors import UsageError, VggnetError
from vggnet.infer.calibration import calibration_files
from vggnet.infer.predictor import Predictor, Preprocessing, Runtime, preprocess
from vggnet.models import VGG

__all__ = ["CALIB_IMAGES", "CHECK_BATCHES", "CHECK_IMAGES", "EXPORT_FORMAT", "METADATA_KEY", "MIN_AGREEMENT",
           "MIN_CHECK_IMAGES", "TOLERANCE", "ExportError", "ExportedModel", "Int8Images", "check_against",
           "check_agreement", "example_input", "export_metadata", "int8_images", "max_relative_error",
           "parse_metadata"]

# Batch sizes every export is run at after writing: 1 and a non-power of two catch a batch dimension that
# export specialised to a constant; 8 is the benchmark's batch.
CHECK_BATCHES = (1, 3, 8)
# Max relative error (max |exported − eager| / max |eager|) allowed per format, fp32. Relative to the
# largest logit because element-wise relative error is meaningless for logits near zero.
TOLERANCE = {"onnx": 1e-4, "pt2": 1e-4, "torchscript": 1e-5, "executorch": 1e-4, "tflite": 1e-4}
# The share of held-out images whose top-1 an INT8 export must agree with eager fp32 on.
MIN_AGREEMENT = 0.98
# What torch's loaders (torch.jit.load, torch.export.load, aoti_load_package) raise for a file that is not theirs.
LOAD_ERRORS = (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile)
# Eager reference logits for the held-out images are computed in chunks of this size (memory at 224²).
_EAGER_CHUNK = 32


class ExportError(VggnetError, ValueError):
    """An export that failed its checks, or a file that is not a vggnet export (or not of the format named)."""


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


def _check_bar(total: int, desc: str, progress: bool | None) -> Any:
    """The held-out images run so far: 256 at 224² through a VGG-16 take minutes on a small CPU. Off a terminal a
    line every 30 s with the time left, the first once the pass has run that long unless ``progress`` is True (a tiny
    model's check is quiet)."""
    tty = sys.stderr.isatty()
    return vprogress.progress_bar(total=total, desc=desc, unit="img", progress=progress, leave=not tty)


def check_agreement(model: VGG, runtime: Runtime, images: torch.Tensor, min_agreement: float,
                    batches: tuple[int, ...] = CHECK_BATCHES, what: str = "int8 export",
                    progress: bool | None = None) -> tuple[dict[int, float], float]:
    """Compare a quantized ``runtime`` with eager fp32 on preprocessed held-out ``images``: (max relative logit
    error per batch size, top-1 agreement); an :class:`ExportError` when the agreement is below ``min_agreement``
    or a logit is not finite.

    Real images, not random batches: the activation ranges were calibrated on real images, and noise lands outside
    them. One batch of each size in ``batches`` comes first (a batch dimension specialised to a constant fails
    there), the rest run at the largest. The relative error is reported, not bounded: INT8 cannot meet an fp32
    tolerance, and whether a class changes is what a user sees. ``progress`` (None or True: a bar on a terminal,
    lines elsewhere; False: none) follows both passes, eager and quantized.
    """
    if images.dim() != 4 or not len(images):
        raise ExportError(f"{what}: no held-out images to check against eager fp32")
    model = model.eval()
    wants = []
    with torch.inference_mode(), _check_bar(len(images), f"{what} check: eager fp32", progress) as bar:
        for chunk in images.split(_EAGER_CHUNK):
            wants.append(model(chunk).float())
            bar.update(len(chunk))
    want = torch.cat(wants)
    sizes = [b for b in batches if b >= 1]
    largest = max(sizes, default=8)
    errors: dict[int, float] = {}
    agree, start = 0, 0
    with _check_bar(len(images), f"{what} check: {what.split()[0]}", progress) as bar:
        while start < len(images):
            size = sizes.pop(0) if sizes else largest
            got = runtime(images[start:start + size])
            ref = want[start:start + size]
            error = max_relative_error(got, ref)
            if not math.isfinite(error) or not torch.isfinite(got).all():
                raise ExportError(f"{what}: non-finite logits at batch {len(ref)}")
            errors[len(ref)] = max(errors.get(len(ref), 0.0), error)
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            start += len(ref)
            bar.update(len(ref))
    agreement = agree / len(images)
    if not agreement >= min_agreement:
        raise ExportError(f"{what}: top-1 agrees with eager fp32 on {100 * agreement:.2f} % of {len(images)} "
                          f"held-out images, below the required {100 * min_agreement:.2f} %; calibrate on more or "
                          "more representative training images (--calib-data, --calib-images) or keep fp32")
    return dict(sorted(errors.items())), agreement


def int8_images(ckpt: str | os.PathLike, prep: Preprocessing, calib_data: str | os.PathLike | None = None,
                calib_images: int = CALIB_IMAGES, check_images: int = CHECK_IMAGES) -> Int8Images:
    """Calibration and check images for an INT8 export of ``ckpt``, preprocessed by ``prep`` (see
    :func:`vggnet.capture.calibration.int8_images`); ``calib_data`` is a folder, glob or file of training images
    that replaces the run's own training split."""
    check_counts(calib_images, check_images)
    paths = calibration_files(calib_data) if calib_data is not None else None
    return calibration.int8_images(ckpt, functools.partial(preprocess, prep=prep), prep.classes, calib_paths=paths,
                                   calib_source=calib_data, calib_images=calib_images, check_images=check_images)


class _Checked:
    """Shape and dtype checks in front of an exported graph, whose own errors name internal tensors."""

    def __init__(self, name: str, fn: Any, prep: Preprocessing) -> None:
        self.name, self.fn, self.prep = name, fn, prep
        self.expected = (prep.in_channels, prep.image_size, prep.image_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.expected or not len(x):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(f"{self.name}: expected a batch of shape N×{'×'.join(map(str, self.expected))}, "
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
