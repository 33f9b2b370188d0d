"""Quantization-aware training (QAT): fine-tune a trained VGG with INT8 rounding simulated, then convert to INT8.

Post-training quantization (the ``int8`` runtime of :mod:`vggnet.infer.runtimes`) picks INT8 scales for a
network that never saw rounding. QAT lets the weights adapt to it: torchao's PT2E flow puts fake-quantize
modules (quantize → dequantize in fp32, straight-through gradients) where ``X86InductorQuantizer`` will put
real INT8 ops, the network trains a few epochs at a small learning rate, and ``convert_pt2e`` turns the fake
quantizers into the same q/dq graph the PTQ path produces, which Inductor lowers to oneDNN INT8 kernels.

The flow (torch 2.14, torchao 0.18; the PT2E API now lives in ``torchao.quantization.pt2e``, not ``torch.ao``):

1. ``torch.export.export(model.train(), ...).module()`` with a dynamic batch: an ATen graph, training form.
2. ``prepare_qat_pt2e(graph, X86InductorQuantizer().set_global(
   get_default_x86_inductor_quantization_config(is_qat=True)))``: per-channel symmetric int8 weights,
   per-tensor affine uint8 activations, moving-average min/max observers.
3. Observers are initialised on ``calib_images`` training images (the very images the PTQ baseline is
   calibrated on), then the graph is fine-tuned: SGD with momentum, cosine decay, cross-entropy.
4. ``convert_pt2e`` → re-exported as an ``ExportedProgram`` and saved with ``torch.export.save``.

An exported graph ignores ``.train()``/``.eval()`` (prepared ones even refuse them), so dropout and batch norm
are switched with torchao's ``move_exported_model_to_train``/``move_exported_model_to_eval``, and observers are
switched off whenever the graph is evaluated: they are independent of the mode, and would otherwise learn
their ranges from the validation images.

Batch norm is folded into the convolutions before export by default (``fold_bn``): BN statistics are then
frozen during fine-tuning, the usual end state of QAT (Krishnamoorthi 2018, "freeze BN statistics"), and the
q/dq graph is the one PTQ quantizes. The alternative, ``fold_bn=False``, trains torchao's simulated conv-BN
fusion with batch statistics; its ``convert_pt2e`` re-traces 96 fold patterns (~30 s on two cores, for any
model size), which is why it is not the default.

Everything is written to ``out_dir``:

* ``checkpoints/epoch-NNNN/state.pt``: the prepared graph's state dict (weights, observer and fake-quant
  buffers), optimizer, RNG, settings and the baseline results; assembled under a temporary name and renamed,
  so a killed run leaves the previous epoch intact. A rerun on the same ``out_dir`` continues after the last
  finished epoch (and ``epochs`` may be raised to train further).
* ``qat.pt2``: the INT8 model (``torch.export.save``), with the preprocessing in its ``vggnet.json`` extra file.
  Read it back with :func:`load_qat`: torch alone runs it (no calibration data); Inductor's INT8 kernels
  (``compile=True``) also need torchao imported, which registers their lowering passes: without it the compiled
  graph silently keeps fp32 convolutions between dequantize and quantize.
* ``metrics.json``: validation top-1 of the fp32 source, of its PTQ INT8 and of the QAT INT8 model, written last:
  its presence means the run finished.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vggnet.engine.checkpoint import list_checkpoints, rng_state, set_rng_state
from vggnet.engine.distributed import Dist
from vggnet.engine.inputs import Inputs, build_inputs
from vggnet.engine.recipe import load_recipe
from vggnet.infer import Predictor, Preprocessing, fold_batchnorm, make_runtime, top1_agreement
from vggnet.infer.runtimes import TorchRuntime
from vggnet.models import VGG, checkpoint_file, checkpoint_meta, count_macs, count_params, load_checkpoint

__all__ = ["QATResult", "QATSettings", "QuantizedModelError", "calibrate_qat", "convert_qat", "export_for_qat",
           "load_qat", "prepare_qat", "qat_finetune", "refuse_quantized", "set_qat_mode"]

RESULT_NAME, METRICS_NAME = "qat.pt2", "metrics.json"
METADATA_FILE = "vggnet.json"  # the extra file inside qat.pt2 holding the vggnet export metadata
# The document format of vggnet.export.common, so its parse_metadata reads qat.pt2's metadata too.
EXPORT_FORMAT, EXPORT_VERSION = "vggnet-export", 1
SCHEME = ("static INT8, x86 Inductor: weights int8 symmetric per output channel, activations uint8 affine per "
          "tensor; fake-quantized fine-tuning (torchao PT2E QAT)")
TMP_PREFIX = ".qat."  # temporary result folders: hidden, and never named like the result
STATE_KIND = "vggnet-qat"  # marks our epoch states, so a training run's folder is never taken for one
KEEP = 2  # epoch checkpoints kept (a VGG-16's state with momentum is ~1 GB)
_TRAINING = "_vggnet_qat_training"  # attribute: the form (training or eval) a prepared graph is in
CALIB_CHUNK = 16  # calibration forward passes, as the int8 runtime chunks them


class QuantizedModelError(ValueError):
    """A quantized or exported model given where a trainable fp32 checkpoint is needed."""


@dataclass(frozen=True)
class QATSettings:
    """What a QAT run is made of; a rerun on the same folder must match (``epochs`` may grow, and the source may be
    spelled another way: it is identified by its SHA-256)."""

    source: str
    source_sha256: str
    epochs: int = 2
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    calib_images: int = 256
    fold_bn: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1 (QAT fine-tunes at least one epoch), got {self.epochs}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.calib_images < 1:
            raise ValueError(f"calib_images must be >= 1, got {self.calib_images}")

    def must_match(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one: all but the number of epochs."""
        return {k: v for k, v in asdict(self).items() if k not in ("epochs", "source")}  # the hash names the file


