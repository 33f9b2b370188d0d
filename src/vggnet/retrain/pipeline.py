"""The retrain pipeline: export, split, data, train, evaluate, gate; each step resumable on its own.

Every step writes its output atomically under the run folder and is skipped when that output is there and
consistent with its inputs (each output records the SHA-256 of what it was made from), so a run killed at any
point continues where it stopped: the store is read once (``reviewed/`` is a snapshot), the split and the data
tree are not redrawn, training resumes from its newest checkpoint, answers are not recomputed. The settings a run
was started with are kept in ``retrain.json``; resuming with other ones is refused rather than mixing two runs.
Registering the result is the caller's (the CLI joins this room to the registry).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vggnet.atomic import file_sha256, write_json
from vggnet.errors import UsageError, VggnetError

from .dataset import build_training_folder, champion_recipe, original_split
from .export import MANIFEST, export_reviewed, find_inputs
from .finetune import finetune_recipe, train_candidate, trained
from .gate import ORIGINAL, REVIEWED, decide
from .split import holdout_split

__all__ = ["Champion", "NotEnoughReviewed", "RetrainResult", "RetrainSettings", "retrain", "sha256_of"]

SETTINGS, SPLIT, DATA, ANSWERS, GATE = "retrain.json", "split.json", "data.json", "answers.json", "gate.json"
REVIEWED_DIR, DATA_DIR, TRAIN_DIR = "reviewed", "data", "train"


class NotEnoughReviewed(VggnetError):
    """Too few reviewed samples with kept images to train on and to test on: nothing was trained."""


@dataclass
class Champion:
    """The version retrained from, as the registry describes it."""

    name: str
    version: str
    checkpoint: Path
    sha256: str  # the registered checkpoint's hash: the file must still be that one
    run: Path | None  # its run folder (recipe.yaml: the validation split; final.json: its recorded accuracy)


@dataclass
class RetrainSettings:
    store: str
    data: Path
    out: Path
    inputs: Path | None = None
    store_model: str | None = None  # the model's name in the store (default: the registered name)
    holdout: float = 0.3
    seed: int = 0
    reviewed_weight: int = 3
    include_user: bool = False
    min_reviewed: int = 10
    margin: float = 1.0
    alpha: float = 0.05
    epochs: int | None = None
    overrides: list[str] = field(default_factory=list)
    progress: bool | None = None


@dataclass
class RetrainResult:
    out: Path
    candidate_run: Path
    checkpoint: Path
    gate: dict[str, Any]


sha256_of = file_sha256  # the name this room exports


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:  # written atomically, so only a hand edit gets here: redo the step
        return None


def _identity(champion: Champion, s: RetrainSettings) -> dict[str, Any]:
    from vggnet.store import safe_url

    return {"champion": {"name": champion.name, "version": str(champion.version), "sha256": champion.sha256},
            "store": safe_url(s.store), "store_model": s.store_model or champion.name, "data": str(s.data.resolve()),
            "inputs": None if s.inputs is None else str(Path(s.inputs).resolve()), "holdout": s.holdout,
            "seed": s.seed, "reviewed_weight": s.reviewed_weight, "include_user_reports": s.include_user,
            "margin": s.margin, "alpha": s.alpha, "epochs": s.epochs, "set": list(s.overrides)}


def _check_settings(out: Path, identity: dict[str, Any]) -> bool:
    """Record the settings of a new run; refuse to resume one started with others. True: resuming."""
    saved = _read(out / SETTINGS)
    if saved is None:
        write_json(out / SETTINGS, identity)
        return False
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in identity.items() if saved.get(k) != v]
    if changed:
        raise UsageError(f"{out} was started with other settings ({'; '.join(changed)}): pass the same flags to "
                         "resume it, or a new --out")
    return True


def _check_champion(champion: Champion) -> dict[str, Any]:
    """The champion's checkpoint is the registered one; its classes and preprocessing."""
    from vggnet.evaluate import load_models

    if not champion.checkpoint.is_file():
        raise UsageError(f"the checkpoint of {champion.name} version {champion.version} is gone: {champion.checkpoint}")
    if sha256_of(champion.checkpoint) != champion.sha256:
        raise UsageError(f"{champion.checkpoint} changed since {champion.name} version {champion.version} was "
                         "registered (its sha256 differs): retraining it would not start from that version")
    _, meta = load_models(champion.checkpoint)
    if not meta["classes"]:
        raise UsageError(f"{champion.checkpoint} records no class names: reviewers' labels cannot be matched to it")
    return meta


