"""Fine-tuning inside the training loop: start from weights, freeze a prefix, per-part learning rates.

A recipe may leave the architecture and preprocessing to the weights (``null`` in ``model.name``,
``model.width``, ``model.head``, ``model.fc_width``, ``data.mean``, ``data.std``, ``data.image_size``):
they are then read from ``model.weights`` before anything is built, so ``--weights vgg16.pth`` alone
gives a VGG-16 fed ImageNet-normalised 224-px crops, as torchvision's weights expect. The resolved
values are what the run folder's ``recipe.yaml`` records, so a resumed run needs nothing re-inferred.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from vggnet.errors import UsageError
from vggnet.models import VGG, checkpoint_file
from vggnet.models.pretrained import WeightsInfo, inspect_weights, load_backbone

from .recipe import Recipe, RecipeError, parse_yaml

R = TypeVar("R", Recipe, Mapping[str, Any])

FROM_WEIGHTS = {"model": ("name", "width", "head", "fc_width"), "data": ("mean", "std", "image_size")}
_PARTS = ("features", "head")  # lr_mult keys besides blocks and layer names (classifier = the last layer)


class Pretrained:
    """A weights file read once: its tensors and what they imply."""

    def __init__(self, path: str) -> None:
        self.path = checkpoint_file(path)  # a run folder means its best (else last) checkpoint
        self.state, self.info = inspect_weights(self.path)

    @property
    def meta(self) -> dict[str, str]:
        return {"source": str(self.path), "format": self.info.format}


def resolve_recipe(recipe: R, resumed: Path | None = None) -> tuple[R, Pretrained | None]:
    """Fill the recipe's ``null`` architecture and preprocessing keys from ``model.weights``.

    ``resumed`` is the ``recipe.yaml`` of a run being continued: the values come from there and the weights
    file is not read at all (the checkpoint replaces every weight, and the file may be gone by now).
    A recipe mapping gives a mapping back, a :class:`Recipe` a new Recipe.
    """
    if not isinstance(recipe, Recipe):
        typed, pretrained = resolve_recipe(Recipe.of(recipe), resumed)
        return typed.to_dict(), pretrained  # type: ignore[return-value]
    m = recipe.model
    left = [f"{section}.{key}" for section, keys in FROM_WEIGHTS.items() for key in keys
            if getattr(getattr(recipe, section), key) is None]
    if not m.weights:
        if left:
            raise RecipeError(f"the recipe leaves {', '.join(left)} to the weights (null), but no weights are given: "
                              "pass --weights FILE (a vggnet checkpoint, or torchvision / timm VGG weights) "
                              "or set those keys")
        return recipe, None
    if m.init_from:
        raise RecipeError("model.weights and model.init_from both start the model from a file; give one of them")
    recipe = copy.deepcopy(recipe)
    if resumed is not None and resumed.is_file():
        saved = parse_yaml(resumed.read_text(), str(resumed)) or {}
        implied = {section: saved.get(section) or {} for section in FROM_WEIGHTS}
        return _fill(recipe, implied), None
    pretrained = Pretrained(m.weights)
    info: WeightsInfo = pretrained.info
    implied = {"model": {"fc_width": 4096, **info.config}}
    if any(getattr(recipe.data, key) is None for key in FROM_WEIGHTS["data"]):
        implied["data"] = info.preprocessing(f"{pretrained.path} (needed for the recipe's null data keys)")
    recipe = _fill(recipe, implied)
    if m.channels is None and info.config.get("channels") is not None:  # a pruned file: its own widths
        recipe.model.channels = list(info.config["channels"])
    return recipe, pretrained


def _fill(recipe: Recipe, implied: dict[str, Any]) -> Recipe:
    """``recipe`` with its null :data:`FROM_WEIGHTS` keys taken from ``implied`` (section -> key -> value)."""
    for section, keys in FROM_WEIGHTS.items():
        part = getattr(recipe, section)
        for key in keys:
            if getattr(part, key) is None:
                setattr(part, key, implied.get(section, {}).get(key))
    return recipe


def load_pretrained(model: VGG, pretrained: Pretrained, classes: list[str]) -> str:
    """Load the weights into ``model``; the classifier only when the file was trained on these very
    classes (by name; by count when the file names none). Returns a line for the log."""
    info = pretrained.info
    same = info.classes == classes if info.classes is not None else info.config["num_classes"] == len(classes)
    loaded = load_backbone(model, pretrained.state, keep_classifier=same)
    pretrained.state = {}  # the file's tensors are in the model now; do not hold a second copy for the run
    what = f"weights: {info.describe()} from {pretrained.path}"
    if loaded:
        return f"{what}; all layers loaded, classifier included (same classes)"
    return (f"{what}; backbone loaded, classifier {model.head.classifier} re-initialised for {len(classes)} classes "
            f"(the file's {info.config['num_classes']} classes differ)")


def freeze(model: VGG, through: str | None, freeze_bn: bool) -> tuple[list[str], list[str]]:
    """Stop gradients for every layer up to and including ``through`` (``block3``, ``features``, a layer
    name such as ``fc6``). Returns the frozen layer names and, with ``freeze_bn``, the names of the BN
    layers among them, which the loop keeps in eval mode so their running statistics stay the weights'."""
    if not through:
        if freeze_bn:
            raise UsageError("model.freeze_bn keeps the BN statistics of frozen blocks: set model.freeze too "
                             "(e.g. model.freeze=block3)")
        return [], []
    layers = [] if through == "head" else model.layers_through(str(through))
    if not layers or layers[-1][0] == model.head.classifier:
        raise UsageError(f"model.freeze={through} would freeze the whole network; freeze up to a block "
                         "(block1..blockN), 'features', or a head layer before the classifier (fc6, fc7)")
    for _, module in layers:
        module.requires_grad_(False)
    bns = [n for n, m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm)] if freeze_bn else []
    return [name for name, _ in layers], bns


def lr_multipliers(model: VGG, spec: dict[str, float] | None) -> dict[str, float]:
    """The learning-rate multiplier of every parameter: the most specific key of ``spec`` wins (a layer
    such as ``block5_conv1``, ``fc6`` or ``classifier`` (the last layer), then a block ``blockN``, then
    ``features`` or ``head``); parameters named by no key run at 1.0."""
    if spec is not None and not isinstance(spec, dict):
        raise UsageError(f"optim.lr_mult must be a mapping such as {{features: 0.1, head: 1.0}}, got {spec!r}")
    blocks = {f"block{i + 1}" for i in range(len(model.blocks()))}
    resolved: dict[str, float] = {}
    for key, value in (spec or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UsageError(f"optim.lr_mult.{key} must be a number >= 0, got {value!r}")
        if key in _PARTS or key in blocks:
            name = key
        else:
            try:
                name = model.resolve_layer(str(key))
            except ValueError:
                raise UsageError(f"optim.lr_mult: unknown key {key!r}; use features, head, "
                                 f"{', '.join(sorted(blocks))} or a layer name (see `vggnet info`)") from None
            if not any(True for _ in dict(model.named_layers())[name].parameters()):
                raise UsageError(f"optim.lr_mult.{key}: layer {name} has no parameters to scale")
        resolved[name] = float(value)
    out = {}
    for pname, _ in model.named_parameters():
        part, layer = pname.split(".")[:2]
        block = layer.split("_")[0] if part == "features" else None
        scopes = [layer, block, part]
        out[pname] = next((resolved[s] for s in scopes if s in resolved), 1.0)
    return out