# --------------------------------------------------------------------------------------------------- inputs

_EXPORT_SUFFIXES = {".onnx": "an ONNX model", ".pt2": "a .pt2 file (AOTInductor package or ExportedProgram)",
                    ".pt": "a TorchScript / torch file", ".ts": "a TorchScript file", ".jit": "a TorchScript file",
                    ".torchscript": "a TorchScript file", ".engine": "a TensorRT engine", ".tflite": "a TFLite model"}


def _not_trainable(path: Path, what: str, origin: str | None = None) -> QuantizedModelError:
    hint = f" (this one was made from {origin})" if origin else ""
    return QuantizedModelError(
        f"{path} is {what}: a quantized or exported model cannot be trained. QAT fine-tunes the fp32 network, so "
        f"pass the vggnet run folder or .safetensors checkpoint it was made from{hint}, e.g. --ckpt runs/demo")


def _zip_metadata(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The vggnet metadata stored in a .pt2 archive, if any, and its member names (no torch load needed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            for name in names:
                if name.endswith(f"/extra/{METADATA_FILE}"):
                    try:
                        return json.loads(zf.read(name)), names
                    except ValueError:
                        return None, names
            return None, names
    except (zipfile.BadZipFile, OSError):
        return None, []


def refuse_quantized(path: str | os.PathLike) -> None:
    """Raise :class:`QuantizedModelError` when ``path`` is a quantized or exported model rather than a checkpoint.

    Checked before anything is loaded, so passing ``qat.pt2`` (or an ONNX INT8 file, or a QAT output folder)
    back in gets an answer that says what to pass instead, not a safetensors parse error.
    """
    path = Path(path)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("best.safetensors", "last.safetensors")):
            metrics = path / METRICS_NAME
            if (path / RESULT_NAME).is_file() or (path / "checkpoints").is_dir() and metrics.is_file():
                origin = None
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    origin = json.loads(metrics.read_text()).get("source")
                raise _not_trainable(path, "a QAT output folder (its model is INT8)", origin)
        return
    if not path.is_file():
        return  # checkpoint_file gives the not-found error
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        _refuse_quantized_safetensors(path)
        return
    if suffix == ".onnx":
        head = path.read_bytes()[: 64 << 20]
        quantized = b"QuantizeLinear" in head or b"QLinearConv" in head or b"ConvInteger" in head
        raise _not_trainable(path, "an INT8 (quantized) ONNX model" if quantized else "an exported ONNX model")
    if zipfile.is_zipfile(path):
        meta, names = _zip_metadata(path)
        origin = meta.get("source") if isinstance(meta, dict) else None
        if isinstance(meta, dict) and meta.get("quantization"):
            raise _not_trainable(path, f"an INT8 model ({meta['quantization'].get('method', 'quantized')})", origin)
        if any("aotinductor" in n for n in names):
            raise _not_trainable(path, "a compiled AOTInductor package", origin)
        if any(n.endswith("models/model.json") for n in names):
            raise _not_trainable(path, "an exported program (torch.export)", origin)
        if suffix in _EXPORT_SUFFIXES:
            raise _not_trainable(path, _EXPORT_SUFFIXES[suffix], origin)
    elif suffix in _EXPORT_SUFFIXES:
        raise _not_trainable(path, _EXPORT_SUFFIXES[suffix])


def _refuse_quantized_safetensors(path: Path) -> None:
    """An integer weight or a scale/zero-point tensor: someone's quantized state dict, not a vggnet fp32 one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118  (safe_open is not a mapping)
                dtype = fh.get_slice(key).get_dtype()
                if dtype in ("I8", "U8") or key.endswith(("zero_point", "_scale", ".scale")):
                    raise _not_trainable(path, f"a quantized state dict ({key}: {dtype})")
    except SafetensorError:
        return  # load_checkpoint reports an unreadable file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_recipe(file: Path, recipe: str | os.PathLike | None) -> dict[str, Any]:
    """The recipe the checkpoint was trained with: its run folder's recipe.yaml (beside the file, or two levels up
    for ``checkpoints/epoch-NNNN/model.safetensors``), unless one is given."""
    if recipe is not None:
        return load_recipe(recipe)
    for folder in (file.parent, file.parent.parent.parent):
        if (folder / "recipe.yaml").is_file():
            return load_recipe(folder / "recipe.yaml")
    raise ValueError(f"no recipe.yaml beside {file}: QAT rebuilds the training data from the run's recipe; "
                     "pass the run folder, or recipe= (--recipe NAME_OR_YAML) naming the recipe it was trained with")


def _load_source(ckpt: str | os.PathLike, recipe: str | os.PathLike | None,
                 batch_size: int | None) -> tuple[Path, VGG, Preprocessing, Inputs]:
    """Model, preprocessing and the run's own data, checked against each other."""
    refuse_quantized(ckpt)
    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    prep = Preprocessing.from_meta(checkpoint_meta(file, model, extra))
    cfg = copy.deepcopy(_find_recipe(file, recipe))
    if batch_size is not None:
        cfg["optim"]["batch_size"] = int(batch_size)
    inputs = build_inputs(cfg, Dist())
    if prep.classes is not None and list(prep.classes) != list(inputs.classes):
        raise ValueError(f"{file} was trained on classes {list(prep.classes)[:10]}, the recipe's data has "
                         f"{inputs.classes[:10]}: pass the run folder it was trained in, or the matching --recipe")
    if len(inputs.classes) != model.config.num_classes:
        raise ValueError(f"{file} has {model.config.num_classes} outputs, the recipe's data {len(inputs.classes)} "
                         "classes")
    if prep.image_size != inputs.image_size or list(prep.mean) != list(inputs.mean) or \
            list(prep.std) != list(inputs.std):
        raise ValueError(f"{file} expects {prep.image_size}px inputs normalised with mean {list(prep.mean)}, std "
                         f"{list(prep.std)}; the recipe gives {inputs.image_size}px, {inputs.mean}, {inputs.std}")
    if inputs.val is None:
        raise ValueError("the recipe has no validation split (data.val_fraction = 0 and no val/ folder): QAT's "
                         "result is its validation accuracy against fp32 and PTQ, so it needs one")
    return file, model, prep, inputs


