"""The VGG model zoo: every configuration of the paper, with and without batch norm.

Imports nothing of training, data or serving. The names that need torch are loaded on first use (PEP 562), so
``vggnet.models.configs``, :func:`list_models` and ``vggnet info --help`` cost no torch import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .configs import CONFIGS, NAME_TO_CONFIG, PAPER_PARAMS, PAPER_WARM_START_LAYERS

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ below loads them
    import torch

    from .complexity import count_macs, count_params, layer_table, meta_model
    from .init import INIT_SCHEMES, init_from_shallower, init_weights, init_whitening
    from .vgg import VGG, VGGConfig
    from .weights import (
        CHECKPOINT_NAMES,
        WeightsError,
        WeightsNotFoundError,
        checkpoint_file,
        checkpoint_meta,
        detect_format,
        load_checkpoint,
        load_weights,
        read_checkpoint,
        save_checkpoint,
    )

# name -> the submodule that defines it (each imports torch)
_LAZY: dict[str, str] = {
    **dict.fromkeys(("count_macs", "count_params", "layer_table", "meta_model"), ".complexity"),
    **dict.fromkeys(("INIT_SCHEMES", "init_from_shallower", "init_weights", "init_whitening"), ".init"),
    **dict.fromkeys(("VGG", "VGGConfig"), ".vgg"),
    **dict.fromkeys(("CHECKPOINT_NAMES", "WeightsError", "WeightsNotFoundError", "checkpoint_file",
                     "checkpoint_meta", "detect_format", "load_checkpoint", "load_weights", "read_checkpoint",
                     "save_checkpoint"), ".weights"),
}

__all__ = [
    "CHECKPOINT_NAMES", "CONFIGS", "INIT_SCHEMES", "NAME_TO_CONFIG", "PAPER_PARAMS", "PAPER_WARM_START_LAYERS", "VGG",
    "VGGConfig", "WeightsError", "WeightsNotFoundError", "checkpoint_file", "checkpoint_meta", "count_macs",
    "count_params", "create_model", "detect_format", "init_from_shallower", "init_weights", "init_whitening",
    "layer_table", "list_models", "load_checkpoint", "load_weights", "meta_model", "read_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    """Load a torch-backed name on first access and cache it, so later lookups skip this hook."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The lazy names too, so ``dir()`` and tab completion list them before first use."""
    return sorted(set(globals()) | set(__all__))


def list_models() -> list[str]:
    """All model names, in the paper's order (A, A-LRN, B, C, D, E), plain then ``_bn``."""
    return [name + suffix for name in NAME_TO_CONFIG for suffix in ("", "_bn")]


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    width: float = 1.0,
    head: str = "fc",
    dropout: float = 0.5,
    weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    init: str = "kaiming",
    fc_width: int = 4096,
    logit_scale: float = 1.0,
    channels: Sequence[int] | None = None,
) -> VGG:
    """Build a VGG by name (see :func:`list_models`).

    ``width`` scales every conv (0.25 is d2l's "small VGG"); ``head`` is ``fc`` (the paper's
    FC stack), ``conv`` (the same weights as convolutions: dense evaluation) or ``gap``.
    ``weights`` is a vggnet checkpoint or a torchvision/timm VGG state dict (path or mapping);
    its format is detected. ``init`` is ``kaiming``, ``xavier`` or ``normal`` (the paper's).
    ``logit_scale`` multiplies the logits (a fixed temperature some fast recipes train with).
    ``channels`` gives every conv its own width instead of ``width`` (a pruned network's widths).
    """
    from .init import init_weights
    from .vgg import VGG, VGGConfig
    from .weights import load_weights

    config = VGGConfig(name=name, num_classes=num_classes, in_channels=in_channels, width=width,
                       head=head, dropout=dropout, fc_width=fc_width, logit_scale=logit_scale,
                       channels=None if channels is None else tuple(channels))
    model = init_weights(VGG(config), init)
    if weights is not None:
        load_weights(model, weights)
    return model
