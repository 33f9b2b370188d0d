"""The training loop: ``train(recipe, out_dir)``, from data to checkpoints and curves.

Read top-down: :func:`train` → :func:`_setup` (checks, data, model, optimizer; nothing written yet) →
:func:`_restore` (a resumed run's state) → :func:`_open_run_folder` → per epoch :func:`_train_epoch` and
:func:`_end_epoch` (evaluate, log, checkpoint) → :func:`_finish`. The state they share is one :class:`Run`.
:class:`~vggnet.engine.hooks.TrainHooks` change the loss or the module trained (distillation, QAT).
Losses and accuracies are summed on the device; the host reads them every ``SYNC_EVERY`` steps (and when the
progress bar redraws), not every step. Progress (:func:`~vggnet.engine.evaluation.loop_bar`): a bar on a terminal;
off one, a line every 30 s with the epoch's and the run's time left, so a log shows a long run is alive.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vggnet.atomic import write_json
from vggnet.errors import UsageError, VggnetError
from vggnet.hardware import autocast_dtype
from vggnet.models import VGG, create_model, init_from_shallower, init_whitening, load_checkpoint

from . import distributed
from .artifacts import RunLogger, format_epoch_line, plot_confusion, plot_curves
from .checkpoint import list_checkpoints, load_training_state, rng_state, save_training_checkpoint, set_rng_state
from .evaluation import evaluate, loop_bar, to_device
from .finetune import Pretrained, freeze, load_pretrained, resolve_recipe
from .hooks import LossFn, TrainHooks
from .inputs import Inputs, build_inputs
from .lookahead import Lookahead
from .optim import build_optimizer, configure_batch_norm
from .recipe import Recipe, save_recipe
from .schedule import LRSchedule
from .tracking import Tracker, check_tracking, open_tracker

__all__ = ["LossFn", "ResumeError", "Run", "TrainHooks", "TrainingDiverged", "build_optimizer",
           "configure_batch_norm", "evaluate", "pick_precision", "train"]

SYNC_EVERY = 50  # steps between host reads of the running loss (the non-finite check)
WHITEN_IMAGES = 4096  # enough for a stable covariance of 3x3xC patches (millions of patches)


class ResumeError(VggnetError, ValueError):
    """A run folder whose checkpoint does not fit the requested model or data."""


class TrainingDiverged(VggnetError, FloatingPointError):
    """The training loss is no longer finite (a learning rate too high for the recipe)."""


def pick_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32 (:func:`vggnet.hardware.autocast_dtype`, shared with predict / serve)."""
    return autocast_dtype(requested, device)


@dataclass
class Run:
    """Everything the loop's steps share: what was built, and where the run stands."""

    recipe: Recipe
    out: Path
    env: distributed.Dist
    hooks: TrainHooks
    inputs: Inputs
    model: VGG  # the network, saved as model.safetensors
    module: nn.Module  # what the loop trains: ``model``, or what hooks.wrap_model made of it
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler
    ema: Any = None  # torch.optim.swa_utils.AveragedModel
    lookahead: Lookahead | None = None
    frozen_bn: list[str] = field(default_factory=list)  # names of BN layers kept in eval mode
    progress: bool = True  # False: no bar, no progress lines (epoch lines still print)
    started_from: dict[str, str] | None = None  # the weights file a fine-tuning run started from
    net: nn.Module | None = None  # ``module`` as called: under DDP and / or compiled
    start_epoch: int = 1
    resumed_from: Path | None = None  # the checkpoint folder a resumed run continues
    best: float = -math.inf
    step: int = 0
    resume_sums: torch.Tensor | None = None  # a run resumed inside an epoch: that epoch's running sums ...
    resume_batches: int = 0  # ... and the batches it had already trained on
    clock: tuple[float, int] = (0.0, 0)  # (time, step) when this process began training: the run's pace
    logger: RunLogger | None = None
    tracker: Tracker = field(default_factory=Tracker)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def wrapped(self) -> bool:
        return self.module is not self.model


