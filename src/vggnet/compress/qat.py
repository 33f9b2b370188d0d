"""Quantization-aware training (QAT): fine-tune a trained VGG with INT8 rounding simulated, then convert to INT8.

Post-training quantization (the ``int8`` runtime) picks INT8 scales for a network that never saw rounding; QAT
lets the weights adapt to it. The PT2E steps (capture in training form, fake quantizers where
``X86InductorQuantizer`` puts INT8 ops, mode switching, observer calibration, convert) are
:mod:`vggnet.capture.pt2e`'s, shared with the PTQ runtime, so both end in the same q/dq graph and the same oneDNN
INT8 kernels. The fine-tuning is :func:`vggnet.engine.train`'s loop, as distillation's is: the source run's recipe
(its data, split and augmentation) with QAT's settings (SGD with momentum, cosine decay, fp32, no EMA, lookahead,
compile or channels_last), and :class:`~vggnet.engine.hooks.TrainHooks` that train the prepared graph instead of
the VGG (:class:`_QATHooks`). This module adds what QAT has on top: fp32 / PTQ / QAT measured on the run's own
validation split, and the INT8 result.

Batch norm is folded into the convolutions first by default (``fold_bn``): its statistics are frozen during
fine-tuning, the usual end state of QAT (Krishnamoorthi 2018), and the q/dq graph is the one PTQ quantizes;
``fold_bn=False`` trains torchao's simulated conv-BN fusion, whose convert takes ~30 s longer.

What ``out_dir`` holds (every file written through :mod:`vggnet.atomic`):

* the training loop's run folder: ``recipe.yaml`` (the QAT recipe), ``metrics.jsonl`` / ``metrics.csv`` (the
  per-epoch record, ``val_top1`` being the fake-quantized graph's), ``curves.png``, ``final.json`` and
  ``checkpoints/epoch-NNNN/``, whose ``state.pt`` holds under ``module`` the prepared graph and the fp32 / PTQ
  baseline; a rerun continues after the last finished epoch (``epochs`` may grow). The loop also checkpoints the
  VGG it was given, the unchanged fp32 source, as ``model.safetensors``, but links no ``best`` / ``last.safetensors``
  to it (``TrainHooks.model_is_result=False``), so no tool takes the fp32 source for this folder's model.
* ``qat.json``: the :class:`QATSettings` a rerun must match; it marks the folder as QAT's.
* ``qat.pt2``: the INT8 model (``torch.export.save``, preprocessing in its ``vggnet.json``); :func:`load_qat` reads
  it. Inductor's INT8 kernels (``compile=True``) need torchao imported, which registers their lowering passes.
* ``metrics.json``: fp32, PTQ and QAT top-1, written last: its presence means the run finished.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggnet.atomic import atomic_path, file_sha256, write_json
from vggnet.capture.graph import export_program
from vggnet.capture.metadata import METADATA_FILE, export_metadata
from vggnet.capture.pt2e import (
    calibrate_qat,
    convert_qat,
    export_for_qat,
    load_torchao,
    prepare_qat,
    set_qat_mode,
)
from vggnet.capture.quiet import quiet_torchao
from vggnet.engine import Recipe, TrainHooks, train
from vggnet.engine.checkpoint import list_checkpoints
from vggnet.engine.inputs import Inputs
from vggnet.engine.recipe import ScheduleConfig, TrainConfig
from vggnet.errors import UsageError, VggnetError
from vggnet.evaluate import find_recipe
from vggnet.infer import Predictor, Preprocessing, make_runtime, top1_agreement
from vggnet.infer.runtimes import TorchRuntime
from vggnet.models import VGG, VGGConfig, checkpoint_file, checkpoint_meta, count_macs, count_params, load_checkpoint

__all__ = ["QATResult", "QATSettings", "QuantizedModelError", "calibrate_qat", "convert_qat", "export_for_qat",
           "load_qat", "prepare_qat", "qat_finetune", "refuse_quantized", "set_qat_mode"]

RESULT_NAME, METRICS_NAME, SETTINGS_NAME = "qat.pt2", "metrics.json", "qat.json"
ENGINE_LOG = "metrics.jsonl"  # the training loop's per-epoch records (vggnet.engine.artifacts.RunLogger)
SOURCE_LINKS = ("best.safetensors", "last.safetensors")  # what the loop links to the VGG it holds: QAT's source
SCHEME = ("static INT8, x86 Inductor: weights int8 symmetric per output channel, activations uint8 affine per "
          "tensor; fake-quantized fine-tuning (torchao PT2E QAT)")
TMP_PREFIX = ".qat."  # temporary results (atomic_path's ".qat.pt2.*.pt2"): hidden, never named like the result
STATE_KIND = "vggnet-qat"  # marks qat.json and QAT's part of a checkpoint, so a training run's folder is never one
KEEP = 2  # epoch checkpoints kept (a VGG-16's state with momentum is ~1 GB)
# What torch.export.load raises for an archive that is not a saved program.
_LOAD_ERRORS = (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile)


class QuantizedModelError(VggnetError, ValueError):
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
            raise UsageError(f"epochs must be an integer >= 1 (QAT fine-tunes at least one epoch), got {self.epochs}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UsageError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise UsageError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.calib_images < 1:
            raise UsageError(f"calib_images must be >= 1, got {self.calib_images}")

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
        _refuse_qat_folder(path)
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


def _refuse_qat_folder(path: Path) -> None:
    """A QAT output folder is marked by its ``qat.pt2`` or ``qat.json``, whatever else is in it (a killed run may
    still hold the loop's links to the fp32 source); one written before QAT trained through the loop, by its
    checkpoints and ``metrics.json`` without ``best`` / ``last.safetensors``."""
    metrics, record = path / METRICS_NAME, path / SETTINGS_NAME
    older = (path / "checkpoints").is_dir() and metrics.is_file() and \
        not any((path / name).is_file() for name in SOURCE_LINKS)
    if not ((path / RESULT_NAME).is_file() or record.is_file() or older):
        return
    origin = None
    with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
        origin = json.loads(metrics.read_text()).get("source") if metrics.is_file() else \
            json.loads(record.read_text())["settings"]["source"]
    raise _not_trainable(path, "a QAT output folder (its model is INT8)", origin)


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
        raise UsageError("the recipe's training split is empty")
    return torch.cat(parts)[:n].contiguous()


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
    with quiet_torchao():
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
            raise UsageError(f"{self.path.name}: expected a batch of shape N×{'×'.join(map(str, expected))}, "
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
    except _LOAD_ERRORS as exc:  # torch raises RuntimeError / SerializeError for foreign or damaged archives
        raise UsageError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(extra[METADATA_FILE])
        prep = Preprocessing.from_meta(meta["preprocessing"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: no vggnet metadata (not written by vggnet compress qat?): {exc}") from exc
    module = program.module()
    if compile:
        # torchao's import registers Inductor's INT8 weight-prepack passes; without them convs stay fp32
        load_torchao("quantization-aware training")
    runtime = TorchRuntime("qat-int8", torch.compile(module) if compile else module, compiled=compile)
    return QATResult(path, prep, runtime, meta, program)


def _metadata(model: VGG, prep: Preprocessing, settings: QATSettings, epochs_done: int) -> str:
    """The export metadata document (so ``vggnet.export.load_exported`` and ``vggnet serve`` read qat.pt2 too)."""
    return export_metadata(model, prep, settings.source, quantization={
        "method": "qat", "scheme": SCHEME, "tool": "torchao PT2E (X86InductorQuantizer)", "epochs": epochs_done,
        "lr": settings.lr, "fold_bn": settings.fold_bn,
        "calibration": f"{settings.calib_images} training images (initial ranges)"})


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
    drag its whole parent tensor (every calibration image) into the file. Saved through a file object, so the
    archive's root folder is ``archive``, not the temporary file's random name."""
    with torch.no_grad(), quiet_torchao():
        want = converted(check)
        _drop_unused_tensors(converted)
        program = export_program(converted, example[:2].clone())
    with open(tmp, "wb") as fh:
        torch.export.save(program, fh, extra_files={METADATA_FILE: metadata})
    got = load_qat(tmp).runtime(check)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= 1e-5:
        raise RuntimeError(f"the saved QAT program does not reproduce the converted graph (max relative error "
                           f"{err:.2g})")


# -------------------------------------------------------------------------------------------------- training

def _read_source(ckpt: str | os.PathLike) -> tuple[Path, VGGConfig, Preprocessing]:
    """The source checkpoint's file, architecture and preprocessing (its weights are the loop's to load)."""
    file = checkpoint_file(ckpt)
    model, extra = load_checkpoint(file)
    return file, model.config, Preprocessing.from_meta(checkpoint_meta(file, model, extra))


def _source_recipe(file: Path, recipe: str | os.PathLike | None) -> Recipe:
    """The recipe the checkpoint was trained with: its run folder's ``recipe.yaml`` (found as eval finds it),
    unless one is given."""
    found = recipe if recipe is not None else find_recipe(file)
    if found is None:
        raise UsageError(f"no recipe.yaml beside {file}: QAT rebuilds the training data from the run's recipe; "
                         "pass the run folder, or recipe= (--recipe NAME_OR_YAML) naming the recipe it was trained "
                         "with")
    return Recipe.load(found)


def _qat_recipe(base: Recipe, file: Path, config: VGGConfig, settings: QATSettings) -> Recipe:
    """``base`` (the source run's recipe: its data, split and augmentation) with QAT in place of its training:
    the source checkpoint's weights and architecture, SGD with momentum from ``settings`` decayed by a cosine to
    0, plain cross-entropy, fp32, no EMA, lookahead, compile or channels_last (the loop refuses them with a
    wrapped module), no tracker; every other training setting at its default, as QAT's own loop had them."""
    recipe = copy.deepcopy(base)
    m, o = recipe.model, recipe.optim
    m.weights, m.init_from, m.whiten, m.freeze, m.freeze_bn = str(file), None, False, None, False
    m.name, m.width, m.head, m.fc_width = config.name, config.width, config.head, config.fc_width
    m.dropout, m.logit_scale = config.dropout, config.logit_scale
    m.channels = None if config.channels is None else list(config.channels)
    o.name, o.lr, o.momentum, o.weight_decay = "sgd", settings.lr, settings.momentum, settings.weight_decay
    o.batch_size, o.label_smoothing, o.grad_clip = settings.batch_size, 0.0, 0.0
    o.bias_lr_scale, o.decay_biases, o.lr_mult = 1.0, False, None
    recipe.schedule = ScheduleConfig(name="cosine", epochs=settings.epochs)  # no warm-up, down to 0
    recipe.train = TrainConfig(precision="fp32", channels_last=False, seed=settings.seed, keep=KEEP,
                               tracking="none")
    return Recipe.of(recipe)


def _epochs_done(out: Path, settings: QATSettings) -> int:
    """How many epochs an earlier run in ``out`` finished (0: a fresh folder), its settings checked against
    ``settings`` before anything is built: the loop would otherwise continue it with other ones."""
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        return 0
    record: Any = None
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((out / SETTINGS_NAME).read_text())
    saved = record.get("settings") if isinstance(record, dict) and record.get("kind") == STATE_KIND else None
    if not isinstance(saved, dict):
        raise UsageError(f"{out} holds checkpoints of another kind of run (a training run, or QAT from an older "
                         "vggnet); QAT writes its own folder: choose a new --out")
    differ = {k: (saved.get(k), v) for k, v in settings.must_match().items() if saved.get(k) != v}
    if differ:
        shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise UsageError(f"{out} holds a QAT run with other settings ({shown}); rerun with the same settings "
                         "(only --epochs may grow) or choose a new --out")
    done = int(checkpoints[-1].name.removeprefix("epoch-"))
    if done > settings.epochs:
        raise UsageError(f"{out} is already fine-tuned for {done} epochs, more than the {settings.epochs} "
                         "asked for; pass --epochs >= that, or a new --out")
    return done


def _finished(out: Path, epochs: int) -> dict[str, Any] | None:
    """The metrics of a run in ``out`` that finished ``epochs`` epochs (its qat.pt2 beside them), else None."""
    with contextlib.suppress(OSError, ValueError):
        done = json.loads((out / METRICS_NAME).read_text())
        if isinstance(done, dict) and done.get("epochs") == epochs and (out / RESULT_NAME).is_file():
            return done
    return None


def _history(out: Path) -> list[dict[str, Any]]:
    """Every epoch's record from the loop's ``metrics.jsonl``, in the keys QAT's history has always had (the
    loop's validation top-1 is the fake-quantized graph's: it evaluates the prepared graph in eval form)."""
    records = []
    for line in (out / ENGINE_LOG).read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    keys = ("epoch", "train_loss", "train_top1", "lr", "epoch_time")
    return [{**{k: r.get(k) for k in keys}, "val_top1_fake_quant": r.get("val_top1")} for r in records]


def _on_cpu(model: VGG) -> VGG:
    """``model``, or a CPU copy: the PTQ runtime, the eager baseline and the saved INT8 model are x86 CPU ones."""
    return model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()


class _QATHooks:
    """QAT's part of :func:`vggnet.engine.train` (its :class:`~vggnet.engine.hooks.TrainHooks`): the loop trains
    the prepared graph that :meth:`wrap_model` makes of the source VGG, switches it with :func:`set_qat_mode`,
    checkpoints it with the fp32 / PTQ baseline (measured once, on a fresh run) and, once the last epoch is
    done, :meth:`finish` converts, saves and measures it."""

    def __init__(self, out: Path, config: VGGConfig, prep: Preprocessing, settings: QATSettings, done: int,
                 compile: bool) -> None:
        self.out, self.config, self.prep, self.settings, self.compile = out, config, prep, settings, compile
        self.fresh, self.trains = done == 0, done < settings.epochs
        self.model: VGG | None = None
        self.calib = torch.empty(0)
        self.baseline: dict[str, Any] = {}
        self.reference = torch.empty(0, dtype=torch.long)  # fp32's top-1 class per validation image
        self.metrics: dict[str, Any] = {}

    def hooks(self) -> TrainHooks:
        return TrainHooks(check_inputs=self.check_inputs, wrap_model=self.wrap_model, set_mode=self.set_mode,
                          state_dict=self.state_dict, load_state_dict=self.load_state_dict, finish=self.finish,
                          model_is_result=False)

    def check_inputs(self, inputs: Inputs) -> None:
        """The recipe's data must be what the checkpoint was trained on, with a validation split to measure on."""
        prep, file = self.prep, self.settings.source
        if prep.classes is not None and list(prep.classes) != list(inputs.classes):
            raise UsageError(f"{file} was trained on classes {list(prep.classes)[:10]}, the recipe's data has "
                             f"{inputs.classes[:10]}: pass the run folder it was trained in, or the matching --recipe")
        if len(inputs.classes) != self.config.num_classes:
            raise UsageError(f"{file} has {self.config.num_classes} outputs, the recipe's data "
                             f"{len(inputs.classes)} classes")
        if prep.image_size != inputs.image_size or list(prep.mean) != list(inputs.mean) or \
                list(prep.std) != list(inputs.std):
            raise UsageError(f"{file} expects {prep.image_size}px inputs normalised with mean {list(prep.mean)}, "
                             f"std {list(prep.std)}; the recipe gives {inputs.image_size}px, {inputs.mean}, "
                             f"{inputs.std}")
        if inputs.val is None:
            raise UsageError("the recipe has no validation split (data.val_fraction = 0 and no val/ folder): QAT's "
                             "result is its validation accuracy against fp32 and PTQ, so it needs one")

    def wrap_model(self, model: VGG, inputs: Inputs) -> nn.Module:
        """Export + prepare_qat; on a fresh run the fp32 / PTQ baseline and the observers' initial ranges, both
        from the same calibration images (a resumed run's come from its checkpoint)."""
        if model.config != self.config:
            raise UsageError(f"the recipe builds {model.config}, the checkpoint {self.settings.source} holds "
                             f"{self.config}")
        self.model = model
        if self.fresh:  # as before QAT used the loop: calibration draw and dropout masks follow from the seed alone
            torch.manual_seed(self.settings.seed)
        self.calib = _training_images(inputs, self.settings.calib_images)
        device = next(model.parameters()).device
        prepared = prepare_qat(model, self.calib.to(device), self.settings.fold_bn)
        if self.fresh:
            self.baseline = _baseline(_on_cpu(model), self.prep, self.calib, inputs.val)
            self.reference = self.baseline.pop("_reference")
            calibrate_qat(prepared, self.calib.to(device))
        self._open_folder()
        return prepared

    def _open_folder(self) -> None:
        """Before the loop writes: a killed run's temporary result goes, and so do the results of fewer epochs
        when more are trained (before they could mislead); then qat.json, the settings a rerun must match."""
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(f"{TMP_PREFIX}*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        if self.trains:
            for name in (METRICS_NAME, RESULT_NAME):
                (self.out / name).unlink(missing_ok=True)
        write_json(self.out / SETTINGS_NAME, {"kind": STATE_KIND, "settings": asdict(self.settings)})

    def set_mode(self, module: nn.Module, training: bool) -> None:
        set_qat_mode(module, train=training)

    def state_dict(self, module: nn.Module) -> dict[str, Any]:
        return {"kind": STATE_KIND, "graph": module.state_dict(), "baseline": self.baseline,
                "reference": self.reference}

    def load_state_dict(self, module: nn.Module, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise UsageError(f"{self.out} holds checkpoints of another kind of run; QAT writes its own folder: "
                             "choose a new --out")
        module.load_state_dict(state["graph"])
        self.baseline, self.reference = state["baseline"], state["reference"]

    def finish(self, module: nn.Module, out_dir: Path, inputs: Inputs) -> dict[str, Any]:
        """Convert, save ``qat.pt2`` (named so only once it is loaded back and measured) and write ``metrics.json``
        last: its presence marks a finished run."""
        assert self.model is not None  # wrap_model ran
        converted = convert_qat(self._cpu_graph(module))
        val_batch = next(b for b in inputs.val if b is not None)[0].float()
        result_file = out_dir / RESULT_NAME
        with atomic_path(result_file, suffix=".pt2") as tmp:  # torch.export.load wants the .pt2 suffix
            metadata = _metadata(self.model, self.prep, self.settings, self.settings.epochs)
            _save_result(converted, self.calib, tmp, metadata, val_batch[:8])
            t0 = time.perf_counter()
            qat_logits, labels = _predictions(load_qat(tmp, compile=self.compile).runtime, inputs.val)
            eval_s = time.perf_counter() - t0
        self.metrics = self._metrics(result_file, qat_logits, labels, eval_s)
        write_json(out_dir / METRICS_NAME, self.metrics)
        return self.metrics

    def _cpu_graph(self, prepared: nn.Module) -> nn.Module:
        """The prepared graph on the CPU, where x86 INT8 lives: a graph the loop trained on a GPU is prepared
        again from a CPU copy of the source and given the trained state (its recorded devices stay the GPU's)."""
        if all(t.device.type == "cpu" for t in (*prepared.parameters(), *prepared.buffers())):
            return prepared
        assert self.model is not None
        graph = prepare_qat(_on_cpu(self.model), self.calib, self.settings.fold_bn)
        graph.load_state_dict({k: v.cpu() for k, v in prepared.state_dict().items()})
        return graph

    def _metrics(self, result_file: Path, qat_logits: torch.Tensor, labels: torch.Tensor,
                 eval_s: float) -> dict[str, Any]:
        assert self.model is not None
        baseline, settings = self.baseline, self.settings
        return {
            "method": "qat", "source": settings.source, "epochs": settings.epochs, "result": str(result_file),
            "top1": _top1(qat_logits, labels),  # the QAT INT8 model's: what this folder holds
            "fp32": baseline["fp32"], "ptq": baseline["ptq"],
            "qat": {"top1": _top1(qat_logits, labels),
                    "agreement_with_fp32": float((qat_logits.argmax(1) == self.reference).float().mean()),
                    "runtime": "inductor int8" if self.compile else "eager q/dq (fp32 reference arithmetic)",
                    "eval_s": round(eval_s, 1)},
            "val_images": baseline["val_images"], "calib_images": len(self.calib),
            "params": count_params(self.model), "macs": count_macs(self.model.config, self.prep.image_size),
            "file_bytes": result_file.stat().st_size, "settings": asdict(settings), "history": _history(self.out),
            "preprocessing": self.prep.to_dict(),
        }


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
    without one), trained through :func:`vggnet.engine.train`. ``batch_size`` defaults to the recipe's. A rerun on
    the same ``out_dir`` resumes after the last finished epoch; with results already there for ``epochs`` it
    returns them without recomputing. ``trained_epochs`` (returned only) lists the epochs this call trained.
    """
    out = Path(out_dir)
    refuse_quantized(ckpt)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    QATSettings(source="", source_sha256="", epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                batch_size=batch_size or 1, calib_images=calib_images, fold_bn=fold_bn,
                seed=seed)  # argument errors before any file is read
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; QAT writes a folder")
    if Path(ckpt).resolve() == out.resolve():
        raise UsageError(f"--out {out} is the source run folder; QAT writes a folder of its own")
    file, config, prep = _read_source(ckpt)
    base = _source_recipe(file, recipe)
    settings = QATSettings(source=str(file), source_sha256=file_sha256(file), epochs=epochs, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, batch_size=int(batch_size or base.optim.batch_size),
                           calib_images=calib_images, fold_bn=fold_bn, seed=seed)
    done = _epochs_done(out, settings)
    finished = _finished(out, settings.epochs) if done == settings.epochs else None
    if finished is not None:
        print(f"{out}: already fine-tuned for {settings.epochs} epoch(s); results in {out / METRICS_NAME}", flush=True)
        return {**finished, "trained_epochs": []}
    hooks = _QATHooks(out, config, prep, settings, done, compile)
    train(_qat_recipe(base, file, config, settings), out, progress=progress, hooks=hooks.hooks())
    return {**hooks.metrics, "trained_epochs": list(range(done + 1, settings.epochs + 1))}
