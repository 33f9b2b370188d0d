"""Recipes: YAML files of training settings, merged over defaults, overridable from the command line.

A recipe names only what differs from the defaults below; every key must exist in the defaults,
so a typo (``optim.lr_rate``) is an error rather than a silently ignored setting. The resolved
recipe is saved in the run folder, which makes every run reproducible from its folder alone.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

Recipe = dict[str, Any]


class RecipeLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a string; in a recipe or an override
    (``optim.lr=1e-3``) it is meant as a number, and a string learning rate fails deep inside the optimizer."""


class RecipeDumper(yaml.SafeDumper):
    """Writes what RecipeLoader reads back unchanged: a string that looks like ``1e3`` is quoted."""


_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (RecipeLoader, RecipeDumper):
    _cls.yaml_implicit_resolvers = {k: list(v) for k, v in _cls.yaml_implicit_resolvers.items()}  # own copy
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML that :func:`load_recipe` reads back unchanged (keys in the defaults' order)."""
    return yaml.dump(recipe, Dumper=RecipeDumper, sort_keys=False)


DEFAULTS: Recipe = {
    "description": "",
    "model": {
        "name": "vgg11_bn", "width": 1.0, "head": "fc", "dropout": 0.5, "fc_width": 4096,
        "init": "kaiming",  # kaiming | xavier | normal (the paper's)
        "init_from": None,  # a trained net A checkpoint: the paper's warm start of deeper nets
        "logit_scale": 1.0,  # logits x this (airbench-style recipes train at a fixed temperature, e.g. 1/9)
        "whiten": False,  # first conv starts as a patch-whitening (PCA) of training images (small-image trick)
        # every conv's own width, replacing width scaling (a pruned network: `vggnet compress prune` sets it);
        # null with model.weights: the file's own widths
        "channels": None,
        # fine-tuning: a vggnet checkpoint or torchvision / timm VGG weights; null name/width/head/fc_width
        # (and data.mean/std/image_size) are then read from the file; the classifier is re-initialised
        # when the file's classes differ from the data's
        "weights": None,
        "freeze": None,  # no gradients up to and including this layer: block1..block5, features, fc6, fc7
        "freeze_bn": False,  # frozen blocks' BN layers stay in eval mode (running statistics kept)
    },
    "data": {
        "dataset": "folder",  # folder (ImageFolder tree) | digits (embedded) | cifar10 | fashion_mnist (download)
        "path": None, "download": False,
        "val_fraction": 0.1, "split_seed": 0,
        "image_size": 32,  # crop side fed to the network
        "augment": "flip_crop",  # flip_crop (pad-and-crop + flip) | paper (scale jitter + crop + flip + PCA) | none
        "scale": None,  # paper: shorter side S, an int or [Smin, Smax] (jitter); default = image_size
        "pad": 4, "flip": True, "cutout": 0, "lighting": 0.1,  # flip: true | false | alternate (in memory)
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "in_memory": "auto",  # decode once into RAM and augment batched tensors (tiny images)
        "cache_dir": None,  # where decoded images are cached (default: DATA/.vggnet-cache)
        "workers": None,
    },
    "optim": {
        "name": "sgd",  # sgd | nesterov | adamw
        "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "betas": [0.9, 0.999],
        "batch_size": 256,  # global: divided among DDP processes
        "label_smoothing": 0.0, "grad_clip": 0.0,
        "bias_lr_scale": 1.0,  # lr multiplier for 1-D parameters (biases, BN shifts): airbench uses 64
        "decay_biases": False,  # decay 1-D parameters too, at the weights' per-step rate (lr x weight_decay)
        "lr_mult": None,  # lr multipliers: {features: 0.1, head: 1.0}, blockN or a layer (most specific wins)
    },
    "schedule": {
        "name": "plateau",  # plateau (the paper's) | step | cosine | onecycle | constant
        "epochs": 74, "warmup_epochs": 0.0,
        "factor": 0.1, "patience": 2, "max_drops": 3, "threshold": 0.0,  # plateau
        "step_epochs": 30,  # step
        "pct_start": 0.25, "final_lr_frac": 0.0,  # onecycle / cosine
        "initial_lr_frac": 0.04,  # onecycle: the warm-up starts at this fraction of lr
    },
    "train": {
        "precision": "auto",  # auto (bf16 where the hardware has it) | bf16 | fp16 | fp32
        "channels_last": True, "compile": False, "grad_checkpointing": False,
        "ema": 0.0,  # EMA decay of weights per step (0 = off), e.g. 0.999
        "lookahead": 0,  # every k steps pull the weights to a slow copy (0 = off); the slow copy is kept at the end
        "freeze_bn_scale": False,  # BN scales stay at 1, only the shifts learn (with a high bias_lr_scale)
        "bn_momentum": None,  # BN running-stat momentum (PyTorch's convention; default 0.1)
        "sync_bn": False, "seed": 0, "deterministic": False,
        "keep": 2,  # epoch checkpoints kept (best and last are always kept as files)
        "eval_every": 1, "threads": None,
        "eval_flip": False,  # also report val_top1_flip: softmax averaged with the mirrored image
        "stop_after_epoch": None,  # end this run after that epoch; the schedule still plans schedule.epochs
        "record_shards": False,  # debugging/tests: write each rank's sample indices of epoch 1
        "tracking": "tensorboard",  # tensorboard (tb/ in the run folder) | mlflow (the tracking extra) | none
        "tracking_uri": None,  # mlflow: null = $MLFLOW_TRACKING_URI, else SQLite in mlruns/ beside the run folder
        "tracking_experiment": None,  # mlflow: null = $MLFLOW_EXPERIMENT_NAME, else "vggnet"
    },
}


def builtin_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("vggnet.recipes").iterdir()
                  if p.name.endswith(".yaml"))


# keys whose value is a mapping of the user's own keys (checked against the model when training starts)
OPEN_MAPPINGS = {"optim.lr_mult"}


def _merge(base: Recipe, update: Recipe, where: str = "") -> Recipe:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            raise ValueError(f"unknown recipe key {path!r}; known: {', '.join(sorted(base))}")
        if path in OPEN_MAPPINGS and (value is None or isinstance(value, dict)):
            out[key] = None if value is None else {**(base[key] or {}), **value}  # null clears the mapping
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"recipe key {path!r} must be a mapping")
            out[key] = _merge(base[key], value, path + ".")
        else:
            out[key] = value
    return out


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Defaults ← recipe file (a built-in name or a YAML path) ← ``key.sub=value`` overrides."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named like a recipe (cifar10/) is not one
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        text = path.read_text()
    else:
        ref = resources.files("vggnet.recipes") / f"{name_or_path}.yaml"
        if not ref.is_file():
            raise ValueError(f"unknown recipe {name_or_path!r}; built-in: {', '.join(builtin_recipes())}")
        text = ref.read_text()
    data = parse_yaml(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {name_or_path} must be a YAML mapping")
    recipe = _merge(DEFAULTS, data)
    for item in overrides or []:
        recipe = apply_override(recipe, item)
    return recipe


def apply_override(recipe: Recipe, item: str) -> Recipe:
    """``optim.lr=0.1``: the value is parsed as YAML (numbers, lists, null, true/false)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.key=value")
    update: Recipe = {}
    node = update
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = parse_yaml(raw)
    return _merge(recipe, update)


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(dump_recipe(recipe))
