"""One builder for every VGG: a config table becomes named blocks plus a head.

Layer names follow Keras (``block3_conv2``, ``block3_pool``) and the paper (``fc6``…``fc8``),
so features are asked for by name rather than by ``Sequential`` index.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vggnet.errors import UsageError

from .configs import CONFIGS, FC_WIDTH, LRN, NAME_TO_CONFIG, ConfigEntry
from .heads import HEADS, ConvHead, convert_head, make_head

# block3_conv2, block3_bn2, block3_relu2, block3_pool, block1_lrn: the parts of a canonical feature name
_BLOCK_LAYER = re.compile(r"block(\d+)_(conv|bn|relu|pool|lrn)(\d*)")


class ChannelLRN(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` with the same formula, computed as a banded 1×1 convolution over x².

    PyTorch's version runs ``avg_pool3d`` over a 5-D view: about 0.5 s per forward+backward of a
    128×16×32×32 channels_last batch on this CPU (A-LRN trained 8× slower than A), and no bf16 kernel.
    The window sum over neighbouring channels is a matrix product with a 0/1 band, which oneDNN runs
    at GEMM speed in any memory format. Computed in fp32 for the power, cast back to the input dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        c = x.shape[1]
        idx = torch.arange(c, device=x.device)
        offset = idx.view(1, -1) - idx.view(-1, 1)  # [out, in]: in - out
        band = ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)).float()
        xf = x.float()
        window = nn.functional.conv2d(xf * xf, band.view(c, c, 1, 1))
        return (xf / (self.k + self.alpha / self.size * window).pow(self.beta)).to(x.dtype)


@dataclasses.dataclass(frozen=True)
class VGGConfig:
    """Everything needed to rebuild a model; saved inside every vggnet checkpoint."""

    name: str = "vgg16"
    num_classes: int = 1000
    in_channels: int = 3
    width: float = 1.0
    head: str = "fc"
    dropout: float = 0.5
    fc_width: int = FC_WIDTH
    logit_scale: float = 1.0  # logits x this: a fixed softmax temperature, part of the function served
    # The output channels of every conv in table order, replacing ``width`` scaling: a pruned network's own
    # widths (``vggnet compress prune``). None: the table's widths times ``width``.
    channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        base = self.name.removesuffix("_bn")
        if base not in NAME_TO_CONFIG:
            raise UsageError(f"unknown model {self.name!r}; see vggnet.list_models()")
        if self.head not in HEADS:
            raise UsageError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.num_classes < 1 or self.in_channels < 1 or self.fc_width < 1:
            raise UsageError("num_classes, in_channels and fc_width must be positive")
        if not 0 < self.width <= 16:
            raise UsageError(f"width must be in (0, 16], got {self.width}")
        if not self.logit_scale > 0:
            raise UsageError(f"logit_scale must be positive, got {self.logit_scale}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))  # JSON gives a list
            convs = conv_count(CONFIGS[self.config])
            if len(self.channels) != convs or min(self.channels) < 1:
                raise UsageError(f"channels must give {convs} positive conv widths for {self.name} "
                                 f"(config {self.config}), got {list(self.channels)}")

    @property
    def config(self) -> str:
        """The paper's letter: A, A-LRN, B, C, D or E."""
        return NAME_TO_CONFIG[self.name.removesuffix("_bn")]

    @property
    def batch_norm(self) -> bool:
        return self.name.endswith("_bn")

    def conv_widths(self) -> list[int]:
        """The output channels of every conv, in order: ``channels`` if set, else the table times ``width``."""
        if self.channels is not None:
            return list(self.channels)
        return [scaled(int(e[0] if isinstance(e, tuple) else e), self.width) for e in CONFIGS[self.config]
                if e not in ("M", "LRN")]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VGGConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def conv_count(table: Iterable[ConfigEntry]) -> int:
    return sum(1 for e in table if e not in ("M", "LRN"))


