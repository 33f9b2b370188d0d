"""Lookahead with a rising slow-weight decay, as airbench trains CIFAR-10 in a few epochs.

Every ``k`` steps the slow copy moves towards the fast weights, ``slow += (1 - d) (fast - slow)``, and
the fast weights restart from it. ``d`` grows as ``0.95^k (t / T)^3``: early on the slow copy simply
follows (d ≈ 0), near the end it averages the last few hundred steps, which is where fast high-lr
training gains most. Floating-point buffers (BN running statistics) are averaged along with the
weights, so the slow copy is a consistent network. ``finish`` hands the slow copy to the model.
"""

from __future__ import annotations

import torch
from torch import nn

from vggnet.errors import UsageError


class Lookahead:
    def __init__(self, model: nn.Module, every: int, total_steps: int) -> None:
        if every < 1:
            raise UsageError(f"lookahead needs every >= 1 step, got {every}")
        self.model, self.every, self.total = model, every, max(1, total_steps)
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int) -> float:
        return 0.95 ** self.every * min(1.0, step / self.total) ** 3

    @torch.no_grad()
    def _pull(self, decay: float) -> None:
        for key, fast in self.model.state_dict().items():
            if key in self.slow:
                self.slow[key].lerp_(fast, 1 - decay)
                fast.copy_(self.slow[key])

    def after_step(self, step: int) -> None:
        """Call with the number of steps taken so far (1-based)."""
        if step % self.every == 0:
            self._pull(self.decay(step))

    def finish(self) -> None:
        """End of training: the model becomes the slow copy."""
        self._pull(1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.slow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.slow[key].copy_(value)
