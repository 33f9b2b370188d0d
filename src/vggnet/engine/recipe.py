"""Recipes: YAML files of training settings, merged over typed defaults, overridable from the command line.

A recipe names only what differs from the defaults (the dataclasses below); every key must exist there, so a
typo (``optim.lr_rate``) is an error rather than an ignored setting, and every value's type and range are
checked when the recipe is loaded, before any file is written (:mod:`vggnet.engine.typed` says why stdlib
dataclasses). The engine reads a :class:`Recipe`'s fields; other packages read a run folder's ``recipe.yaml``
as a plain mapping, which :func:`load_recipe` and :meth:`Recipe.to_dict` still return, in the same shape.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from vggnet.atomic import write_text
from vggnet.models import list_models
from vggnet.recipes import names as recipe_names

from .typed import Length, OneOf, Range, RecipeError, from_dict

__all__ = ["DEFAULTS", "DataConfig", "ModelConfig", "OptimConfig", "Recipe", "RecipeDict", "RecipeError",
           "ScheduleConfig", "TrainConfig", "apply_override", "builtin_recipes", "dump_recipe", "load_recipe",
           "parse_yaml", "save_recipe"]

RecipeDict = dict[str, Any]  # a recipe as plain nested mappings: what recipe.yaml holds

Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
Below1 = Annotated[float, Range(ge=0, lt=1)]
Count = Annotated[int, Range(ge=0)]
PositiveInt = Annotated[int, Range(ge=1)]


class RecipeLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a string; in a recipe or an override it means a number."""


class RecipeDumper(yaml.SafeDumper):
    """Writes what RecipeLoader reads back unchanged: a string that looks like ``1e3`` is quoted."""


_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (RecipeLoader, RecipeDumper):
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in _cls.yaml_implicit_resolvers.items()}  # own copy
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789"))


