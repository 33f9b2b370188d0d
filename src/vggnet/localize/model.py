"""The box network: a classification VGG whose last layer regresses boxes (Appendix A).

The paper replaces the last fully connected layer by a box predictor: 4 outputs shared by every class
(single-class regression, SCR) or 4 per class (per-class regression, PCR). Here that is the ``fc`` head with
``4`` or ``4 × C`` outputs, so everything else — the fc-as-conv head, layer names, checkpoints, export —
works unchanged, and a classification checkpoint initialises every layer but the last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from vggnet.models import VGG, WeightsError, checkpoint_file, create_model
from vggnet.models.pretrained import inspect_weights, load_backbone

TASK = "localize"


@dataclass(frozen=True)
class BoxSpec:
    """What the last layer predicts: one box (SCR) or one per class (PCR) for ``classes``."""

    classes: tuple[str, ...]
    per_class: bool = False

    @property
    def outputs(self) -> int:
        return 4 * (len(self.classes) if self.per_class else 1)

    def metadata(self) -> dict[str, Any]:
        return {"task": TASK, "box_classes": list(self.classes), "per_class": self.per_class}

    @classmethod
    def from_metadata(cls, extra: dict[str, Any], where: str = "checkpoint") -> BoxSpec:
        if extra.get("task") != TASK:
            raise WeightsError(f"{where} is not a box-regression checkpoint (train one with `vggnet localize train`)")
        return cls(tuple(extra["box_classes"]), bool(extra["per_class"]))


def build_box_model(name: str, spec: BoxSpec, *, width: float = 1.0, fc_width: int | None = None,
                    dropout: float = 0.5, weights: str | os.PathLike | None = None) -> tuple[VGG, dict[str, Any]]:
    """A VGG with an ``fc`` head of ``spec.outputs`` outputs; with ``weights`` (a vggnet, torchvision or timm
    classification file) every layer but the last is loaded from it, and the architecture (configuration,
    width, fc width) is the file's. Returns the model and what the weights say of themselves (``{}`` without).
    """
    info: dict[str, Any] = {}
    if weights is not None:
        if os.path.isdir(weights):  # a run folder: its best checkpoint, as everywhere else
            weights = checkpoint_file(weights)
        state, winfo = inspect_weights(weights)
        config = winfo.config
        name, width = config["name"], config.get("width", 1.0)
        fc_width = config.get("fc_width", fc_width) if config.get("head") != "gap" else fc_width
        info = {"weights": str(weights), "format": winfo.format, "mean": winfo.mean, "std": winfo.std,
                "image_size": winfo.image_size, "describe": winfo.describe()}
    kwargs: dict[str, Any] = {"num_classes": spec.outputs, "width": width, "head": "fc", "dropout": dropout}
    if fc_width is not None:
        kwargs["fc_width"] = fc_width
    model = create_model(name, **kwargs)
    if weights is not None:
        if config.get("head") == "gap":  # no fc6/fc7 to carry over: the conv layers only, the fc head starts fresh
            model.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                            if k.startswith("features.")})
        else:
            load_backbone(model, state, keep_classifier=False)
    return model, info


def freeze_features(model: VGG) -> list[str]:
    """Fine-tune the FC layers only (the paper's cheaper variant): conv parameters frozen, BN in eval mode."""
    names = []
    for name, param in model.features.named_parameters():
        param.requires_grad_(False)
        names.append(f"features.{name}")
    return names


def select_codes(out: torch.Tensor, spec: BoxSpec, labels: torch.Tensor | None) -> torch.Tensor:
    """N × outputs → the N × 4 box codes to use: SCR's only box, or PCR's box of each row's class (``labels``:
    the true class when scoring the regressor alone, as the paper's first protocol does, or a predicted one)."""
    if not spec.per_class:
        return out
    if labels is None:
        raise ValueError("per-class regression needs the class of each image to pick its box")
    return out.view(out.shape[0], len(spec.classes), 4)[torch.arange(out.shape[0]), labels]
