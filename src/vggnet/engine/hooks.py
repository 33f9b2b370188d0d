"""The training loop's extension points, so that distillation or quantization-aware training reuse the loop whole.

:func:`vggnet.engine.train` takes ``hooks=TrainHooks(...)``; every hook has a default that does what the plain
loop does, so a caller sets only what it changes:

* ``loss(logits, targets, images)``: the loss to minimise, inside the model's autocast region (default: the
  recipe's cross-entropy). Validation loss stays the plain cross-entropy.
* ``check_inputs(inputs)``: sees the data before anything is built or written, and may refuse it.
* ``wrap_model(model, inputs)``: after the weights are loaded and frozen, before the optimizer and resume; returns
  the module the loop trains (e.g. a QAT-prepared ``torch.export`` graph). A module other than ``model`` is trained
  alone: EMA, compile, channels_last, DDP, lookahead and ``optim.lr_mult`` are refused with it.
* ``set_mode(module, training)``: replaces ``module.train(training)`` for graphs that ignore it.
* ``state_dict(module)`` / ``load_state_dict(module, state)``: a wrapped module's part of every epoch checkpoint.
* ``finish(module, out_dir, inputs) -> dict``: on rank 0 once the run has trained its last epoch (also when a rerun
  finds it complete); the dict is merged into the metrics :func:`~vggnet.engine.train` returns.
* ``model_is_result``: False when the wrapped module trains a copy of the VGG (QAT's prepared graph), so the VGG
  stays the unchanged source: it is still checkpointed (a resume needs it), but no ``best`` / ``last.safetensors``
  links to it, or the folder would offer the source's fp32 weights as its result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggnet.models import VGG

from .inputs import Inputs

__all__ = ["LossFn", "TrainHooks"]

# (logits, targets, images) -> the loss; images are the batch the model saw (a teacher can see it too)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _no_check(inputs: Inputs) -> None:
    return None


def _same_model(model: VGG, inputs: Inputs) -> nn.Module:
    return model


def _train_mode(module: nn.Module, training: bool) -> None:
    module.train(training)


def _state_dict(module: nn.Module) -> dict[str, Any]:
    return module.state_dict()


def _load_state_dict(module: nn.Module, state: dict[str, Any]) -> None:
    module.load_state_dict(state)


def _nothing(module: nn.Module, out_dir: Path, inputs: Inputs) -> dict[str, Any]:
    return {}


@dataclass
class TrainHooks:
    """What a caller changes in the loop (see the module docstring); the defaults are the plain loop."""

    loss: LossFn | None = None  # None: cross-entropy with the recipe's label smoothing
    check_inputs: Callable[[Inputs], None] = _no_check
    wrap_model: Callable[[VGG, Inputs], nn.Module] = _same_model
    set_mode: Callable[[nn.Module, bool], None] = _train_mode
    state_dict: Callable[[nn.Module], dict[str, Any]] = _state_dict
    load_state_dict: Callable[[nn.Module, dict[str, Any]], None] = _load_state_dict
    finish: Callable[[nn.Module, Path, Inputs], dict[str, Any]] = _nothing
    model_is_result: bool = True  # False: no best/last.safetensors (the VGG is only the wrapped module's source)
