"""Knowledge distillation (Hinton et al. 2015): a small student learns from a trained teacher's soft targets.

The student trains through the ordinary loop (:func:`vggnet.engine.train`) with one change, its loss:

    loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · CE(student, labels)

T² keeps the soft term's gradients on the scale of the hard term's as T grows (Hinton et al., Sec. 2).
The teacher sees the very batch the student sees, augmentation included, so its logits are computed on the
fly: the recipes here draw new crops and flips every epoch, which a cache of one view per image would undo.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vggnet.atomic import write_json
from vggnet.engine.hooks import TrainHooks
from vggnet.engine.recipe import Recipe
from vggnet.errors import UsageError
from vggnet.models import VGG, checkpoint_file, load_checkpoint


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float = 4.0,
            alpha: float = 0.9) -> torch.Tensor:
    """Hinton's loss on logits (N × classes): ``alpha`` weighs the softened teacher term, 1 − alpha the labels."""
    soft = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    if alpha == 1:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student, targets)


@dataclass(frozen=True)
class DistillSettings:
    """What a distillation run records in its folder (``distill.json``), so a resumed run uses the same."""

    teacher: str
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"alpha must be in [0, 1], got {self.alpha}")


class DistillLoss:
    """The loss for :class:`~vggnet.engine.hooks.TrainHooks`: runs the frozen teacher on the student's batch."""

    def __init__(self, teacher: VGG, temperature: float = 4.0, alpha: float = 0.9,
                 check: tuple[Path, dict[str, Any]] | None = None) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha
        self.check = check  # (file, metadata): compared with the student's data before training starts
        self._placed = False

    def check_inputs(self, inputs: Any) -> None:
        """Called by the training loop once the student's data is built, before any step."""
        if self.check is not None:
            check_teacher(self.check[0], self.teacher, self.check[1], inputs.classes, inputs.mean, inputs.std,
                          inputs.image_size)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if not self._placed:  # follow the student onto its device and memory format on the first batch
            self.teacher.to(images.device)
            if images.is_contiguous(memory_format=torch.channels_last):
                self.teacher.to(memory_format=torch.channels_last)
            self._placed = True
        with torch.no_grad():
            teacher = self.teacher(images).float()
        return kd_loss(logits, teacher, targets, self.temperature, self.alpha)


def load_teacher(path: str | os.PathLike) -> tuple[VGG, dict[str, Any], Path]:
    """The teacher checkpoint: model, metadata, file."""
    file = checkpoint_file(path)
    teacher, extra = load_checkpoint(file)
    return teacher, extra, file


def check_teacher(file: Path, teacher: VGG, extra: dict[str, Any], classes: list[str], mean: Any, std: Any,
                  image_size: int) -> None:
    """A teacher must predict the student's classes in the same order, from the same inputs (one batch feeds
    both nets: same normalisation, same crop size)."""
    if extra.get("classes") is not None and list(extra["classes"]) != list(classes):
        raise UsageError(f"the teacher {file} was trained on classes {extra['classes']}, the student's data has "
                         f"{classes}: a teacher must predict the student's classes, in the same order")
    if teacher.config.num_classes != len(classes):
        raise UsageError(f"the teacher {file} has {teacher.config.num_classes} outputs, the student's data "
                         f"{len(classes)} classes")
    for key, mine in (("mean", mean), ("std", std), ("image_size", image_size)):
        theirs = extra.get(key)
        if theirs is not None and _rounded(mine) != _rounded(theirs):
            raise UsageError(f"the teacher {file} was trained with {key} {theirs}, the student's recipe uses {mine}: "
                             "both must see the same inputs")


def _rounded(value: Any) -> Any:
    return [round(float(v), 5) for v in value] if isinstance(value, list | tuple) else value


def distill(recipe: Recipe | Mapping[str, Any], settings: DistillSettings, out_dir: str | os.PathLike,
            resume: bool = True, progress: bool | None = None) -> dict[str, Any]:
    """Train the student ``recipe`` into ``out_dir`` with the teacher's soft targets; resumable like training.

    The settings are written to ``out_dir/distill.json`` before the first step; a rerun with other settings
    on the same folder is refused rather than mixed into the run.
    """
    from vggnet.engine.trainer import train

    recipe = Recipe.of(recipe)  # a bad value fails here, before distill.json is written
    out = Path(out_dir)
    record = out / "distill.json"
    wanted = asdict(settings)
    if record.is_file() and resume:
        saved = json.loads(record.read_text())
        if saved != wanted:
            raise UsageError(f"{out} was distilled with {saved}; now asked for {wanted}: use a new --out folder")
    teacher, extra, file = load_teacher(settings.teacher)
    loss = DistillLoss(teacher, settings.temperature, settings.alpha, check=(file, extra))
    fresh = not out.exists()
    write_json(record, wanted)
    try:
        return train(recipe, out, resume=resume, progress=progress,
                     hooks=TrainHooks(loss=loss, check_inputs=loss.check_inputs))
    except ValueError:  # refused before training (a teacher that does not fit): leave no run folder behind
        if fresh and not any(out.glob("checkpoints/*")):
            record.unlink(missing_ok=True)
            for leftover in ("recipe.yaml",):
                (out / leftover).unlink(missing_ok=True)
            if not any(out.iterdir()):
                out.rmdir()
        raise
