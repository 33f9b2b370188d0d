"""Classification metrics shared by training (``engine``) and test-time evaluation (``evaluate``); torch only.

Counts rather than percentages so that batches and DDP ranks can simply be summed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["confusion_matrix", "topk_correct"]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Count of samples whose target is among the k best scores, per k.

    Counts rather than percentages so that batches and DDP ranks can simply be summed. ``k`` is clipped to the
    class count, so top-5 on a 3-class problem is top-3 (always right) instead of an error.
    """
    ks = tuple(ks)
    kmax = min(max(ks), logits.shape[1])
    hits = logits.topk(kmax, dim=1).indices == targets.view(-1, 1)
    return {k: int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (int64) with rows the true class and columns the prediction, summable across batches and ranks."""
    preds, targets = preds.long().reshape(-1), targets.long().reshape(-1)
    both = torch.cat([preds, targets])
    if preds.numel() != targets.numel() or (both.numel() and (both.min() < 0 or both.max() >= num_classes)):
        raise ValueError(f"need as many preds as targets, all in [0, {num_classes})")  # bincount would mis-shape
    flat = targets * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)