def train(recipe: Recipe | Mapping[str, Any], out_dir: str | Path, resume: bool = True,
          progress: bool | None = None, hooks: TrainHooks | None = None) -> dict[str, Any]:
    """Train according to ``recipe``, writing everything into ``out_dir``; returns the final metrics.

    With ``resume`` (the default) an existing run folder continues from its newest complete checkpoint: model,
    optimizer, schedule, scaler, EMA, lookahead, epoch, RNG and data order are restored, and a line says so.
    ``progress``: None or True, a bar on a terminal and otherwise a line every 30 s (only once a loop has run
    that long); False, none. ``hooks``: see :mod:`vggnet.engine.hooks`.
    """
    recipe = Recipe.of(recipe)  # checked again: a caller may have changed fields since loading
    env = distributed.setup()
    try:
        out = Path(out_dir)
        ckpts = distributed.same_checkpoint(list_checkpoints(out) if resume else [], env)  # one choice, all ranks
        if not resume and any(out.glob("checkpoints/*")):
            raise ResumeError(f"{out} already holds checkpoints; pass a new --out or resume it")
        run = _setup(recipe, out, ckpts, env, hooks or TrainHooks(), progress is not False)
        if ckpts:
            _restore(run, ckpts[-1])
        _distribute(run)
        _open_run_folder(run, resuming=bool(ckpts))
        return _loop(run)
    finally:
        distributed.cleanup(env)


def _setup(recipe: Recipe, out: Path, ckpts: list[Path], env: distributed.Dist, hooks: TrainHooks,
           progress: bool) -> Run:
    """Everything a run needs, every check done (each can refuse); nothing is written here."""
    sync_bn_note = distributed.check_sync_bn(recipe.train.sync_bn, env)  # before data or run folder
    if sync_bn_note and env.main:
        print(sync_bn_note, file=sys.stderr, flush=True)
    recipe, pretrained = resolve_recipe(recipe, out / "recipe.yaml" if ckpts else None)
    check_tracking(recipe)  # a missing MLflow fails here, before any data is loaded
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed + env.rank)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    inputs = build_inputs(recipe, env)
    recipe = inputs.recipe or recipe  # with the values that depend on the data resolved
    if inputs.notes and env.main:
        print("fitted to the data (--set a key to choose it yourself):\n  " + "\n  ".join(inputs.notes), flush=True)
    hooks.check_inputs(inputs)
    model, frozen_bn = _build_model(recipe, inputs, pretrained, env)
    module = hooks.wrap_model(model, inputs)
    if module is not model:
        _refuse_with_wrapper(recipe, env)
    if t.checkpoint_every and not hasattr(inputs.train, "skipped_images"):
        raise UsageError("train.checkpoint_every needs data.format: shards (the loader that resumes inside an "
                         "epoch); write shards with `vggnet data shard` or set it to 0")
    optimizer = build_optimizer(module, recipe.optim)
    amp = pick_precision(t.precision, env.device)
    run = Run(recipe, out, env, hooks, inputs, model, module, optimizer,
              LRSchedule(recipe.schedule, recipe.optim.lr, len(inputs.train)), amp,
              torch.amp.GradScaler(env.device.type, enabled=amp is torch.float16), frozen_bn=frozen_bn,
              progress=progress, started_from=pretrained.meta if pretrained is not None else None)
    if t.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        run.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True)
    if t.lookahead:
        run.lookahead = Lookahead(model, t.lookahead, recipe.schedule.epochs * len(inputs.train))
    return run