def make_features(table: Iterable[ConfigEntry], in_channels: int, width: float, batch_norm: bool,
                  widths: Iterable[int] | None = None) -> nn.Sequential:
    """The named conv blocks of ``table``; ``widths`` (one per conv) overrides the table's scaled widths."""
    layers: list[tuple[str, nn.Module]] = []
    block, index, channels = 1, 0, in_channels
    own = iter(widths) if widths is not None else None
    for entry in table:
        if entry == "M":
            layers.append((f"block{block}_pool", nn.MaxPool2d(2, 2)))
            block, index = block + 1, 0
        elif entry == "LRN":
            layers.append((f"block{block}_lrn", ChannelLRN(**LRN)))
        else:
            out, kernel = entry if isinstance(entry, tuple) else (entry, 3)
            out, index = (next(own) if own is not None else scaled(int(out), width)), index + 1
            layers.append((f"block{block}_conv{index}", nn.Conv2d(channels, out, kernel, padding=kernel // 2)))
            if batch_norm:
                layers.append((f"block{block}_bn{index}", nn.BatchNorm2d(out)))
            layers.append((f"block{block}_relu{index}", nn.ReLU(inplace=True)))
            channels = out
    return nn.Sequential(OrderedDict(layers))


class VGG(nn.Module):
    """A VGG network: ``features`` (named conv blocks) followed by ``head`` (fc, conv or gap)."""

    def __init__(self, config: VGGConfig) -> None:
        super().__init__()
        self.config = config
        self.features = make_features(CONFIGS[config.config], config.in_channels, config.width, config.batch_norm,
                                      config.channels)
        self.num_features = next(m.out_channels for m in reversed(self.features) if isinstance(m, nn.Conv2d))
        self.head = make_head(config.head, self.num_features, config.num_classes, config.fc_width, config.dropout)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them.

        Trades roughly one extra forward pass for keeping only block outputs in memory.
        """
        self.grad_checkpointing = enable

    def blocks(self) -> list[nn.Sequential]:
        """The feature extractor cut after each max-pool: the paper's five conv stacks."""
        out, current = [], []
        for module in self.features:
            current.append(module)
            if isinstance(module, nn.MaxPool2d):
                out.append(nn.Sequential(*current))
                current = []
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.blocks():
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head(x, pre_logits=pre_logits)
        return x if pre_logits else self._scale_logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Dense class-score map (needs the ``conv`` head); the paper averages it over positions."""
        if not isinstance(self.head, ConvHead):
            raise ValueError("score maps need the conv head: call model.convert_head('conv') first")
        return self._scale_logits(self.head.score_map(self.forward_features(x)))

    def _scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        scale = self.config.logit_scale
        return logits if scale == 1 else logits * scale

    def get_classifier(self) -> nn.Module:
        return getattr(self.head, self.head.classifier)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last layer with a freshly initialised one for ``num_classes`` (fine-tuning)."""
        old = self.get_classifier()
        if isinstance(old, nn.Conv2d):
            new: nn.Module = nn.Conv2d(old.in_channels, num_classes, 1)
        else:
            new = nn.Linear(old.in_features, num_classes)
        nn.init.normal_(new.weight, 0.0, 0.01)
        nn.init.zeros_(new.bias)
        setattr(self.head, self.head.classifier, new.to(old.weight.device, old.weight.dtype))
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def convert_head(self, kind: str) -> VGG:
        """Switch between the ``fc`` and ``conv`` heads in place, keeping the weights."""
        if kind != self.config.head:
            self.head = convert_head(self.head, kind)
            self.config = dataclasses.replace(self.config, head=kind)
        return self

    def layer_names(self) -> list[str]:
        """Every canonical layer name, in execution order (:meth:`layer_aliases` lists the other names)."""
        return [n for n, _ in self.named_layers()]

    def named_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every layer, feature blocks then head, in execution order."""
        return [*self.features.named_children(), *self.head.named_children()]

    def layer_aliases(self) -> dict[str, str]:
        """The other names a layer answers to, mapped to the canonical one.

        ``conv3_3`` / ``bn3_3`` / ``relu3_3`` / ``pool3`` are the names of style-transfer and LPIPS code
        (Caffe's VGG prototxt), ``blockN`` is a block's output (its pool), ``features.N`` is torchvision's
        ``Sequential`` index (the same order here, BN variants included), and ``classifier`` names the last
        layer, whatever the head calls it.
        """
        aliases = {f"features.{i}": name for i, (name, _) in enumerate(self.features.named_children())}
        for name, _ in self.features.named_children():
            match = _BLOCK_LAYER.fullmatch(name)
            if match:
                block, kind, index = match.groups()
                aliases[f"{kind}{block}_{index}" if index else f"{kind}{block}"] = name
                if kind == "pool":
                    aliases[f"block{block}"] = name  # a block's output
        aliases["classifier"] = self.head.classifier
        return aliases

    def resolve_layer(self, name: str) -> str:
        """The canonical name of ``name`` (canonical or alias); an unknown name lists the valid ones."""
        canonical = self.layer_names()
        if name in canonical:
            return name
        aliases = self.layer_aliases()
        if name in aliases:
            return aliases[name]
        raise UsageError(f"unknown layer name {name!r} for {self.config.name} (head={self.config.head}); "
                         f"valid names: {', '.join(canonical)} (also conv<B>_<I>, relu<B>_<I>, pool<B>, "
                         "block<B>, features.<N>, classifier)")

    def layers_through(self, name: str) -> list[tuple[str, nn.Module]]:
        """The layers from the input up to and including ``name``; ``blockN`` ends at that block's pool
        and ``features`` at the last pool (what ``model.freeze: block3`` freezes)."""
        if name == "features":
            return list(self.features.named_children())
        last = self.resolve_layer(name)
        layers = self.named_layers()
        return layers[:[n for n, _ in layers].index(last) + 1]

    def forward_intermediates(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Outputs of the named layers, keyed as asked (``["block3_conv2", "relu4_3", "fc6"]``; aliases
        work); only the layers up to the deepest requested one run.

        An output that the next layer would overwrite in place (a conv or BN before ``ReLU(inplace=True)``)
        is cloned, so each tensor is what its layer produced; gradients flow through the clones. Head layers
        give their own output too: the conv head's ``fc8`` is its score map before averaging, and
        ``logit_scale`` is not applied (``model(x)`` gives the logits).
        """
        wanted: dict[str, set[str]] = {}
        for asked in names:
            wanted.setdefault(self.resolve_layer(asked), set()).add(asked)
        total = sum(len(v) for v in wanted.values())
        found: dict[str, torch.Tensor] = {}
        layers = self.named_layers()
        for i, (name, module) in enumerate(layers):
            if len(found) == total:
                break
            x = module(x)
            if name in wanted:
                following = layers[i + 1][1] if i + 1 < len(layers) else None
                keep = x.clone() if getattr(following, "inplace", False) else x
                for asked in wanted[name]:
                    found[asked] = keep
        return found