def _training_images(inputs: Inputs, n: int) -> torch.Tensor:
    """The first ``n`` training inputs of a fixed epoch (0: never a training epoch), augmented as in training,
    so QAT's initial ranges and the PTQ baseline see the same images."""
    inputs.train.set_epoch(0)
    parts, total = [], 0
    for batch in inputs.train:
        if batch is None:
            continue
        parts.append(batch[0].float().contiguous())
        total += len(batch[0])
        if total >= n:
            break
    if not parts:
        raise ValueError("the recipe's training split is empty")
    return torch.cat(parts)[:n].contiguous()


# ---------------------------------------------------------------------------------------------- the QAT graph

@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """torchao's import logs a pytree deprecation warning (an Enum registered the pre-2.14 way) and its pattern
    tracing warns about deprecated export internals: nothing a user can act on."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        pytree_log.setLevel(level)


def _torchao() -> Any:
    """torchao's PT2E modules, or a clear error naming the extra that provides them."""
    with _quiet_torchao():
        try:
            from torchao.quantization import pt2e
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
        except ImportError as exc:
            raise RuntimeError("quantization-aware training needs torchao: pip install 'vggnet[quant]'") from exc
    return pt2e, quantize_pt2e, xiq


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=1 << 16)


def export_for_qat(model: VGG, example: torch.Tensor, fold_bn: bool = True) -> nn.Module:
    """``model`` (a copy; BN folded into the convs unless ``fold_bn`` is False) captured in training form with a
    dynamic batch. Export failures become a ValueError that names the head, the only part that varies."""
    source = fold_batchnorm(model) if fold_bn else copy.deepcopy(model)
    source.train()
    if len(example) < 2:  # export specialises a batch of one to a constant
        example = example.repeat(2, 1, 1, 1)
    try:
        with _quiet_torchao():
            return torch.export.export(source, (example[:2].float().clone(),),
                                       dynamic_shapes=({0: _batch_dim()},)).module()
    except Exception as exc:  # torch.export raises many types (UserError, Unsupported, GuardOnDataDependent...)
        raise ValueError(f"{model.config.name} with the {model.config.head!r} head cannot be captured by "
                         f"torch.export for QAT ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         "; QAT needs an exportable graph: use a model with the fc, conv or gap head") from exc


def prepare_qat(model: VGG, example: torch.Tensor, fold_bn: bool = True) -> nn.Module:
    """The exported graph with fake quantizers where ``X86InductorQuantizer`` puts INT8 ops, in training form."""
    _, quantize_pt2e, xiq = _torchao()
    graph = export_for_qat(model, example, fold_bn)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
    with _quiet_torchao():
        prepared = quantize_pt2e.prepare_qat_pt2e(graph, quantizer)
    setattr(prepared, _TRAINING, True)  # exported from a model in training mode: already in training form
    return prepared


def set_qat_mode(prepared: nn.Module, train: bool) -> None:
    """Dropout and BN on in training, off otherwise; observers only learn ranges in training (and calibration).

    ``prepared.train()`` would raise (torchao forbids it on prepared graphs), and exported graphs have dropout
    and BN baked in, so torchao's graph rewrites do the switch."""
    pt2e, _, _ = _torchao()
    if getattr(prepared, _TRAINING, None) is not train:  # each rewrite re-traces its patterns: ~1 s, skip no-ops
        with _quiet_torchao():
            (pt2e.move_exported_model_to_train if train else pt2e.move_exported_model_to_eval)(prepared)
        setattr(prepared, _TRAINING, train)
    prepared.apply(pt2e.enable_observer if train else pt2e.disable_observer)


def calibrate_qat(prepared: nn.Module, images: torch.Tensor) -> None:
    """Initial activation ranges from calibration images: the eval-form graph (no dropout, BN running stats),
    observers on, no gradients."""
    pt2e, _, _ = _torchao()
    set_qat_mode(prepared, train=False)
    prepared.apply(pt2e.enable_observer)
    with torch.no_grad():
        for chunk in images.split(CALIB_CHUNK):
            prepared(chunk)
    prepared.apply(pt2e.disable_observer)


def convert_qat(prepared: nn.Module) -> torch.fx.GraphModule:
    """The INT8 q/dq graph of a fine-tuned prepared graph (which is left as it is, in eval form)."""
    _, quantize_pt2e, _ = _torchao()
    set_qat_mode(prepared, train=False)
    with _quiet_torchao():
        return quantize_pt2e.convert_pt2e(copy.deepcopy(prepared))


# ------------------------------------------------------------------------------------------------- evaluation

class _Padded:
    """A runtime fed fixed-size batches: the last, smaller batch is padded with its own first image, so a
    compiled runtime compiles once instead of again for a dynamic batch (tens of seconds per compile)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn, self.size = fn, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.size = max(self.size, len(x))
        n = len(x)
        if n < self.size:
            x = torch.cat([x, x[:1].expand(self.size - n, *x.shape[1:])])
        return self.fn(x.contiguous())[:n]


def _predictions(fn: Callable[[torch.Tensor], torch.Tensor], loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over the whole validation split, in order."""
    padded, logits, labels = _Padded(fn), [], []
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        logits.append(padded(images.float()).float())
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * float((logits.argmax(1) == labels).float().mean())


def _fake_quant_top1(prepared: nn.Module, loader: Any) -> float:
    """Validation top-1 of the fake-quantized graph (eval form, observers off): QAT's own estimate per epoch."""
    set_qat_mode(prepared, train=False)
    with torch.no_grad():
        return _top1(*_predictions(prepared, loader))


def _baseline(model: VGG, prep: Preprocessing, calib: torch.Tensor, loader: Any) -> dict[str, Any]:
    """fp32 (eager) and PTQ INT8 (the ``int8`` runtime, as ``vggnet predict --runtime int8`` builds it)."""
    reference, labels = _predictions(make_runtime("eager", model, prep), loader)
    t0 = time.perf_counter()
    with _quiet_torchao():
        ptq = make_runtime("int8", model, prep, calib)
        ptq_logits, _ = _predictions(ptq, loader)
    return {"fp32": {"top1": _top1(reference, labels)},
            "ptq": {"top1": _top1(ptq_logits, labels), "agreement_with_fp32": top1_agreement(ptq_logits, reference),
                    "build_and_eval_s": round(time.perf_counter() - t0, 1)},
            "val_images": len(labels), "_reference": reference.argmax(1)}


# ------------------------------------------------------------------------------------------- the saved result

@dataclass
class QATResult:
    """A saved ``qat.pt2`` read back: ``runtime`` maps normalised N×C×H×W batches to logits; ``prep`` and ``meta``
    come from the file itself, so it needs neither the source checkpoint nor calibration data."""

    path: Path
    prep: Preprocessing
    runtime: TorchRuntime
    meta: dict[str, Any]
    program: Any  # the torch.export.ExportedProgram

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.prep.in_channels, self.prep.image_size, self.prep.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected or not len(x):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.path.name}: expected a batch of shape N×{'×'.join(map(str, expected))}, "
                             f"got {shape}")
        return self.runtime(x.float().contiguous())

    def predictor(self, max_batch: int = 32) -> Predictor:
        """Labels and probabilities for raw images, preprocessed as the source checkpoint was."""
        predictor = Predictor(None, self.prep, self, max_batch=max_batch)
        predictor.source = self.path
        return predictor