def _export(champion: Champion, s: RetrainSettings, out: Path, classes: list[str], say: Callable) -> dict:
    folder = out / REVIEWED_DIR
    manifest = _read(folder / MANIFEST)
    if manifest is not None and all((folder / m["file"]).is_file() for m in manifest["samples"]):
        say(f"1 export: done before ({folder})")
        return manifest
    from vggnet.store import connect

    engine = connect(s.store, create=False)
    try:
        inputs = find_inputs(engine, s.inputs)
        manifest = export_reviewed(engine, s.store_model or champion.name, classes, inputs, folder, s.include_user)
    finally:
        engine.dispose()
    c = manifest["counts"]
    say(f"1 export: {c['labelled_inputs']} reviewed inputs of {manifest['model']} -> {c['exported']} images in "
        f"{folder} (left out: none of these {c['none_of_these']}, class unknown to the model {c['unknown_class']}, "
        f"image not kept {c['not_kept']}); crops from {inputs}")
    for row in manifest["not_kept"][:5]:
        say(f"  not kept: request {row['request_id']} item {row['item']} ({row['why']})")
    return manifest


def _split(s: RetrainSettings, out: Path, manifest: dict, say: Callable) -> dict:
    made_from = sha256_of(out / REVIEWED_DIR / MANIFEST)
    split = _read(out / SPLIT)
    if split is None or split.get("made_from") != made_from:
        split = {**holdout_split(manifest["samples"], s.holdout, s.seed), "made_from": made_from}
        write_json(out / SPLIT, split)
    say(f"2 split: {len(split['train'])} reviewed samples to train on, {len(split['holdout'])} held out "
        f"(stratified, {s.holdout:g}, seed {s.seed})")
    if len(split["train"]) + len(split["holdout"]) < s.min_reviewed or not split["train"] or not split["holdout"]:
        raise NotEnoughReviewed(f"not enough reviewed samples with kept images: {len(split['train'])} to train on "
                                f"and {len(split['holdout'])} to test on (--min-reviewed {s.min_reviewed}, and at "
                                "least one of each); nothing was trained; retry with a new --out once more are "
                                "reviewed")
    return split


def _data(champion: Champion, s: RetrainSettings, out: Path, manifest: dict, classes: list[str],
          say: Callable) -> tuple[dict, dict]:
    recipe = champion_recipe(champion.run)
    made_from = {"split": sha256_of(out / SPLIT), "data": str(s.data.resolve()), "weight": s.reviewed_weight}
    data = _read(out / DATA)
    if data is None or data.get("made_from") != made_from or not (out / DATA_DIR).is_dir():
        if (out / TRAIN_DIR / "checkpoints").is_dir():
            raise UsageError(f"{out / TRAIN_DIR} was trained on a data tree that is no longer there or differs: "
                             "remove it to train again, or use a new --out")
        train, val = original_split(recipe, s.data, classes)
        wanted = set(json.loads((out / SPLIT).read_text())["train"])
        reviewed = [m for m in manifest["samples"] if m["sha256"] in wanted]
        data = {**build_training_folder(out / DATA_DIR, classes, train, val, out / REVIEWED_DIR, reviewed,
                                        s.reviewed_weight), "made_from": made_from, "source": str(s.data.resolve())}
        recorded = (recipe.get("data") or {}).get("path")
        if recorded and Path(recorded).resolve() != s.data.resolve():
            data["note"] = f"the champion's recipe.yaml names data.path {recorded}, not --data {s.data}"
        write_json(out / DATA, data)
    say(f"3 data: {data['original_train']} original + {data['reviewed_train']} reviewed x {data['reviewed_weight']} "
        f"training images, {data['original_val']} validation images (the champion's split) in {out / DATA_DIR}")
    if data.get("note"):
        say(f"  note: {data['note']}")
    return data, recipe