def _build_model(recipe: Recipe, inputs: Inputs, pretrained: Pretrained | None,
                 env: distributed.Dist) -> tuple[VGG, list[str]]:
    """The VGG, initialised or loaded, frozen and on the device; and the frozen BN layers' names."""
    m, t = recipe.model, recipe.train
    assert m.name is not None and m.width is not None and m.head is not None and m.fc_width is not None  # resolved
    model = create_model(m.name, num_classes=len(inputs.classes), in_channels=inputs.in_channels, width=m.width,
                         head=m.head, dropout=m.dropout, fc_width=m.fc_width, init=m.init,
                         logit_scale=m.logit_scale, channels=m.channels)
    if pretrained is not None:
        note = load_pretrained(model, pretrained, inputs.classes)
        if env.main:
            print(note, flush=True)
    elif m.init_from:
        source, _ = load_checkpoint(m.init_from)
        init_from_shallower(model, source)
    elif m.whiten:
        init_whitening(model, _sample_inputs(inputs.train, WHITEN_IMAGES))
    configure_batch_norm(model, t.freeze_bn_scale, t.bn_momentum)
    frozen, frozen_bn = freeze(model, m.freeze, m.freeze_bn)
    if frozen and env.main:
        bn_note = f"; their {len(frozen_bn)} BN layers keep their statistics" if frozen_bn else ""
        print(f"frozen: {frozen[0]} .. {frozen[-1]} ({len(frozen)} layers){bn_note}", flush=True)
    model.to(env.device)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, frozen_bn


def _refuse_with_wrapper(recipe: Recipe, env: distributed.Dist) -> None:
    """What a module from hooks.wrap_model cannot be combined with: each works on the VGG itself."""
    t = recipe.train
    for on, what in ((t.ema, "train.ema (set 0)"), (t.lookahead, "train.lookahead (set 0)"),
                     (t.compile, "train.compile (set false)"), (t.channels_last, "train.channels_last (set false)"),
                     (env.enabled, "several processes (torchrun)")):
        if on:
            raise UsageError(f"this run trains a wrapped module, which does not support {what}")


def _sample_inputs(loader: Any, n: int) -> torch.Tensor:
    """The first ``n`` (augmented, normalised) training inputs; the tensor loader draws them from its own RNG."""
    parts, total = [], 0
    for images, _ in loader:
        parts.append(images.float().cpu())
        total += len(images)
        if total >= n:
            break
    return torch.cat(parts)[:n].contiguous()


def _restore(run: Run, folder: Path) -> None:
    """Continue from the checkpoint in ``folder``: every piece of state, so the run goes on as if never stopped."""
    saved, extra = load_checkpoint(folder / "model.safetensors")
    if saved.config != run.model.config:
        raise ResumeError(f"{folder} holds {saved.config}, but this run builds {run.model.config}; "
                          "resume with the same model settings or start a new --out folder")
    if extra.get("classes") != run.inputs.classes:
        raise ResumeError(f"{folder} was trained on classes {extra.get('classes')}, the data now has "
                          f"{run.inputs.classes}; point --data at the original data or start a new --out folder")
    run.model.load_state_dict(saved.state_dict())
    state = load_training_state(folder)
    if run.wrapped:
        run.hooks.load_state_dict(run.module, state["module"])
    run.started_from = extra.get("weights")
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    if run.lookahead is not None and state.get("lookahead") is not None:
        run.lookahead.load_state_dict(state["lookahead"])
    rank = run.env.rank
    loaders = state.get("loaders")  # every rank's position (a checkpoint inside an epoch)
    run.inputs.train.load_state_dict(loaders[rank] if loaders and rank < len(loaders) else state["loader"])
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    run.start_epoch, run.best = state["epoch"] + 1, state["best"]
    run.step = (run.start_epoch - 1) * len(run.inputs.train)
    if state.get("inside") is not None:  # stopped inside epoch start_epoch: go on from the step it reached
        run.step = int(state["inside"]["step"])
        run.resume_sums, run.resume_batches = state["inside"]["sums"], int(state["inside"]["batches"])
    run.resumed_from = folder


