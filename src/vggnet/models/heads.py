"""Classifier heads: the paper's FC stack, its fully-convolutional twin, and a compact GAP head.

``fc`` and ``conv`` hold the same weights in different shapes (fc6 is a 7×7 conv over the
last feature map; fc7/fc8 are 1×1 convs), so one checkpoint serves both ordinary and the
paper's dense evaluation. :func:`convert_head` moves weights between the two.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .configs import FC_INPUT_GRID

HEADS = ("fc", "conv", "gap")


class AtLeast(nn.Module):
    """Average-pool a map up to at least ``size``×``size`` (replicating small maps), never down.

    Lets the 7×7 fc6 conv run on inputs under 224 px, and matches what the ``fc`` head's
    adaptive pool does there, so both heads agree at every input size ≤ 224.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h >= self.size and w >= self.size:
            return x
        return F.adaptive_avg_pool2d(x, (max(h, self.size), max(w, self.size)))


class _Head(nn.Sequential):
    """A named sequence ending in a classifier layer; ``pre_logits`` stops before it."""

    classifier = "fc8"

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # type: ignore[override]
        for name, module in self.named_children():
            if name == self.classifier:
                if pre_logits:
                    return self.reduce(x)
                x = self.reduce(module(x))
            else:
                x = module(x)
        return x

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FCHead(_Head):
    """pool to 7×7 → fc6 → fc7 → fc8, with ReLU and dropout on fc6/fc7 (paper, torchvision)."""

    def __init__(self, in_channels: int, num_classes: int, fc_width: int, dropout: float) -> None:
        g = FC_INPUT_GRID
        super().__init__(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d((g, g))),
            ("flatten", nn.Flatten(1)),
            ("fc6", nn.Linear(in_channels * g * g, fc_width)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Linear(fc_width, fc_width)),
            ("relu7", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(dropout)),
            ("fc8", nn.Linear(fc_width, num_classes)),
        ]))


class ConvHead(_Head):
    """fc6 as a 7×7 conv, fc7/fc8 as 1×1 convs; the class-score map is spatially averaged.

    This is the paper's dense evaluation: at inputs larger than 224 the head slides over the
    feature map and the scores of every position are averaged.
    """

    def __init__(self, in_channels: int, num_classes: int, fc_width: int, dropout: float) -> None:
        g = FC_INPUT_GRID
        super().__init__(OrderedDict([
            ("pool", AtLeast(g)),
            ("fc6", nn.Conv2d(in_channels, fc_width, g)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Conv2d(fc_width, fc_width, 1)),
            ("relu7", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(dropout)),
            ("fc8", nn.Conv2d(fc_width, num_classes, 1)),
        ]))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at every position (N × classes × h × w), before averaging."""
        for name, module in self.named_children():
            x = module(x)
            if name == self.classifier:
                return x
        raise AssertionError("unreachable")


class GAPHead(_Head):
    """Global average pool → dropout → one linear layer: 4096× fewer head parameters."""

    classifier = "fc"

    def __init__(self, in_channels: int, num_classes: int, fc_width: int, dropout: float) -> None:
        del fc_width  # no hidden layers
        super().__init__(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten(1)),
            ("drop", nn.Dropout(dropout)),
            ("fc", nn.Linear(in_channels, num_classes)),
        ]))


def make_head(kind: str, in_channels: int, num_classes: int, fc_width: int, dropout: float) -> _Head:
    classes = {"fc": FCHead, "conv": ConvHead, "gap": GAPHead}
    if kind not in classes:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return classes[kind](in_channels, num_classes, fc_width, dropout)


def as_head_shape(name: str, tensor: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    """View an fc6/fc7/fc8 weight as the other head's shape (Linear (o, c·7·7) ↔ Conv (o, c, 7, 7)).

    Linear flattens a (c, 7, 7) map channel-major, which is exactly the memory order of a conv
    kernel, so the conversion is a reshape and the logits stay equal.
    """
    if tensor.shape == target_shape:
        return tensor
    if tensor.numel() != target_shape.numel():
        raise ValueError(f"{name}: cannot reshape {tuple(tensor.shape)} to {tuple(target_shape)}")
    return tensor.reshape(target_shape)


def convert_head(head: _Head, kind: str) -> _Head:
    """Return a new ``fc`` or ``conv`` head holding ``head``'s weights."""
    if not isinstance(head, (FCHead, ConvHead)) or kind not in ("fc", "conv"):
        raise ValueError("only the fc and conv heads hold the same weights; the gap head cannot be converted")
    fc6 = head.fc6
    in_channels = fc6.in_channels if isinstance(fc6, nn.Conv2d) else fc6.in_features // FC_INPUT_GRID**2
    fc8 = head.fc8
    num_classes = fc8.out_channels if isinstance(fc8, nn.Conv2d) else fc8.out_features
    fc_width = fc6.out_channels if isinstance(fc6, nn.Conv2d) else fc6.out_features
    dropout = head.drop6.p
    new = make_head(kind, in_channels, num_classes, fc_width, dropout).to(fc6.weight.device, fc6.weight.dtype)
    target = new.state_dict()
    new.load_state_dict({k: as_head_shape(k, v, target[k].shape) for k, v in head.state_dict().items()})
    new.train(head.training)
    return new
