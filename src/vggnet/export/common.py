"""What every export format shares: the metadata that travels inside the file, the check against eager, and
:class:`ExportedModel`, an exported file read back behind the same runtime interface as a checkpoint.

The metadata is one JSON document (``{"format": "vggnet-export", "version": 1, "preprocessing": {...},
"model": {...}, "source": ..., "torch": ...}``) stored under the key ``vggnet``: an ONNX ``metadata_props``
entry, an AOTInductor package's metadata (``aot_inductor.metadata``), a TorchScript ``_extra_files`` entry
``vggnet.json``. ``preprocessing`` is :meth:`vggnet.infer.Preprocessing.to_dict` (mean, std, image_size,
test_scale, in_channels, num_classes, classes), so whoever serves the file resizes (shorter side to
``test_scale``), crops (``image_size``) and normalises exactly as the checkpoint was validated; files written
before ``test_scale`` was recorded read back with the crop as their test scale.

An INT8 export (``onnx-int8``, ``pt2-int8``) also records ``quantization`` in that document: the scheme
(weights int8 per output channel, activations uint8 per tensor, static), the tool, and where its calibration
images came from and how many there were. An INT8 model cannot meet the fp32 tolerance, so it is checked
differently (:func:`check_agreement`): its top-1 must agree with eager fp32 on held-out images that were
not used to calibrate it (:func:`int8_images` picks both sets).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggnet.infer.predictor import Predictor, Preprocessing, Runtime
from vggnet.models import VGG

__all__ = ["CALIB_IMAGES", "CHECK_BATCHES", "CHECK_IMAGES", "EXPORT_FORMAT", "METADATA_KEY", "MIN_AGREEMENT",
           "MIN_CHECK_IMAGES", "TOLERANCE", "ExportError", "ExportedModel", "Int8Images", "check_against",
           "check_agreement", "example_input", "export_metadata", "int8_images", "max_relative_error",
           "parse_metadata"]

log = logging.getLogger(__name__)

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
# INT8 exports: calibration images (MinMax ranges settle well before 256 images; more only costs time), the
# held-out images the result is compared with eager on, the fewest of those a check may rest on (unless fewer
# are asked for), and the share of them whose top-1 must agree with eager fp32.
CALIB_IMAGES = 256
CHECK_IMAGES = 256
MIN_CHECK_IMAGES = 64
MIN_AGREEMENT = 0.98
# Eager reference logits for the held-out images are computed in chunks of this size (memory at 224²).
_EAGER_CHUNK = 32


class ExportError(ValueError):
    """An export that failed its checks, or a file that is not a vggnet export (or not of the format named)."""


def example_input(prep: Preprocessing, batch: int = _EXAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
    """A deterministic normalised input batch of the model's shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, prep.in_channels, prep.image_size, prep.image_size, generator=g)


def export_metadata(model: VGG, prep: Preprocessing, source: str | os.PathLike | None = None,
                    quantization: dict[str, Any] | None = None) -> str:
    """The JSON text stored in every exported file; ``quantization`` only in INT8 ones, so its presence is what
    tells a quantized file from an fp32 one whatever the file is called."""
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "preprocessing": prep.to_dict(),
            "model": model.config.to_dict(), "source": None if source is None else str(source),
            "torch": torch.__version__}
    if quantization is not None:
        meta["quantization"] = quantization
    return json.dumps(meta, sort_keys=True)


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


def check_agreement(model: VGG, runtime: Runtime, images: torch.Tensor, min_agreement: float,
                    batches: tuple[int, ...] = CHECK_BATCHES,
                    what: str = "int8 export") -> tuple[dict[int, float], float]:
    """Compare a quantized ``runtime`` with eager fp32 on preprocessed held-out ``images``: (max relative logit
    error per batch size, top-1 agreement). Raises :class:`ExportError` when the agreement is below
    ``min_agreement`` or the logits are not finite.

    Real images, not the random batches of :func:`check_against`: the activation ranges were calibrated on
    real images, and noise lands outside them, which says nothing about the model's use. One batch of each
    size in ``batches`` comes first (a batch dimension specialised to a constant fails there), the rest run
    at the largest. The relative error is reported, not bounded: INT8 cannot meet an fp32 tolerance, and
    whether a class changes is what a user sees.
    """
    if images.dim() != 4 or not len(images):
        raise ExportError(f"{what}: no held-out images to check against eager fp32")
    model = model.eval()
    with torch.inference_mode():
        want = torch.cat([model(chunk).float() for chunk in images.split(_EAGER_CHUNK)])
    sizes = [b for b in batches if b >= 1]
    largest = max(sizes, default=8)
    errors: dict[int, float] = {}
    agree, start = 0, 0
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
    agreement = agree / len(images)
    if not agreement >= min_agreement:
        raise ExportError(f"{what}: top-1 agrees with eager fp32 on {100 * agreement:.2f} % of {len(images)} "
                          f"held-out images, below the required {100 * min_agreement:.2f} %; calibrate on more or "
                          "more representative training images (--calib-data, --calib-images) or keep fp32")
    return dict(sorted(errors.items())), agreement


@dataclass
class Int8Images:
    """What an INT8 export is calibrated on and checked against, and where each came from."""

    calib: torch.Tensor
    held: torch.Tensor
    #: recorded in the file: source ("recipe" or "folder"), path, dataset and split (recipe), images, unreadable
    calibration: dict[str, Any]
    #: recorded in the export report: source, path, split ("val", "train" or "rest"), images, description
    check: dict[str, Any]