def _answers(champion: Champion, s: RetrainSettings, out: Path, checkpoint: Path, manifest: dict, data: dict,
             classes: list[str], say: Callable) -> dict:
    from .evaluate import paired_answers

    made_from = {"champion": champion.sha256, "candidate": sha256_of(checkpoint), "split": sha256_of(out / SPLIT),
                 "data": sha256_of(out / DATA)}
    answers = _read(out / ANSWERS)
    if answers is None or answers.get("made_from") != made_from:
        held = set(json.loads((out / SPLIT).read_text())["holdout"])
        holdout = [m for m in manifest["samples"] if m["sha256"] in held]
        sets = {ORIGINAL: ([str(out / DATA_DIR / f) for f, _ in data["val_files"]],
                           [label for _, label in data["val_files"]], "validation"),
                REVIEWED: ([str(out / REVIEWED_DIR / m["file"]) for m in holdout],
                           [classes.index(m["label"]) for m in holdout], "served")}
        answers = {**paired_answers(champion.checkpoint, checkpoint, sets, s.progress), "made_from": made_from}
        write_json(out / ANSWERS, answers, indent=None)
    say(f"5 evaluate: both models on {len(answers['sets'][ORIGINAL]['files'])} validation images and "
        f"{len(answers['sets'][REVIEWED]['files'])} held-out reviewed samples")
    return answers


def retrain(champion: Champion, settings: RetrainSettings, say: Callable[[str], None] = print) -> RetrainResult:
    """Run (or resume) every step up to the gate; ``RUN/gate.json`` holds the verdict."""
    s, out = settings, settings.out.resolve()
    if s.reviewed_weight < 1:
        raise UsageError(f"--reviewed-weight must be a whole number >= 1, got {s.reviewed_weight}")
    if not 0 < s.holdout < 1:
        raise UsageError(f"--holdout must lie in (0, 1), got {s.holdout}")
    if not 0 < s.margin < 100 or not 0 < s.alpha < 1:
        raise UsageError(f"--margin must lie in (0, 100) points and --alpha in (0, 1), got {s.margin} and {s.alpha}")
    out.mkdir(parents=True, exist_ok=True)
    resuming = _check_settings(out, _identity(champion, s))
    say(f"retrain {champion.name} version {champion.version} -> {out}" + (" (resuming)" if resuming else ""))
    meta = _check_champion(champion)
    classes = list(meta["classes"])
    manifest = _export(champion, s, out, classes, say)
    _split(s, out, manifest, say)
    data, recipe = _data(champion, s, out, manifest, classes, say)
    run = out / TRAIN_DIR
    recipe_ft = finetune_recipe(recipe, champion.checkpoint, out / DATA_DIR, s.seed, s.epochs, s.overrides)
    say(f"4 train: done before ({run})" if trained(run) else f"4 train: fine-tuning {champion.checkpoint} in {run}")
    checkpoint = train_candidate(recipe_ft, run, s.progress)
    answers = _answers(champion, s, out, checkpoint, manifest, data, classes, say)
    gate = decide(answers, s.margin, s.alpha)
    recorded = _read(champion.run / "final.json") if champion.run is not None else None
    gate.update({
        "champion": {**asdict(champion), "checkpoint": str(champion.checkpoint),
                     "run": None if champion.run is None else str(champion.run),
                     "recorded_best_top1": (recorded or {}).get("best_top1")},
        "candidate": {"run": str(run), "checkpoint": str(checkpoint), "sha256": answers["made_from"]["candidate"]},
        "reviewed": manifest["counts"],
        "data": {k: v for k, v in data.items() if k not in ("val_files", "made_from")},
    })
    write_json(out / GATE, gate)
    say("6 gate: written to " + str(out / GATE))
    return RetrainResult(out, run, checkpoint, gate)
