"""Step 5: both models' answers on the same images, image by image: what the gate's paired tests count.

Both see the same views: the original validation images at the champion's validation view (shorter side to its
``test_scale``, centre crop) and the reviewed crops as they were served (they are the network's input already:
a centre crop at the training size, no rescale).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vggnet.errors import UsageError
from vggnet.evaluate import FolderImages, Protocol, load_models, predict_proba

__all__ = ["paired_answers"]

SAME = ("classes", "mean", "std", "image_size")


def _answers(model: Any, meta: dict[str, Any], files: Sequence[str], scale: int, device: str,
             progress: bool | None) -> list[int | None]:
    if not files:
        return []
    probs = predict_proba(model, FolderImages(list(files)), Protocol("single", (int(scale),)),
                          crop=meta["image_size"], mean=meta["mean"], std=meta["std"], device=device,
                          progress=progress)
    valid = torch.isfinite(probs).all(dim=1)
    return [int(i) if ok else None for i, ok in zip(probs.argmax(dim=1).tolist(), valid.tolist(), strict=True)]


def paired_answers(champion: Path, candidate: Path, sets: dict[str, tuple[list[str], list[int], str]],
                   progress: bool | None = None) -> dict[str, Any]:
    """For each named set (files, true label indices, ``"validation"`` or ``"served"`` view): the labels and each
    model's top-1 class index per image (None: the file could not be read)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metas, models = {}, {}
    for role, path in (("champion", champion), ("candidate", candidate)):
        loaded, meta = load_models(path)
        models[role], metas[role] = loaded[0], meta
    for key in SAME:
        if metas["champion"][key] != metas["candidate"][key]:
            raise UsageError(f"the candidate's {key} differs from the champion's: they cannot be compared image by "
                             "image")
    meta = metas["champion"]
    out: dict[str, Any] = {"classes": meta["classes"], "sets": {}}
    for name, (files, labels, view) in sets.items():
        scale = meta["test_scale"] if view == "validation" else meta["image_size"]
        out["sets"][name] = {"files": list(files), "labels": list(labels), "view": f"single@{scale}",
                             **{role: _answers(models[role], meta, files, scale, device, progress)
                                for role in ("champion", "candidate")}}
    return out