def parse_yaml(text: str, source: str = "YAML text") -> Any:
    """``text`` read as a recipe reads it; a syntax error is a :class:`RecipeError` naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{source}: YAML syntax error{where}: {what}") from None


def dump_recipe(recipe: Recipe | Mapping[str, Any]) -> str:
    """The recipe as YAML that :func:`load_recipe` reads back unchanged (keys in the defaults' order)."""
    data = recipe.to_dict() if isinstance(recipe, Recipe) else dict(recipe)
    return yaml.dump(data, Dumper=RecipeDumper, sort_keys=False)


@dataclass
class ModelConfig:
    name: Annotated[str, OneOf(list_models)] | None = "vgg11_bn"  # null: from model.weights
    width: Annotated[float, Range(gt=0, le=16)] | None = 1.0
    head: Literal["fc", "conv", "gap"] | None = "fc"
    dropout: Below1 = 0.5
    fc_width: PositiveInt | None = 4096
    init: Literal["kaiming", "xavier", "normal"] = "kaiming"  # normal: the paper's
    init_from: str | None = None  # a trained net A checkpoint: the paper's warm start of deeper nets
    logit_scale: Positive = 1.0  # logits x this (airbench-style recipes train at a fixed temperature, e.g. 1/9)
    whiten: bool = False  # first conv starts as a patch-whitening (PCA) of training images (small-image trick)
    # every conv's own width, replacing width scaling (a pruned network); null with model.weights: the file's own
    channels: list[PositiveInt] | None = None
    # fine-tuning: a vggnet checkpoint or torchvision / timm VGG weights; null name/width/head/fc_width
    # (and data.mean/std/image_size) are then read from the file; a classifier for other classes is re-initialised
    weights: str | None = None
    freeze: str | None = None  # no gradients up to and including this layer: block1..block5, features, fc6, fc7
    freeze_bn: bool = False  # frozen blocks' BN layers stay in eval mode (running statistics kept)


@dataclass
class DataConfig:
    dataset: Literal["folder", "digits", "cifar10", "fashion_mnist"] = "folder"  # digits: embedded; others download
    path: str | None = None
    download: bool = False
    # auto: 0.1 when every class has at least inputs.AUTO_VAL_MIN_PER_CLASS images, else 0 (train on all of a small
    # folder; the last epoch is kept); the resolved value is what the run folder's recipe.yaml records
    val_fraction: Below1 | Literal["auto"] = 0.1
    split_seed: int = 0
    image_size: PositiveInt | None = 32  # crop side fed to the network
    # paper: scale jitter + crop + flip + PCA; auto: flip_crop for crops of at most 64 px, paper for larger ones
    augment: Literal["flip_crop", "paper", "none", "auto"] = "flip_crop"
    scale: Positive | Annotated[list[Positive], Length(2)] | None = None  # paper: S or [Smin, Smax]; null: the crop
    pad: Count = 4
    flip: bool | Literal["alternate"] = True  # alternate: in memory only
    cutout: Count = 0
    lighting: NonNegative = 0.1
    mean: list[float] | None = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[Positive] | None = field(default_factory=lambda: [0.229, 0.224, 0.225])
    in_memory: bool | Literal["auto"] = "auto"  # decode once into RAM and augment batched tensors (tiny images)
    cache_dir: str | None = None  # where decoded images are cached (default: DATA/.vggnet-cache)
    workers: Count | None = None
    # shards: data.path is a folder or an fsspec URL (file://, s3://, ...) of `vggnet data shard` output, streamed
    format: Literal["images", "shards"] = "images"
    shuffle_buffer: Count = 1000  # shards: samples held by each stream's shuffle buffer (0: shard order)


@dataclass
class OptimConfig:
    name: Literal["sgd", "nesterov", "adamw"] = "sgd"
    lr: NonNegative = 0.01
    momentum: Below1 = 0.9
    weight_decay: NonNegative = 5e-4
    betas: Annotated[list[Below1], Length(2)] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: PositiveInt = 256  # global: divided among DDP processes
    label_smoothing: Fraction = 0.0
    grad_clip: NonNegative = 0.0
    bias_lr_scale: Positive = 1.0  # lr multiplier for 1-D parameters (biases, BN shifts): airbench uses 64
    decay_biases: bool = False  # decay 1-D parameters too, at the weights' per-step rate (lr x weight_decay)
    lr_mult: dict[str, NonNegative] | None = None  # {features: 0.1, head: 1.0}, blockN or a layer (most specific)
    # a small training set gets a smaller batch, so an epoch has at least this many steps; the lr follows the
    # batch linearly (0 = off: the batch as given)
    min_batches: Count = 0


@dataclass
class ScheduleConfig:
    name: Literal["plateau", "step", "cosine", "onecycle", "constant"] = "plateau"  # plateau: the paper's
    epochs: PositiveInt = 74
    min_steps: Count = 0  # a floor: epochs raised until epochs x steps per epoch >= min_steps (0 = off)
    warmup_epochs: NonNegative = 0.0
    factor: Annotated[float, Range(gt=0, le=1)] = 0.1  # plateau and step
    patience: Count = 2
    max_drops: Count = 3
    threshold: NonNegative = 0.0
    step_epochs: Positive = 30  # step
    pct_start: Fraction = 0.25  # onecycle / cosine
    final_lr_frac: Fraction = 0.0
    initial_lr_frac: Fraction = 0.04  # onecycle: the warm-up starts at this fraction of lr


@dataclass
class TrainConfig:
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where the hardware has it
    channels_last: bool = True
    compile: bool = False
    grad_checkpointing: bool = False
    ema: Below1 = 0.0  # EMA decay of weights per step (0 = off), e.g. 0.999
    lookahead: Count = 0  # every k steps pull the weights to a slow copy (0 = off); the slow copy is kept
    freeze_bn_scale: bool = False  # BN scales stay at 1, only the shifts learn (with a high bias_lr_scale)
    bn_momentum: Fraction | None = None  # BN running-stat momentum (PyTorch's convention; default 0.1)
    sync_bn: bool = False
    seed: int = 0
    deterministic: bool = False
    keep: Count = 2  # epoch checkpoints kept (0: all; best and last are always kept as files)
    eval_every: PositiveInt = 1
    threads: PositiveInt | None = None
    eval_flip: bool = False  # also report val_top1_flip: softmax averaged with the mirrored image
    stop_after_epoch: PositiveInt | None = None  # end this run after that epoch; the schedule still plans all
    checkpoint_every: Count = 0  # also checkpoint every N steps inside an epoch (data.format: shards; 0 = off)
    tracking: Literal["tensorboard", "mlflow", "none"] = "tensorboard"  # mlflow: the tracking extra
    tracking_uri: str | None = None  # mlflow: null = $MLFLOW_TRACKING_URI, else SQLite in mlruns/ beside the run
    tracking_experiment: str | None = None  # mlflow: null = $MLFLOW_EXPERIMENT_NAME, else "vggnet"


@dataclass
class Recipe:
    """A checked recipe. Mutating a field skips the checks: :meth:`override` (or ``train``) checks again."""

    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """A complete recipe mapping (as saved in recipe.yaml), checked."""
        return from_dict(cls, _without_retired(data))

    @classmethod
    def of(cls, recipe: Recipe | Mapping[str, Any]) -> Recipe:
        """A checked copy of a recipe or a recipe mapping (the caller's object is never changed)."""
        return cls.from_dict(recipe.to_dict() if isinstance(recipe, Recipe) else recipe)

    @classmethod
    def load(cls, name_or_path: str | Path, overrides: Iterable[str] | None = None) -> Recipe:
        """Defaults ← recipe file (a built-in name or a YAML path) ← ``key.sub=value`` overrides."""
        text, source = _read(name_or_path)
        data = parse_yaml(text, source) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{source} must be a YAML mapping of recipe keys")
        try:
            merged = _merge(DEFAULTS, _without_retired(data))
            cls.from_dict(merged)  # a bad value in the file is named with the file
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
        overrides = list(overrides or [])
        for item in overrides:
            merged = _override(merged, item)
        return cls.from_dict(_explicit_wins(merged, overrides))

    def override(self, *items: str) -> Recipe:
        """A new recipe with ``section.key=value`` overrides applied and checked."""
        merged = self.to_dict()
        for item in items:
            merged = _override(merged, item)
        return Recipe.from_dict(merged)

    def to_dict(self) -> RecipeDict:
        return asdict(self)

    def dump(self) -> str:
        return dump_recipe(self)


DEFAULTS: RecipeDict = Recipe().to_dict()
# a value given on the command line is the user's choice: the floor that would otherwise raise it is turned off
_FLOORS = {"schedule.epochs": "schedule.min_steps", "optim.batch_size": "optim.min_batches"}


def _explicit_wins(merged: RecipeDict, overrides: list[str]) -> RecipeDict:
    """``--epochs 3`` (``schedule.epochs=3``) means three epochs even where the recipe has ``schedule.min_steps``;
    likewise ``optim.batch_size`` and ``optim.min_batches``, unless the floor is also given."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    for value, floor in _FLOORS.items():
        if value in keys and floor not in keys:
            section, key = floor.split(".")
            merged = {**merged, section: {**merged[section], key: 0}}
    return merged
# keys whose value is a mapping of the user's own keys (checked against the model when training starts)
OPEN_MAPPINGS = {"optim.lr_mult"}
# keys that no longer exist, with the value old run folders saved (read and dropped) and what to do instead
RETIRED = {"train.record_shards": (False, "it was a test-only hook; a test can record shards through TrainHooks")}


def builtin_recipes() -> list[str]:
    return recipe_names()


def _read(name_or_path: str | Path) -> tuple[str, str]:
    """The text of a recipe and how to name it in messages."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named like a recipe (cifar10/) is not one
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return path.read_text(), f"recipe file {path}"
    ref = resources.files("vggnet.recipes") / f"{name_or_path}.yaml"
    if not ref.is_file():
        raise RecipeError(f"unknown recipe {str(name_or_path)!r}; built-in: {', '.join(builtin_recipes())}")
    return ref.read_text(), f"recipe {name_or_path}"


def _without_retired(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` less the retired keys an old run folder's recipe.yaml may hold at their old value."""
    out = dict(data)
    for key, (old, why) in RETIRED.items():
        section, name = key.split(".")
        if isinstance(out.get(section), Mapping) and name in out[section]:
            if out[section][name] != old:
                raise RecipeError(f"{key} was removed: {why}")
            out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def _merge(base: RecipeDict, update: Mapping[str, Any], where: str = "") -> RecipeDict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            raise RecipeError(f"unknown recipe key {path!r}; known: {', '.join(sorted(base))}")
        if path in OPEN_MAPPINGS and (value is None or isinstance(value, dict)):
            out[key] = None if value is None else {**(base[key] or {}), **value}  # null clears the mapping
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key {path!r} must be a mapping")
            out[key] = _merge(base[key], value, path + ".")
        else:
            out[key] = value
    return out


def _override(recipe: RecipeDict, item: str) -> RecipeDict:
    """``optim.lr=0.1``: the value is parsed as YAML (numbers, lists, null, true/false); not checked yet."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {item!r} must look like section.key=value")
    update: RecipeDict = {}
    node = update
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = parse_yaml(raw, f"override {item!r}")
    return _merge(recipe, _without_retired(update))


def load_recipe(name_or_path: str | Path, overrides: Iterable[str] | None = None) -> RecipeDict:
    """:meth:`Recipe.load` as a plain mapping (the shape of recipe.yaml), for readers of run recipes."""
    return Recipe.load(name_or_path, overrides).to_dict()


def apply_override(recipe: Mapping[str, Any], item: str) -> RecipeDict:
    """A recipe mapping with one ``section.key=value`` override applied and the result checked."""
    merged = _override(dict(recipe), item)
    Recipe.from_dict(merged)
    return merged


def save_recipe(recipe: Recipe | Mapping[str, Any], path: Path) -> None:
    write_text(path, dump_recipe(recipe))