def _distribute(run: Run) -> None:
    """SyncBN, DDP and torch.compile: after the restore, which loads into the plain modules."""
    t, env = run.recipe.train, run.env
    if t.sync_bn and env.enabled:
        run.model = run.module = nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
    run.net = run.module
    if env.enabled:
        run.net = nn.parallel.DistributedDataParallel(
            run.module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if t.compile:
        # Dynamo keys its cache on VGG.forward's code object, shared by every VGG instance in the process:
        # a process that trains many models (`vggnet reproduce`) would hit the recompile limit at the ninth
        # and silently train eagerly. Earlier runs are finished, so their compiled graphs can go.
        torch.compiler.reset()
        run.net = torch.compile(run.net)


def _open_run_folder(run: Run, resuming: bool) -> None:
    """The first writes of the run (rank 0): recipe.yaml, the metrics files, the tracker; and the checkpoint meta."""
    inputs = run.inputs
    run.meta = {"classes": inputs.classes, "mean": inputs.mean, "std": inputs.std, "image_size": inputs.image_size,
                "recipe": run.recipe.description}
    if inputs.test_scale is not None:  # the validation view's shorter side: predict / serve / export resize to it
        run.meta["test_scale"] = int(inputs.test_scale)
    if run.started_from is not None:
        run.meta["weights"] = run.started_from
    if run.env.main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_recipe(run.recipe, run.out / "recipe.yaml")
        run.logger = RunLogger(run.out, tensorboard=run.recipe.train.tracking == "tensorboard")
        if run.logger.tensorboard_note:  # the default tracker without its optional package: say so, go on
            print(run.logger.tensorboard_note, file=sys.stderr, flush=True)
        run.logger.truncate(run.start_epoch - 1)
        run.tracker = open_tracker(run.recipe, run.out, resuming=resuming)


def _loop(run: Run) -> dict[str, Any]:
    epochs = run.recipe.schedule.epochs
    stop = min(epochs, run.recipe.train.stop_after_epoch or epochs)
    if run.start_epoch > stop and run.env.main:
        print(f"{run.out}: already trained to epoch {run.start_epoch - 1} of {epochs}; nothing to do", flush=True)
    elif run.resumed_from is not None and run.env.main:
        print(f"resuming {run.out} from epoch {run.start_epoch - 1} of {epochs} "
              f"({run.resumed_from.relative_to(run.out)}), continuing with epoch {run.start_epoch}"
              + (f" at batch {run.resume_batches + 1}" if run.resume_batches else ""), flush=True)
    run.clock = (time.perf_counter(), run.step)
    last: dict[str, Any] = {}
    try:
        for epoch in range(run.start_epoch, stop + 1):
            last = _end_epoch(run, epoch, _train_epoch(run, epoch))
        return _finish(run, last, complete=stop == epochs)
    except BaseException as exc:  # the MLflow run says it failed instead of staying RUNNING forever
        if run.env.main:
            run.tracker.fail("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _set_mode(run: Run, training: bool) -> None:
    run.hooks.set_mode(run.net if run.net is not None else run.module, training)
    if training and run.frozen_bn:
        layers = dict(run.model.named_layers())  # after any SyncBN swap
        for name in run.frozen_bn:
            layers[name].eval()


def _train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the training data; returns the epoch's training record (summed over ranks)."""
    env, train_data = run.env, run.inputs.train
    train_data.set_epoch(epoch)
    _set_mode(run, True)
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss x n, top-1 hits, n
    steps, every = run.resume_batches, run.recipe.train.checkpoint_every
    if run.resume_sums is not None:  # resumed inside this epoch: its record counts the batches before the stop
        sums += run.resume_sums.to(env.device)
    run.resume_sums, run.resume_batches = None, 0
    bar = loop_bar(len(train_data), f"epoch {epoch}/{run.recipe.schedule.epochs}", run.progress and env.main)
    bar.update(steps)
    t0, wait, lr = time.perf_counter(), 0.0, None
    # when the bar prints next (tqdm's clock); the host reads the loss for it at most once per interval
    due = math.inf if bar.disable else bar.start_t + max(bar.delay, bar.mininterval)
    batches = iter(train_data)
    while True:
        tw = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        images, targets = batch if batch is not None else (None, None)
        wait += time.perf_counter() - tw
        if images is not None:  # None: every file of the batch was unreadable (skipped and counted by the dataset)
            lr = _step(run, images, targets, sums)
            steps += 1
            if every and run.step % every == 0 and steps < len(train_data):
                _save_inside(run, epoch, steps, sums)
            redraw = time.time() >= due
            if redraw or steps % SYNC_EVERY == 0:  # the host reads the running sums only here
                mean_loss = _checked_loss(sums, epoch)
                if redraw:
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2g}", **_run_left(run, epoch), refresh=False)
                    due = time.time() + bar.mininterval
        bar.update()
    bar.close()
    sums = distributed.all_sum(sums, env)
    _checked_loss(sums, epoch)
    elapsed = time.perf_counter() - t0
    n = sums[2].item()
    return {"epoch": epoch, "epochs": run.recipe.schedule.epochs, "train_loss": sums[0].item() / n,
            "train_top1": 100 * sums[1].item() / n, "lr": lr if lr is not None else run.schedule.lr_at(run.step),
            "img_per_s": n / elapsed, "data_wait_frac": wait / elapsed, "epoch_time": elapsed}


def _run_left(run: Run, epoch: int) -> dict[str, str]:
    """The whole run's time left at the pace of this process so far (evaluations and checkpoints included), for
    the bar: its own estimate covers only the epoch. Nothing when this is the last epoch."""
    stop = min(run.recipe.schedule.epochs, run.recipe.train.stop_after_epoch or run.recipe.schedule.epochs)
    since, first_step = run.clock
    done = run.step - first_step
    if epoch >= stop or done <= 0:
        return {}
    left = (stop * len(run.inputs.train) - run.step) * (time.perf_counter() - since) / done
    return {"run_left": tqdm.format_interval(left)}


def _step(run: Run, images: torch.Tensor, targets: torch.Tensor, sums: torch.Tensor) -> float:
    """One optimizer step on one batch; adds its loss and top-1 hits to ``sums`` on the device. Returns the lr."""
    images, targets = to_device(images, targets, run.env.device, run.recipe.train.channels_last)
    lr = run.schedule.lr_at(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # optimizer states saved before lr_scale lack it
    with torch.autocast(run.env.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        logits = run.net(images)  # type: ignore[misc]
        if run.hooks.loss is None:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=run.recipe.optim.label_smoothing)
        else:
            loss = run.hooks.loss(logits.float(), targets, images)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.recipe.optim.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.module.parameters(), run.recipe.optim.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    run.step += 1
    if run.lookahead is not None:
        run.lookahead.after_step(run.step)
    n = targets.numel()
    sums[0] += loss.detach().double() * n
    sums[1] += (logits.detach().float().topk(1, dim=1).indices[:, 0] == targets).sum()
    sums[2] += n
    return lr


def _checked_loss(sums: torch.Tensor, epoch: int) -> float:
    """The running mean loss (a host sync), refusing a loss that is no longer finite."""
    total = sums[0].item()
    if not math.isfinite(total):
        raise TrainingDiverged(f"loss became {total} at epoch {epoch}; lower optim.lr")
    return total / max(1.0, sums[2].item())


def _end_epoch(run: Run, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
    """Evaluate, step the plateau schedule, log and checkpoint; returns the epoch's complete record."""
    env, inputs, t = run.env, run.inputs, run.recipe.train
    distributed.average_buffers(run.model, env)
    is_last = epoch == run.recipe.schedule.epochs
    if run.lookahead is not None and is_last:
        run.lookahead.finish()
    confusion = None
    if inputs.val is not None and (epoch % t.eval_every == 0 or is_last):
        metrics = evaluate(run.ema.module if run.ema is not None else run.module, inputs.val, len(inputs.classes),
                           env, run.amp, t.channels_last, flip=t.eval_flip, set_mode=run.hooks.set_mode,
                           progress=run.progress and env.main, desc=f"validation {epoch}/{run.recipe.schedule.epochs}")
        confusion = metrics.pop("confusion")
        record.update(metrics)
    # best = highest validation top-1 (training top-1 only for runs without validation data); epochs
    # skipped by eval_every cannot be best, or a training accuracy would beat every validation one
    score = record.get("val_top1", record["train_top1"] if inputs.val is None else -math.inf)
    if run.schedule.epoch_end(record.get("val_top1")):
        record["lr_drop"] = run.schedule.drops
    if inputs.val is None and inputs.keep_last:  # a folder too small to hold out images: the last epoch is kept
        is_best, run.best = True, score
    else:
        is_best = score > run.best
        run.best = max(run.best, score)
    state = _training_state(run, epoch)
    if env.main:
        _save_epoch(run, epoch, record, state, confusion, is_best)
    distributed.barrier(env)
    return record


def _training_state(run: Run, epoch: int) -> dict[str, Any]:
    """What a resume needs besides the weights (every rank takes part: the RNG states are gathered)."""
    state = {"optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
             "scaler": run.scaler.state_dict(), "ema": run.ema.state_dict() if run.ema is not None else None,
             "epoch": epoch, "best": run.best,
             "lookahead": run.lookahead.state_dict() if run.lookahead is not None else None,
             "loader": run.inputs.train.state_dict(), "rng": _gather_rng(run.env)}
    if run.wrapped:
        state["module"] = run.hooks.state_dict(run.module)
    return state


def _save_inside(run: Run, epoch: int, batches: int, sums: torch.Tensor) -> None:
    """A checkpoint inside ``epoch`` (``train.checkpoint_every``): the state, every rank's data position and the
    epoch's running sums, so a resumed run trains on exactly the batches this one had left."""
    env = run.env
    state = _training_state(run, epoch - 1)
    state["loaders"] = _gather(state["loader"], env)
    state["inside"] = {"step": run.step, "batches": batches, "sums": sums.detach().cpu()}
    if env.main:
        metrics = {"epoch": epoch - 1, "step": run.step}
        save_training_checkpoint(run.out, epoch - 1, run.model, run.ema.module if run.ema is not None else None,
                                 state, {**run.meta, "metrics": metrics}, False, run.recipe.train.keep,
                                 link=run.hooks.model_is_result, step=run.step)
    distributed.barrier(env)


def _save_epoch(run: Run, epoch: int, record: dict[str, Any], state: dict[str, Any],
                confusion: torch.Tensor | None, is_best: bool) -> None:
    """Rank 0's outputs of an epoch: metrics, tracker, checkpoint, plots and the console line."""
    assert run.logger is not None
    record["time"] = time.time()
    run.logger.log(record)
    run.tracker.log_epoch(record)
    metrics = {k: v for k, v in record.items() if k != "time"}
    save_training_checkpoint(run.out, epoch, run.model, run.ema.module if run.ema is not None else None, state,
                             {**run.meta, "metrics": metrics}, is_best, run.recipe.train.keep,
                             link=run.hooks.model_is_result)
    plot_curves(run.logger.records, run.out / "curves.png", title=f"{run.model.config.name} — {run.out.name}")
    if confusion is not None and is_best:
        plot_confusion(confusion, run.inputs.classes, run.out / "confusion.png", title=f"epoch {epoch}")
    print(format_epoch_line(record), flush=True)


def _finish(run: Run, last: dict[str, Any], complete: bool) -> dict[str, Any]:
    """final.json, the finish hook (a complete run only) and the tracker's artifacts; returns the final metrics."""
    result = {**last, "best_top1": run.best if math.isfinite(run.best) else None}  # None: nothing evaluated yet
    if not run.env.main:
        return result
    if last:
        write_json(run.out / "final.json", result)
    if run.logger is not None:
        run.logger.close()
    if complete:
        result.update(run.hooks.finish(run.module, run.out, run.inputs))
    run.tracker.finish(run.out)  # artifacts (curves, confusion, best checkpoint) once they are final
    return result


def _gather_rng(env: distributed.Dist) -> list[dict[str, Any]]:
    """Every rank's RNG state, so a resumed DDP run continues each rank's dropout stream."""
    return _gather(rng_state(), env)


def _gather(mine: Any, env: distributed.Dist) -> list[Any]:
    """Every rank's ``mine``, in rank order (rank 0 writes the checkpoint for all)."""
    if not env.enabled:
        return [mine]
    gathered: list[Any] = [None] * env.world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered
