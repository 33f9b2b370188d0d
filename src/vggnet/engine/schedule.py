"""Learning-rate schedules computed per iteration, including the paper's plateau rule.

Written here rather than chained from ``torch.optim.lr_scheduler`` because the paper's rule
("divide by 10 when validation accuracy stops improving", applied three times) has no cap in
``ReduceLROnPlateau``, warm-up does not compose with it, and one small state dict makes resume exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vggnet.errors import UsageError

from .recipe import ScheduleConfig
from .typed import from_dict

SCHEDULES = ("plateau", "step", "cosine", "onecycle", "constant")


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig | Mapping[str, Any], base_lr: float, steps_per_epoch: int) -> None:
        if isinstance(cfg, Mapping):
            if cfg.get("name") not in SCHEDULES:
                raise UsageError(f"unknown schedule {cfg.get('name')!r}; choose one of {', '.join(SCHEDULES)}")
            cfg = from_dict(ScheduleConfig, cfg, "schedule.")
        self.cfg, self.base_lr, self.steps = cfg, base_lr, max(1, steps_per_epoch)
        self.scale, self.best, self.bad_epochs, self.drops = 1.0, -math.inf, 0, 0

    def lr_at(self, step: int) -> float:
        """LR for global iteration ``step`` (0-based)."""
        cfg, epochs = self.cfg, self.cfg.epochs
        t = step / self.steps  # epochs elapsed, fractional
        warm = cfg.warmup_epochs
        if cfg.name == "onecycle":  # linear up from initial_lr_frac over pct_start, then down to final_lr_frac
            peak, low = cfg.pct_start * epochs, cfg.initial_lr_frac
            if t < peak:
                return self.base_lr * (low + (1 - low) * t / peak)
            frac = min(1.0, (t - peak) / max(1e-8, epochs - peak))
            return self.base_lr * (1 - frac * (1 - cfg.final_lr_frac))
        if warm > 0 and t < warm:
            return self.base_lr * (t + 1 / self.steps) / warm
        if cfg.name == "cosine":
            frac = min(1.0, (t - warm) / max(1e-8, epochs - warm))
            low = cfg.final_lr_frac
            return self.base_lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * frac)))
        if cfg.name == "step":
            return self.base_lr * cfg.factor ** int(t // cfg.step_epochs)
        return self.base_lr * self.scale  # plateau, constant

    def epoch_end(self, val_metric: float | None) -> bool:
        """Feed the epoch's validation accuracy; returns True when the plateau rule divided the LR."""
        if self.cfg.name != "plateau" or val_metric is None:
            return False
        if val_metric > self.best + self.cfg.threshold:
            self.best, self.bad_epochs = val_metric, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs > self.cfg.patience and self.drops < self.cfg.max_drops:
            self.scale *= self.cfg.factor
            self.drops, self.bad_epochs = self.drops + 1, 0
            return True
        return False

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs, "drops": self.drops}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.best = float(state["scale"]), float(state["best"])
        self.bad_epochs, self.drops = int(state["bad_epochs"]), int(state["drops"])
