"""The optimizer and the batch-norm settings of a training run, built from the recipe's ``optim`` and ``train``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vggnet.errors import UsageError
from vggnet.models import VGG

from .finetune import lr_multipliers
from .recipe import OptimConfig
from .typed import from_dict


def build_optimizer(model: nn.Module, cfg: OptimConfig | Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD (heavy-ball or Nesterov) or AdamW; no weight decay on biases and BN, as is usual.

    ``bias_lr_scale`` runs the 1-D parameters at a multiple of the learning rate (each group's ``lr_scale``,
    applied by the loop); ``decay_biases`` decays them at the weights' per-step rate (PyTorch's decay is
    lr x weight_decay, hence the division by the scale). ``lr_mult`` gives parts of a VGG their own rate, one pair
    of groups per value. Frozen parameters are in no group, so no update or decay touches them.
    """
    if isinstance(cfg, Mapping):
        cfg = from_dict(OptimConfig, cfg, "optim.")
    if isinstance(model, VGG):
        mults = lr_multipliers(model, cfg.lr_mult)
    elif cfg.lr_mult:
        raise UsageError("optim.lr_mult names VGG layers, and this run trains a wrapped module: set optim.lr_mult "
                         "null")
    else:
        mults = {name: 1.0 for name, _ in model.named_parameters()}
    pairs: dict[float, tuple[list, list]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay, no_decay = pairs.setdefault(mults[name], ([], []))
            (no_decay if p.ndim <= 1 else decay).append(p)
    scale = float(cfg.bias_lr_scale)
    bias_decay = cfg.weight_decay / scale if cfg.decay_biases else 0.0
    groups = []
    for mult in sorted(pairs, reverse=True):  # 1.0 first: the group order of runs saved before lr_mult
        decay, no_decay = pairs[mult]
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": mult},
                   {"params": no_decay, "weight_decay": bias_decay, "lr_scale": scale * mult}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UsageError("no parameter left to train: model.freeze covers every layer")
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) else {}
    if cfg.name in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.name == "nesterov", **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fused)  # type: ignore[arg-type]


def configure_batch_norm(model: nn.Module, freeze_scale: bool, momentum: float | None) -> None:
    """Fast small-image recipes fix every BN scale at 1 (only the shift learns, at a high lr) and use a
    larger running-stat momentum, since a short run has few steps to settle the statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if freeze_scale and m.weight is not None:
                m.weight.requires_grad_(False)
            if momentum is not None:
                m.momentum = float(momentum)