def _register_quant_ops() -> None:
    """The ``quantized_decomposed`` ops a converted graph calls are defined by torch itself, but only once this
    module is imported; ``torch.export.load`` fails to resolve them before ("failed to resolve
    torch.ops.quantized_decomposed.dequantize_per_channel")."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401


def load_qat(path: str | os.PathLike, *, compile: bool = False) -> QATResult:
    """``qat.pt2`` (or a QAT output folder) as a runtime. ``compile`` lowers it with Inductor to oneDNN INT8
    kernels (the fast path, compiled on the first call); without it the q/dq graph runs eagerly in fp32
    reference arithmetic (slower, no compiler needed, the same predictions up to rounding)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"QAT result not found: {path}")
    _register_quant_ops()
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError / SerializeError for foreign or damaged archives
        raise ValueError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(extra[METADATA_FILE])
        prep = Preprocessing.from_meta(meta["preprocessing"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: no vggnet metadata (not written by vggnet compress qat?): {exc}") from exc
    module = program.module()
    if compile:
        _torchao()  # its import registers Inductor's INT8 weight-prepack passes; without them convs stay fp32
    runtime = TorchRuntime("qat-int8", torch.compile(module) if compile else module, compiled=compile)
    return QATResult(path, prep, runtime, meta, program)


def _metadata(model: VGG, prep: Preprocessing, settings: QATSettings, epochs_done: int) -> str:
    return json.dumps({
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "preprocessing": prep.to_dict(),
        "model": model.config.to_dict(), "source": settings.source, "torch": torch.__version__,
        "quantization": {"method": "qat", "scheme": SCHEME, "tool": "torchao PT2E (X86InductorQuantizer)",
                         "epochs": epochs_done, "lr": settings.lr, "fold_bn": settings.fold_bn,
                         "calibration": f"{settings.calib_images} training images (initial ranges)"},
    }, sort_keys=True)


def _drop_unused_tensors(graph: torch.fx.GraphModule) -> None:
    """Remove the parameters and buffers the graph no longer reads.

    ``convert_pt2e`` folds each fp32 weight into an int8 constant but leaves the fp32 parameter registered, and
    ``torch.export`` lifts every registered tensor into the program: the saved file would carry the fp32 weights
    next to the int8 ones, five times the size of the INT8 model."""
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    named = [*graph.named_parameters(remove_duplicate=False), *graph.named_buffers(remove_duplicate=False)]
    for name, _ in named:
        if name in used:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = graph.get_submodule(owner_name) if owner_name else graph
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)


def _save_result(converted: torch.fx.GraphModule, example: torch.Tensor, tmp: Path, metadata: str,
                 check: torch.Tensor) -> None:
    """Re-export the converted graph, save it to ``tmp``, load it back and compare: the caller renames it to
    qat.pt2 only once it is measured, so a file named qat.pt2 is always a whole, loadable, correct one (and the
    one ``metrics.json`` describes). The example is cloned because the program stores it, and a slice would
    drag its whole parent tensor (every calibration image) into the file."""
    with torch.no_grad(), _quiet_torchao():
        want = converted(check)
        _drop_unused_tensors(converted)
        program = torch.export.export(converted, (example[:2].clone(),), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, tmp, extra_files={METADATA_FILE: metadata})
    got = load_qat(tmp).runtime(check)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= 1e-5:
        raise RuntimeError(f"the saved QAT program does not reproduce the converted graph (max relative error "
                           f"{err:.2g})")


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- training

def _save_epoch(out: Path, epoch: int, state: dict[str, Any]) -> Path:
    """``checkpoints/epoch-NNNN/state.pt`` assembled in a temporary folder and renamed: whole or absent."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"epoch-{epoch:04d}", root / f".tmp-epoch-{epoch:04d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _optimizer(prepared: nn.Module, settings: QATSettings) -> torch.optim.Optimizer:
    """SGD with momentum; decay (if any) on weights only, as in training."""
    params = [p for p in prepared.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=settings.lr, momentum=settings.momentum)


def _cosine(settings: QATSettings, step: int, total: int) -> float:
    return settings.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


def _train_epoch(prepared: nn.Module, optimizer: torch.optim.Optimizer, inputs: Inputs, settings: QATSettings,
                 epoch: int, progress: bool) -> dict[str, float]:
    steps = len(inputs.train)
    total, step = settings.epochs * steps, (epoch - 1) * steps
    inputs.train.set_epoch(epoch)
    set_qat_mode(prepared, train=True)
    sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, count
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=f"qat epoch {epoch}/{settings.epochs}", disable=not progress, leave=False,
               dynamic_ncols=True)
    lr = settings.lr
    for batch in inputs.train:
        bar.update()
        if batch is None:  # every file of the batch was unreadable
            continue
        images, targets = batch
        lr = _cosine(settings, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = prepared(images.float().contiguous())
        loss = F.cross_entropy(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"QAT loss became {loss.item()} at epoch {epoch}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        n = targets.numel()
        sums += torch.tensor([loss.item() * n, float((logits.detach().argmax(1) == targets).sum()), n],
                             dtype=torch.float64)
        bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.3f}", lr=f"{lr:.2g}", refresh=False)
    bar.close()
    count = max(1.0, sums[2].item())
    return {"epoch": epoch, "train_loss": sums[0].item() / count, "train_top1": 100 * sums[1].item() / count,
            "lr": lr, "epoch_time": time.perf_counter() - t0}


def _resume(out: Path, settings: QATSettings) -> dict[str, Any] | None:
    """The newest finished epoch's state, checked against ``settings``; None for a fresh folder."""
    ckpts = list_checkpoints(out)
    if not ckpts:
        return None
    state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
        raise ValueError(f"{out} holds checkpoints of another kind of run (a training run?); QAT writes its own "
                         "folder: choose a new --out")
    saved = state["settings"]
    mine = settings.must_match()
    differ = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if differ:
        shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"{out} holds a QAT run with other settings ({shown}); rerun with the same settings "
                         "(only --epochs may grow) or choose a new --out")
    if state["epoch"] > settings.epochs:
        raise ValueError(f"{out} is already fine-tuned for {state['epoch']} epochs, more than the {settings.epochs} "
                         "asked for; pass --epochs >= that, or a new --out")
    return state


