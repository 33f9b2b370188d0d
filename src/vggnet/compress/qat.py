"""Quantization-aware training (QAT): fine-tune a trained VGG with INT8 rounding simulated, then convert to INT8.

Post-training quantization (the ``int8`` runtime) picks INT8 scales for a network that never saw rounding; QAT
lets the weights adapt to it. The PT2E steps (capture in training form, fake quantizers where
``X86InductorQuantizer`` puts INT8 ops, mode switching, observer calibration, convert) are
:mod:`vggnet.capture.pt2e`'s, shared with the PTQ runtime, so both end in the same q/dq graph and the same oneDNN
INT8 kernels. This module fine-tunes (SGD with momentum, cosine decay), measures fp32 / PTQ / QAT on the run's own
validation split, and saves.

Batch norm is folded into the convolutions first by default (``fold_bn``): its statistics are frozen during
fine-tuning, the usual end state of QAT (Krishnamoorthi 2018), and the q/dq graph is the one PTQ quantizes;
``fold_bn=False`` trains torchao's simulated conv-BN fusion, whose convert takes ~30 s longer.

What ``out_dir`` holds (every file written through :mod:`vggnet.atomic`):

* ``checkpoints/epoch-NNNN/state.pt``: prepared graph, optimizer, RNG, settings, baseline; a rerun continues after
  the last finished epoch (``epochs`` may grow).
* ``qat.pt2``: the INT8 model (``torch.export.save``, preprocessing in its ``vggnet.json``); :func:`load_qat` reads
  it. Inductor's INT8 kernels (``compile=True``) need torchao imported, which registers their lowering passes.
* ``metrics.json``: fp32, PTQ and QAT top-1, written last: its presence means the run finished.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vggnet.atomic import atomic_dir, atomic_path, write_json
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
from vggnet.engine import TrainingDiverged
from vggnet.engine.checkpoint import list_checkpoints, rng_state, set_rng_state
from vggnet.engine.distributed import Dist
from vggnet.engine.inputs import Inputs, build_inputs
from vggnet.engine.recipe import load_recipe
from vggnet.errors import UsageError, VggnetError
from vggnet.infer import Predictor, Preprocessing, make_runtime, top1_agreement
from vggnet.infer.runtimes import TorchRuntime
from vggnet.models import VGG, checkpoint_file, checkpoint_meta, count_macs, count_params, load_checkpoint

__all__ = ["QATResult", "QATSettings", "QuantizedModelError", "calibrate_qat", "convert_qat", "export_for_qat",
           "load_qat", "prepare_qat", "qat_finetune", "refuse_quantized", "set_qat_mode"]

RESULT_NAME, METRICS_NAME = "qat.pt2", "metrics.json"
SCHEME = ("static INT8, x86 Inductor: weights int8 symmetric per output channel, activations uint8 affine per "
          "tensor; fake-quantized fine-tuning (torchao PT2E QAT)")
TMP_PREFIX = ".qat."  # temporary results (atomic_path's ".qat.pt2.*.pt2"): hidden, never named like the result
STATE_KIND = "vggnet-qat"  # marks our epoch states, so a training run's folder is never taken for one
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
    raise UsageError(f"no recipe.yaml beside {file}: QAT rebuilds the training data from the run's recipe; "
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
        raise UsageError(f"{file} was trained on classes {list(prep.classes)[:10]}, the recipe's data has "
                         f"{inputs.classes[:10]}: pass the run folder it was trained in, or the matching --recipe")
    if len(inputs.classes) != model.config.num_classes:
        raise UsageError(f"{file} has {model.config.num_classes} outputs, the recipe's data {len(inputs.classes)} "
                         "classes")
    if prep.image_size != inputs.image_size or list(prep.mean) != list(inputs.mean) or \
            list(prep.std) != list(inputs.std):
        raise UsageError(f"{file} expects {prep.image_size}px inputs normalised with mean {list(prep.mean)}, std "
                         f"{list(prep.std)}; the recipe gives {inputs.image_size}px, {inputs.mean}, {inputs.std}")
    if inputs.val is None:
        raise UsageError("the recipe has no validation split (data.val_fraction = 0 and no val/ folder): QAT's "
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

def _save_epoch(out: Path, epoch: int, state: dict[str, Any]) -> Path:
    """``checkpoints/epoch-NNNN/state.pt``, whole or absent; only the newest :data:`KEEP` epochs stay."""
    final = out / "checkpoints" / f"epoch-{epoch:04d}"
    with atomic_dir(final) as tmp:
        torch.save(state, tmp / "state.pt")
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
            raise TrainingDiverged(f"QAT loss became {loss.item()} at epoch {epoch}; lower --lr")
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
        raise UsageError(f"{out} holds checkpoints of another kind of run (a training run?); QAT writes its own "
                         "folder: choose a new --out")
    saved = state["settings"]
    mine = settings.must_match()
    differ = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if differ:
        shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise UsageError(f"{out} holds a QAT run with other settings ({shown}); rerun with the same settings "
                         "(only --epochs may grow) or choose a new --out")
    if state["epoch"] > settings.epochs:
        raise UsageError(f"{out} is already fine-tuned for {state['epoch']} epochs, more than the {settings.epochs} "
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
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    settings = QATSettings(source="", source_sha256="", epochs=epochs, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, batch_size=batch_size or 1, calib_images=calib_images,
                           fold_bn=fold_bn, seed=seed)  # argument errors before any file is read
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; QAT writes a folder")
    if Path(ckpt).resolve() == out.resolve():
        raise UsageError(f"--out {out} is the source run folder; QAT writes a folder of its own")
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
    for stale in out.glob(f"{TMP_PREFIX}*") if out.is_dir() else []:  # a killed run's temporary result
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
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

    metrics = _finish(out, model, prep, settings, prepared, calib, inputs, compile,
                      {"baseline": baseline, "reference": reference, "history": history})
    return {**metrics, "trained_epochs": trained}


def _finish(out: Path, model: VGG, prep: Preprocessing, settings: QATSettings, prepared: nn.Module,
            calib: torch.Tensor, inputs: Inputs, compile: bool, run: dict[str, Any]) -> dict[str, Any]:
    """Convert, save ``qat.pt2`` (named so only once it is loaded back and measured) and write ``metrics.json``
    last: its presence marks a finished run. ``run`` holds the baseline, the fp32 reference and the history."""
    converted = convert_qat(prepared)
    val_batch = next(b for b in inputs.val if b is not None)[0].float()
    result_file = out / RESULT_NAME
    with atomic_path(result_file, suffix=".pt2") as tmp:  # torch.export.load wants the .pt2 suffix
        _save_result(converted, calib, tmp, _metadata(model, prep, settings, settings.epochs), val_batch[:8])
        t0 = time.perf_counter()
        qat_logits, labels = _predictions(load_qat(tmp, compile=compile).runtime, inputs.val)
        eval_s = time.perf_counter() - t0
    baseline = run["baseline"]
    metrics = {
        "method": "qat", "source": settings.source, "epochs": settings.epochs, "result": str(result_file),
        "top1": _top1(qat_logits, labels),  # the QAT INT8 model's: what this folder holds
        "fp32": baseline["fp32"], "ptq": baseline["ptq"],
        "qat": {"top1": _top1(qat_logits, labels),
                "agreement_with_fp32": float((qat_logits.argmax(1) == run["reference"]).float().mean()),
                "runtime": "inductor int8" if compile else "eager q/dq (fp32 reference arithmetic)",
                "eval_s": round(eval_s, 1)},
        "val_images": baseline["val_images"], "calib_images": len(calib),
        "params": count_params(model), "macs": count_macs(model.config, prep.image_size),
        "file_bytes": result_file.stat().st_size, "settings": asdict(settings), "history": run["history"],
        "preprocessing": prep.to_dict(),
    }
    write_json(out / METRICS_NAME, metrics)
    return metrics
