"""Step 4: fine-tune the champion on the tree of step 3 with the ``finetune`` recipe, through the engine.

The recipe starts from the champion's checkpoint (``model.weights``: architecture, preprocessing and, the classes
being the same, the classifier too) and keeps the champion's augmentation (what suited its data suits the same
data: digits must not be mirrored, photos may). Only the last epoch is validated (``train.eval_every``): the
validation split is the gate's, so the candidate is not picked on it (best = last). The engine resumes an
interrupted run from its newest checkpoint on its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vggnet.engine.recipe import Recipe
from vggnet.errors import UsageError

__all__ = ["AUGMENTATION", "candidate_checkpoint", "finetune_recipe", "train_candidate", "trained"]

#: the champion's data keys the candidate keeps (how its images were augmented)
AUGMENTATION = ("augment", "scale", "pad", "flip", "cutout", "lighting")
#: what retrain decides itself: the data and the split the gate depends on, and where the weights come from
FIXED = ("data.dataset", "data.path", "data.val_fraction", "data.split_seed", "model.weights", "model.init_from",
         "train.eval_every")
ONLY_LAST = 1_000_000  # train.eval_every: no epoch but the last is validated
CHECKPOINTS = ("best.safetensors", "last.safetensors")


def finetune_recipe(champion: dict[str, Any], weights: Path, data: Path, seed: int, epochs: int | None,
                    overrides: Sequence[str]) -> Recipe:
    """The ``finetune`` recipe for this retrain: the champion's augmentation, then retrain's fixed keys, then the
    user's ``--set`` overrides and ``--epochs`` (which may change anything but :data:`FIXED`)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in FIXED:
            raise UsageError(f"--set {key} is retrain's to choose (the data, the split and the starting weights "
                             "are what the gate depends on)")
    keys = [f"data.{k}={json.dumps(champion['data'][k])}" for k in AUGMENTATION if k in champion.get("data", {})]
    keys += [f"model.weights={json.dumps(str(weights))}", "data.dataset=folder", f"data.path={json.dumps(str(data))}",
             "data.val_fraction=0.0", f"train.seed={seed}", f"train.eval_every={ONLY_LAST}"]
    keys += list(overrides)
    if epochs is not None:
        keys.append(f"schedule.epochs={epochs}")
    return Recipe.load("finetune", keys)


def candidate_checkpoint(run: Path) -> Path | None:
    """The checkpoint the registry records for ``run`` (best, else last): the one the gate must judge."""
    return next((run / name for name in CHECKPOINTS if (run / name).is_file()), None)


def trained(run: Path) -> bool:
    """Whether ``run`` finished its schedule (final.json at the recipe's last epoch, and a checkpoint)."""
    final, recipe = run / "final.json", run / "recipe.yaml"
    if not (final.is_file() and recipe.is_file() and candidate_checkpoint(run) is not None):
        return False
    epochs = ((yaml.safe_load(recipe.read_text()) or {}).get("schedule") or {}).get("epochs")
    return json.loads(final.read_text()).get("epoch") == epochs


def train_candidate(recipe: Recipe, run: Path, progress: bool | None) -> Path:
    """Train (or resume, or find finished) the candidate in ``run``; returns its checkpoint."""
    if not trained(run):
        from vggnet.engine.trainer import train

        train(recipe, run, resume=True, progress=progress)
    checkpoint = candidate_checkpoint(run)
    if checkpoint is None or not trained(run):
        raise UsageError(f"{run}: training stopped before its last epoch (train.stop_after_epoch?); run again to "
                         "finish it")
    return checkpoint