def qat_finetune(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *, epochs: int = 2, lr: float = 1e-3,
                 batch_size: int | None = None, calib_images: int = 256, momentum: float = 0.9,
                 weight_decay: float = 0.0, fold_bn: bool = True, recipe: str | os.PathLike | None = None,
                 compile: bool = True, seed: int = 0, progress: bool | None = None) -> dict[str, Any]:
    """Fine-tune the fp32 checkpoint ``ckpt`` with fake INT8 quantization, convert it, and compare it with PTQ.

    Returns (and writes to ``out_dir/metrics.json``) the validation top-1 of ``fp32`` (the source), ``ptq`` (the
    ``int8`` runtime calibrated on ``calib_images`` training images) and ``qat`` (the saved ``qat.pt2``), each
    INT8 one with its top-1 agreement with fp32. ``compile`` evaluates the QAT model with Inductor's INT8 kernels,
    as the PTQ runtime always is; False runs its q/dq graph eagerly (fp32 reference arithmetic, no compile).

    The training and validation data are the run's own (its ``recipe.yaml``; ``recipe`` for a checkpoint
    without one). ``batch_size`` defaults to the recipe's. A rerun on the same ``out_dir`` resumes after the last
    finished epoch; with results already there for ``epochs`` it returns them without recomputing.
    """
    out = Path(out_dir)
    refuse_quantized(ckpt)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = QATSettings(source="", source_sha256="", epochs=epochs, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, batch_size=batch_size or 1, calib_images=calib_images,
                           fold_bn=fold_bn, seed=seed)  # argument errors before any file is read
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; QAT writes a folder")
    if Path(ckpt).resolve() == out.resolve():
        raise ValueError(f"--out {out} is the source run folder; QAT writes a folder of its own")
    progress = sys.stderr.isatty() if progress is None else progress
    file, model, prep, inputs = _load_source(ckpt, recipe, batch_size)
    settings = QATSettings(source=str(file), source_sha256=_sha256(file), epochs=epochs, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, batch_size=int(batch_size or inputs.train.batch_size),
                           calib_images=calib_images, fold_bn=fold_bn, seed=seed)
    state = _resume(out, settings)
    metrics_file = out / METRICS_NAME
    if state is not None and state["epoch"] == settings.epochs and metrics_file.is_file():
        done = json.loads(metrics_file.read_text())
        if done.get("epochs") == settings.epochs and (out / RESULT_NAME).is_file():
            print(f"{out}: already fine-tuned for {settings.epochs} epoch(s); results in {metrics_file}", flush=True)
            return {**done, "trained_epochs": []}

    torch.manual_seed(seed)
    calib = _training_images(inputs, settings.calib_images)
    prepared = prepare_qat(model, calib, settings.fold_bn)
    optimizer = _optimizer(prepared, settings)
    if state is None:
        baseline = _baseline(model, prep, calib, inputs.val)
        reference = baseline.pop("_reference")
        calibrate_qat(prepared, calib)
        history: list[dict[str, Any]] = []
        start = 1
    else:
        prepared.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        baseline, reference, history = state["baseline"], state["reference"], list(state["history"])
        start = state["epoch"] + 1
        print(f"{out}: resuming QAT after epoch {state['epoch']}", flush=True)

    trained: list[int] = []
    for stale in out.glob(f"{TMP_PREFIX}*.tmp") if out.is_dir() else []:  # a killed run's temporary result
        shutil.rmtree(stale, ignore_errors=True)
    if start <= settings.epochs:  # results of fewer epochs are superseded: gone before they could mislead
        for name in (METRICS_NAME, RESULT_NAME):
            (out / name).unlink(missing_ok=True)
    for epoch in range(start, settings.epochs + 1):
        record = _train_epoch(prepared, optimizer, inputs, settings, epoch, progress)
        record["val_top1_fake_quant"] = _fake_quant_top1(prepared, inputs.val)
        history.append(record)
        _save_epoch(out, epoch, {"kind": STATE_KIND, "epoch": epoch, "model": prepared.state_dict(),
                                 "optimizer": optimizer.state_dict(), "settings": asdict(settings),
                                 "rng": rng_state(), "baseline": baseline, "reference": reference,
                                 "history": history})
        trained.append(epoch)
        print(f"qat epoch {epoch}/{settings.epochs}: train loss {record['train_loss']:.4f}, fake-quant val top-1 "
              f"{record['val_top1_fake_quant']:.2f} % ({record['epoch_time']:.1f} s)", flush=True)

    converted = convert_qat(prepared)
    val_batch = next(b for b in inputs.val if b is not None)[0].float()
    result_file = out / RESULT_NAME
    out.mkdir(parents=True, exist_ok=True)
    # written as qat.pt2 in a hidden folder (torch.export.save names the archive's root after the file, and
    # mkstemp's 0600 mode would stay on the result), then moved into place
    tmp_dir = out / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp_dir.mkdir()
    tmp = tmp_dir / RESULT_NAME
    try:
        _save_result(converted, calib, tmp, _metadata(model, prep, settings, settings.epochs), val_batch[:8])
        t0 = time.perf_counter()
        qat_logits, labels = _predictions(load_qat(tmp, compile=compile).runtime, inputs.val)
        eval_s = time.perf_counter() - t0
        os.replace(tmp, result_file)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    metrics = {
        "method": "qat", "source": settings.source, "epochs": settings.epochs, "result": str(result_file),
        "top1": _top1(qat_logits, labels),  # the QAT INT8 model's: what this folder holds
        "fp32": baseline["fp32"], "ptq": baseline["ptq"],
        "qat": {"top1": _top1(qat_logits, labels),
                "agreement_with_fp32": float((qat_logits.argmax(1) == reference).float().mean()),
                "runtime": "inductor int8" if compile else "eager q/dq (fp32 reference arithmetic)",
                "eval_s": round(eval_s, 1)},
        "val_images": baseline["val_images"], "calib_images": len(calib),
        "params": count_params(model), "macs": count_macs(model.config, prep.image_size),
        "file_bytes": result_file.stat().st_size, "settings": asdict(settings), "history": history,
        "preprocessing": prep.to_dict(),
    }
    _atomic_json(metrics_file, metrics)  # last: its presence marks a finished run
    return {**metrics, "trained_epochs": trained}