class _LazyImages(Sequence):
    """Image files decoded on access; an unreadable one reads as ``None`` (logged), like a run's folder split."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        from vggnet.infer.images import ImageLoadError, load_image

        try:
            return load_image(self.paths[index])
        except ImageLoadError as exc:
            log.warning("int8 export: skipping %s", exc)
            return None


def _spread(indices: Sequence[int], n: int) -> list[int]:
    """``n`` of ``indices`` spread evenly (all when there are fewer): deterministic, and every class is
    represented when the images are sorted by class, as ImageFolder listings are."""
    from vggnet.infer.images import evenly_spaced

    return evenly_spaced(list(indices), n)


def _decode(images: Sequence[Any], indices: Sequence[int], prep: Preprocessing) -> tuple[torch.Tensor | None, int]:
    """The chosen images preprocessed exactly as the checkpoint's eval preprocessing (what ``vggnet predict``
    and a server do to a request), and how many could not be read: skipped, not fatal."""
    from vggnet.infer import preprocess

    good = [image for image in (images[i] for i in indices) if image is not None]
    return (preprocess(good, prep) if good else None), len(indices) - len(good)


def _run_split(ckpt: Path, prep: Preprocessing, split: str) -> tuple[Sequence[Any], Path, str]:
    """A split of the data the run at ``ckpt`` was trained on, rebuilt from its ``recipe.yaml`` as
    ``vggnet eval`` does (same val fraction and seed), with the recipe file and the dataset's name."""
    import yaml

    from vggnet.evaluate.sources import eval_images, find_recipe

    recipe = find_recipe(ckpt)
    if recipe is None:
        raise ValueError(f"{ckpt}: no recipe.yaml beside the checkpoint, so its training images are unknown; "
                         "pass --calib-data PATH (a folder of training images) to calibrate the INT8 model")
    data = (yaml.safe_load(recipe.read_text()) or {}).get("data") or {}
    images, _, _ = eval_images(ckpt, split=split, classes=None if prep.classes is None else list(prep.classes))
    return images, recipe, str(data.get("dataset", "folder"))


def int8_images(ckpt: str | os.PathLike, prep: Preprocessing, calib_data: str | os.PathLike | None = None,
                calib_images: int = CALIB_IMAGES, check_images: int = CHECK_IMAGES) -> Int8Images:
    """Calibration and check images for an INT8 export of the checkpoint ``ckpt``, preprocessed by ``prep``.

    Calibration uses the run's own training split (from its ``recipe.yaml``: the embedded digits, an
    ImageFolder tree...), or the images at ``calib_data`` (folder, glob or file) when given: ``calib_images``
    of them, spread evenly. Never the validation split the run reports on. The check uses the run's
    validation split when it has one (agreement with fp32 is not an accuracy figure, so nothing leaks), else
    the training (or ``calib_data``) images left over after calibration: ``check_images`` at most, at least
    ``min(check_images, MIN_CHECK_IMAGES)``. Everything is read here, before the slow export, so bad data
    fails in seconds, naming the path.
    """
    if calib_images < 1:
        raise ValueError(f"calib_images must be at least 1, got {calib_images}")
    if check_images < 1:
        raise ValueError(f"check_images must be at least 1, got {check_images}")
    ckpt = Path(ckpt)
    if calib_data is not None:
        from vggnet.infer.images import expand_image_paths

        try:
            train: Sequence[Any] = _LazyImages(expand_image_paths([calib_data]))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"calibration data {calib_data}: {exc}") from exc
        calibration: dict[str, Any] = {"source": "folder", "path": str(calib_data)}
        where = str(calib_data)
    else:
        train, recipe, dataset = _run_split(ckpt, prep, "train")
        calibration = {"source": "recipe", "path": str(recipe), "dataset": dataset, "split": "train"}
        where = f"the training split of {recipe} ({dataset})"
    chosen = _spread(range(len(train)), calib_images)
    calib, unreadable = _decode(train, chosen, prep)
    if calib is None:
        raise ValueError(f"calibration data {where}: none of the {len(chosen)} images tried could be read")
    calibration.update(images=len(calib), unreadable=unreadable)

    held: torch.Tensor | None = None
    try:
        val, recipe, _ = _run_split(ckpt, prep, "val")
        if len(val):
            held, _ = _decode(val, _spread(range(len(val)), check_images), prep)
            check = {"source": "recipe", "path": str(recipe), "split": "val",
                     "description": f"validation images of {recipe}"}
    except (ValueError, OSError) as exc:  # no recipe, no val split, data not on this machine
        log.info("int8 export: the run's validation images are not available (%s); checking on leftovers", exc)
    if held is None:
        used = set(chosen)
        left = [i for i in range(len(train)) if i not in used]
        held = _decode(train, _spread(left, check_images), prep)[0] if left else None
        check = {"source": calibration["source"], "path": calibration["path"],
                 "split": "train" if calib_data is None else "rest",
                 "description": f"images of {where} not used for calibration"}
    needed = min(check_images, MIN_CHECK_IMAGES)
    if held is None or len(held) < needed:
        raise ValueError(f"only {0 if held is None else len(held)} held-out images to check the INT8 model against "
                         f"fp32 (at least {needed} needed) and the run has no readable validation split: give "
                         f"--calib-data a folder with more than --calib-images ({calib_images}) images, or lower "
                         "--check-images")
    check["images"] = len(held)
    return Int8Images(calib, held, calibration, check)


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
