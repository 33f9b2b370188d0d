"""The training loop: one function, ``train(recipe, out_dir)``, from data to checkpoints and curves.

Kept on a few screens on purpose (nanoGPT style): setup, then ``for epoch: train; evaluate; save``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vggnet.hardware import autocast_dtype
from vggnet.models import VGG, create_model, init_from_shallower, init_whitening, load_checkpoint

from . import distributed
from .artifacts import RunLogger, confusion_matrix, format_epoch_line, plot_confusion, plot_curves, topk_correct
from .checkpoint import (
    list_checkpoints,
    load_training_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from .finetune import freeze, load_pretrained, lr_multipliers, resolve_recipe
from .inputs import Inputs, build_inputs
from .lookahead import Lookahead
from .recipe import Recipe, save_recipe
from .schedule import LRSchedule
from .tracking import Tracker, check_tracking, open_tracker


class ResumeError(ValueError):
    """A run folder whose checkpoint does not fit the requested model or data."""


def pick_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto`` uses bf16 where the hardware runs it natively (the rule
    ``vggnet predict`` / ``serve --precision auto`` share, :func:`vggnet.hardware.autocast_dtype`)."""
    return autocast_dtype(requested, device)


def build_optimizer(model: VGG, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (heavy-ball or Nesterov) or AdamW; no weight decay on biases and BN, as is usual.

    ``bias_lr_scale`` runs the 1-D parameters (biases, BN) at a multiple of the learning rate (each
    group's ``lr_scale``, applied by the loop); ``decay_biases`` decays them too, at the same per-step
    rate as the weights (PyTorch's decay is lr x weight_decay, so their coefficient is divided by the scale).
    ``lr_mult`` (fine-tuning) multiplies the rate of parts of the network: one pair of groups per value.
    Frozen parameters (``requires_grad=False``) are in no group, so no update or decay can touch them.
    """
    mults = lr_multipliers(model, cfg.get("lr_mult"))
    pairs: dict[float, tuple[list, list]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay, no_decay = pairs.setdefault(mults[name], ([], []))
            (no_decay if p.ndim <= 1 else decay).append(p)
    scale = float(cfg["bias_lr_scale"])
    bias_decay = cfg["weight_decay"] / scale if cfg["decay_biases"] else 0.0
    groups = []
    for mult in sorted(pairs, reverse=True):  # 1.0 first: the group order of runs saved before lr_mult
        decay, no_decay = pairs[mult]
        groups += [{"params": decay, "weight_decay": cfg["weight_decay"], "lr_scale": mult},
                   {"params": no_decay, "weight_decay": bias_decay, "lr_scale": scale * mult}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no parameter left to train: model.freeze covers every layer")
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) else {}
    name = cfg["name"]
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=name == "nesterov", **fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), **fused)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, nesterov or adamw")


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, env: distributed.Dist, amp: torch.dtype | None,
             channels_last: bool, flip: bool = False) -> dict[str, Any]:
    """Loss, top-1/top-5 accuracy and confusion matrix over the (possibly sharded) validation set.

    With ``flip`` also the accuracy of softmax averaged over the image and its mirror (the paper's
    test-time flip), reported separately as ``val_top1_flip`` so the plain figure stays comparable.
    """
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top1, top5, count, top1 with flip
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in loader:
        if batch is None:
            continue
        images, targets = _to_device(*batch, env.device, channels_last)
        with torch.autocast(env.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images).float()
        correct = topk_correct(logits, targets, (1, 5))
        flipped = 0
        if flip:
            with torch.autocast(env.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                mirror = model(images.flip(3)).float()
            flipped = topk_correct(logits.softmax(1) + mirror.softmax(1), targets, (1,))[1]
        sums += torch.tensor([F.cross_entropy(logits, targets, reduction="sum").item(), correct[1], correct[5],
                              targets.numel(), flipped], dtype=torch.float64)
        confusion += confusion_matrix(logits.argmax(1).cpu(), targets.cpu(), num_classes)
    sums, confusion = distributed.all_sum(sums, env), distributed.all_sum(confusion, env)
    n = max(1.0, sums[3].item())
    out = {"val_loss": sums[0].item() / n, "val_top1": 100 * sums[1].item() / n,
           "val_top5": 100 * sums[2].item() / n, "confusion": confusion}
    if flip:
        out["val_top1_flip"] = 100 * sums[4].item() / n
    return out


def configure_batch_norm(model: nn.Module, freeze_scale: bool, momentum: float | None) -> None:
    """Fast small-image recipes fix every BN scale at 1 (only the shift learns, at a high lr) and use a
    larger running-stat momentum, since a short run has few steps to settle the statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if freeze_scale and m.weight is not None:
                m.weight.requires_grad_(False)
            if momentum is not None:
                m.momentum = float(momentum)


def _to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


WHITEN_IMAGES = 4096  # enough for a stable covariance of 3x3xC patches (millions of patches)


def _sample_inputs(loader, n: int) -> torch.Tensor:
    """The first ``n`` (augmented, normalised) training inputs; the tensor loader draws them from its own RNG."""
    parts, total = [], 0
    for images, _ in loader:
        parts.append(images.float().cpu())
        total += len(images)
        if total >= n:
            break
    return torch.cat(parts)[:n].contiguous()


def _check_resume(folder: Path, model: VGG, inputs: Inputs) -> tuple[dict[str, Any], dict[str, Any]]:
    saved, extra = load_checkpoint(folder / "model.safetensors")
    if saved.config != model.config:
        raise ResumeError(f"{folder} holds {saved.config}, but this run builds {model.config}; "
                          "resume with the same model settings or start a new --out folder")
    if extra.get("classes") != inputs.classes:
        raise ResumeError(f"{folder} was trained on classes {extra.get('classes')}, the data now has "
                          f"{inputs.classes}; point --data at the original data or start a new --out folder")
    model.load_state_dict(saved.state_dict())
    return load_training_state(folder), extra


# (logits, targets, inputs) -> the loss to minimise; inputs are the batch the model saw (a teacher can see it too).
# A loss with a ``check_inputs(inputs: Inputs)`` method is shown the data before anything trains (and can refuse).
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train(recipe: Recipe, out_dir: str | Path, resume: bool = True, progress: bool | None = None,
          loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Train according to ``recipe``, writing everything into ``out_dir``; returns the final metrics.

    With ``resume`` (the default) an existing run folder continues from its newest complete
    checkpoint: model, optimizer, schedule, scaler, EMA, lookahead, epoch, RNG and data order are restored.
    ``loss_fn`` replaces the cross-entropy of the training steps (knowledge distillation passes one; it runs
    inside the same autocast region as the model). Validation loss stays the plain cross-entropy.
    """
    env = distributed.setup()
    try:
        return _train(recipe, Path(out_dir), resume, progress, env, loss_fn)
    finally:
        distributed.cleanup(env)


def _train(recipe: Recipe, out: Path, resume: bool, progress: bool | None, env: distributed.Dist,
           loss_fn: LossFn | None = None) -> dict[str, Any]:
    sync_bn_note = distributed.check_sync_bn(bool(recipe["train"]["sync_bn"]), env)  # before data or run folder
    if sync_bn_note and env.main:
        print(sync_bn_note, file=sys.stderr, flush=True)
    ckpts = list_checkpoints(out) if resume else []
    recipe, pretrained = resolve_recipe(recipe, out / "recipe.yaml" if ckpts else None)
    tcfg, ocfg, scfg, mcfg = recipe["train"], recipe["optim"], recipe["schedule"], recipe["model"]
    check_tracking(recipe)  # a missing MLflow fails here, before any data is loaded
    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    torch.manual_seed(tcfg["seed"] + env.rank)
    if tcfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    progress = sys.stderr.isatty() if progress is None else progress

    inputs = build_inputs(recipe, env)
    if loss_fn is not None and hasattr(loss_fn, "check_inputs"):
        loss_fn.check_inputs(inputs)
    model = create_model(mcfg["name"], num_classes=len(inputs.classes), in_channels=inputs.in_channels,
                         width=mcfg["width"], head=mcfg["head"], dropout=mcfg["dropout"],
                         fc_width=mcfg["fc_width"], init=mcfg["init"], logit_scale=mcfg["logit_scale"],
                         channels=mcfg["channels"])
    if pretrained is not None:
        note = load_pretrained(model, pretrained, inputs.classes)
        if env.main:
            print(note, flush=True)
    elif mcfg["init_from"]:
        source, _ = load_checkpoint(mcfg["init_from"])
        init_from_shallower(model, source)
    elif mcfg["whiten"]:
        init_whitening(model, _sample_inputs(inputs.train, WHITEN_IMAGES))
    configure_batch_norm(model, tcfg["freeze_bn_scale"], tcfg["bn_momentum"])
    frozen, frozen_bn = freeze(model, mcfg["freeze"], mcfg["freeze_bn"])
    if frozen and env.main:
        bn_note = f"; their {len(frozen_bn)} BN layers keep their statistics" if frozen_bn else ""
        print(f"frozen: {frozen[0]} .. {frozen[-1]} ({len(frozen)} layers){bn_note}", flush=True)
    model.to(env.device)
    if tcfg["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    channels_last = bool(tcfg["channels_last"])
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, ocfg)
    schedule = LRSchedule(scfg, ocfg["lr"], len(inputs.train))
    amp = pick_precision(tcfg["precision"], env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp is torch.float16)
    ema = None
    if tcfg["ema"]:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg["ema"]), use_buffers=True)
    lookahead = Lookahead(model, int(tcfg["lookahead"]), scfg["epochs"] * len(inputs.train)) \
        if tcfg["lookahead"] else None

    start_epoch, best = 1, -math.inf
    started_from = pretrained.meta if pretrained is not None else None
    if ckpts:
        state, saved_extra = _check_resume(ckpts[-1], model, inputs)
        started_from = saved_extra.get("weights")
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if lookahead is not None and state.get("lookahead") is not None:
            lookahead.load_state_dict(state["lookahead"])
        inputs.train.load_state_dict(state["loader"])
        set_rng_state(state["rng"][env.rank] if env.rank < len(state["rng"]) else state["rng"][0])
        start_epoch, best = state["epoch"] + 1, state["best"]
    elif out.exists() and any(out.glob("checkpoints/*")) and not resume:
        raise ResumeError(f"{out} already holds checkpoints; pass a new --out or resume it")

    if tcfg["sync_bn"] and env.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen_bn_modules = [dict(model.named_layers())[name] for name in frozen_bn]  # after any SyncBN swap
    net: nn.Module = model
    if env.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda"
                                                  else None)
    if tcfg["compile"]:
        # Dynamo keys its cache on VGG.forward's code object, shared by every VGG instance in the process:
        # a process that trains many models (`vggnet reproduce`) would hit the recompile limit at the ninth
        # and silently train eagerly. Earlier runs are finished, so their compiled graphs can go.
        torch.compiler.reset()
        net = torch.compile(net)

    logger, tracker = None, Tracker()
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "recipe.yaml")
        logger = RunLogger(out, tensorboard=tcfg["tracking"] == "tensorboard")
        logger.truncate(start_epoch - 1)
        tracker = open_tracker(recipe, out, resuming=bool(ckpts))
    meta = {"classes": inputs.classes, "mean": inputs.mean, "std": inputs.std, "image_size": inputs.image_size,
            "recipe": recipe.get("description", "")}
    if inputs.test_scale is not None:  # the validation view's shorter side: predict / serve / export resize to it
        meta["test_scale"] = int(inputs.test_scale)
    if started_from is not None:
        meta["weights"] = started_from

    epochs, step = scfg["epochs"], (start_epoch - 1) * len(inputs.train)
    last: dict[str, Any] = {}
    stop = min(epochs, tcfg["stop_after_epoch"] or epochs)
    if start_epoch > stop and env.main:
        print(f"{out}: already trained to epoch {start_epoch - 1} of {epochs}; nothing to do", flush=True)
    try:
        for epoch in range(start_epoch, stop + 1):
            inputs.train.set_epoch(epoch)
            if tcfg["record_shards"] and epoch == start_epoch:
                _record_shards(out, env, inputs)
            net.train()
            for bn in frozen_bn_modules:
                bn.eval()
            sums = torch.zeros(3, dtype=torch.float64)  # loss, top1, count
            t0, wait = time.perf_counter(), 0.0
            bar = tqdm(total=len(inputs.train), desc=f"epoch {epoch}/{epochs}", disable=not (progress and env.main),
                       leave=False, dynamic_ncols=True)
            batches = iter(inputs.train)
            while True:
                tw = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                images, targets = batch if batch is not None else (None, None)
                wait += time.perf_counter() - tw
                if images is None:  # every file of the batch was unreadable (skipped and counted by the dataset)
                    bar.update()
                    continue
                images, targets = _to_device(images, targets, env.device, channels_last)
                lr = schedule.lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # optimizer states saved before lr_scale lack it
                with torch.autocast(env.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    logits = net(images)
                    if loss_fn is None:
                        loss = F.cross_entropy(logits.float(), targets, label_smoothing=ocfg["label_smoothing"])
                    else:
                        loss = loss_fn(logits.float(), targets, images)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}; lower optim.lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if ocfg["grad_clip"]:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), ocfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                if lookahead is not None:
                    lookahead.after_step(step)
                n = targets.numel()
                sums += torch.tensor([loss.item() * n, topk_correct(logits.detach().float(), targets, (1,))[1], n],
                                     dtype=torch.float64)
                bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.3f}", lr=f"{lr:.2g}", refresh=False)
                bar.update()
            bar.close()
            sums = distributed.all_sum(sums, env)
            distributed.average_buffers(model, env)
            elapsed = time.perf_counter() - t0
            if lookahead is not None and epoch == epochs:
                lookahead.finish()
            record: dict[str, Any] = {
                "epoch": epoch, "epochs": epochs, "train_loss": sums[0].item() / sums[2].item(),
                "train_top1": 100 * sums[1].item() / sums[2].item(), "lr": lr,
                "img_per_s": sums[2].item() / elapsed, "data_wait_frac": wait / elapsed, "epoch_time": elapsed,
            }
            eval_model = ema.module if ema is not None else model
            is_last = epoch == epochs
            confusion = None
            if inputs.val is not None and (epoch % tcfg["eval_every"] == 0 or is_last):
                metrics = evaluate(eval_model, inputs.val, len(inputs.classes), env, amp, channels_last,
                                   flip=tcfg["eval_flip"])
                confusion = metrics.pop("confusion")
                record.update(metrics)
            # best = highest validation top-1 (training top-1 only for runs without validation data); epochs
            # skipped by eval_every cannot be best, or a training accuracy would beat every validation one
            score = record.get("val_top1", record["train_top1"] if inputs.val is None else -math.inf)
            if schedule.epoch_end(record.get("val_top1")):
                record["lr_drop"] = schedule.drops
            is_best = score > best
            best = max(best, score)
            state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                     "epoch": epoch, "best": best,
                     "lookahead": lookahead.state_dict() if lookahead is not None else None,
                     "loader": inputs.train.state_dict(), "rng": _gather_rng(env)}
            if env.main:
                record["time"] = time.time()
                logger.log(record)  # type: ignore[union-attr]
                tracker.log_epoch(record)
                save_training_checkpoint(out, epoch, model, ema.module if ema is not None else None, state,
                                         {**meta, "metrics": {k: v for k, v in record.items() if k != "time"}},
                                         is_best, tcfg["keep"])
                plot_curves(logger.records, out / "curves.png", title=f"{model.config.name} — {out.name}")  # type: ignore
                if confusion is not None and is_best:
                    plot_confusion(confusion, inputs.classes, out / "confusion.png", title=f"epoch {epoch}")
                print(format_epoch_line(record), flush=True)
            distributed.barrier(env)
            last = record
        best_top1 = best if math.isfinite(best) else None  # None: stopped before any evaluated epoch
        if env.main and last:
            (out / "final.json").write_text(json.dumps({**last, "best_top1": best_top1}, indent=2))
            logger.close()  # type: ignore[union-attr]
        if env.main:
            tracker.finish(out)  # artifacts (curves, confusion, best checkpoint) once they are final
    except BaseException as exc:  # the MLflow run says it failed instead of staying RUNNING forever
        if env.main:
            tracker.fail("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if tcfg["record_shards"]:
        _record_final(out, env, model)
    return {**last, "best_top1": best_top1}


def _gather_rng(env: distributed.Dist) -> list[dict[str, Any]]:
    """Every rank's RNG state, so a resumed DDP run continues each rank's dropout stream."""
    mine = rng_state()
    if not env.enabled:
        return [mine]
    gathered: list[Any] = [None] * env.world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _record_shards(out: Path, env: distributed.Dist, inputs: Inputs) -> None:
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "shards" / f"rank{env.rank}.json").write_text(json.dumps(inputs.train.epoch_indices().tolist()))


def _record_final(out: Path, env: distributed.Dist, model: VGG) -> None:
    digest = sum(float(p.double().sum()) * (i + 1) for i, p in enumerate(model.state_dict().values())
                 if p.is_floating_point())
    (out / "shards" / f"final_rank{env.rank}.json").write_text(json.dumps(digest))

