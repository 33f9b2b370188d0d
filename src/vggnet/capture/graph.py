"""A VGG as a graph: ``torch.export`` with one dynamic batch dimension, and the conv + batch-norm folding every
inference graph starts from.

One :func:`batch_dim` for every capture (runtimes, ``.pt2``, ONNX, PT2E, QAT), so an exported file and a runtime
accept the same batch sizes. A batch of one would be specialised to a constant, hence the example batch of two.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vggnet.models import VGG

__all__ = ["EXAMPLE_BATCH", "MAX_BATCH", "InputShape", "batch_dim", "dynamic_batch", "example_input",
           "export_graph", "export_program", "fold_batchnorm"]

MAX_BATCH = 1 << 16
EXAMPLE_BATCH = 2  # export turns a batch of 1 into a constant


class InputShape(Protocol):
    """What capture needs of :class:`vggnet.infer.Preprocessing` (which sits above this package)."""

    in_channels: int
    image_size: int


def batch_dim() -> Any:
    """The symbolic batch size every captured graph takes: 1 to :data:`MAX_BATCH`."""
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def dynamic_batch() -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for a graph with one N×C×H×W input whose N is free."""
    return ({0: batch_dim()},)


def example_input(shape: InputShape, batch: int = EXAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
    """A deterministic normalised input batch of the model's shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, shape.in_channels, shape.image_size, shape.image_size, generator=g)


def export_program(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``module`` captured by ``torch.export`` with a dynamic batch; grad mode is the caller's (QAT captures the
    training graph)."""
    return torch.export.export(module, (example,), dynamic_shapes=dynamic_batch())


def export_graph(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """``module`` captured for inference as a fresh ``GraphModule``.

    Compiling this instead of the VGG gives every runtime its own code object, hence its own Dynamo cache:
    ``torch.compile`` on VGG instances shares ``VGG.forward``'s cache, and the ninth compiled model in a process
    silently falls back to eager after "hit config.recompile_limit (8)".
    """
    with torch.no_grad():
        return export_program(module, example).module()


def fold_batchnorm(model: VGG) -> VGG:
    """A copy of ``model`` (eval mode) with every conv → batch-norm pair folded into one conv: the same function in
    one pass over memory, and nothing left that needs batch statistics. The caller's model is untouched."""
    folded = copy.deepcopy(model).eval()
    children = list(folded.features.named_children())
    for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(folded.features, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(folded.features, bn_name, nn.Identity())
    return folded
