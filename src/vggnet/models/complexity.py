"""Parameter and multiply-accumulate counts, computed on the meta device (no memory, no time).

MACs count conv and linear layers only, as torchvision's published "GFLOPS" do
(VGG-16 at 224²: 15.47 G), using PyTorch's own ``FlopCounterMode`` (FLOPs = 2 × MACs).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .vgg import VGG, VGGConfig


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _size(input_size: int | tuple[int, int]) -> tuple[int, int]:
    return (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)  # type: ignore[return-value]


def meta_model(model_or_config: VGG | VGGConfig) -> VGG:
    """A copy of the architecture on the meta device: shapes and counts without allocating any weights."""
    config = model_or_config.config if isinstance(model_or_config, VGG) else model_or_config
    with torch.device("meta"):
        return VGG(dataclasses.replace(config))


def count_macs(model_or_config: VGG | VGGConfig, input_size: int | tuple[int, int] = 224) -> int:
    """MACs of one forward pass of one image."""
    model = meta_model(model_or_config).eval()
    h, w = _size(input_size)
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, model.config.in_channels, h, w, device="meta"))
    return counter.get_total_flops() // 2


@dataclasses.dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def layer_table(model_or_config: VGG | VGGConfig, input_size: int | tuple[int, int] = 224) -> list[LayerRow]:
    """One row per named layer (features, then head) with its output shape for one image."""
    model = meta_model(model_or_config).eval()
    h, w = _size(input_size)
    x = torch.empty(1, model.config.in_channels, h, w, device="meta")
    rows: list[LayerRow] = []
    for part in (model.features, model.head):
        for name, module in part.named_children():
            with FlopCounterMode(display=False) as counter:
                x = module(x)
            params = sum(p.numel() for p in module.parameters())
            macs = counter.get_total_flops() // 2
            rows.append(LayerRow(name, type(module).__name__, tuple(x.shape[1:]), params, macs))
    if x.dim() == 4:  # the conv head averages its score map
        x = model.head.reduce(x)
        rows.append(LayerRow("average", "mean", tuple(x.shape[1:]), 0, 0))
    return rows
