"""Weight initialisation: torchvision's Kaiming, Glorot (Xavier), the paper's N(0, 0.01),
and the paper's warm start of deeper nets from a trained net A."""

from __future__ import annotations

import torch
from torch import nn

from vggnet.errors import UsageError

from .configs import PAPER_WARM_START_LAYERS
from .vgg import VGG
from .weights import WeightsError

INIT_SCHEMES = ("kaiming", "xavier", "normal")


def init_weights(model: VGG, scheme: str = "kaiming") -> VGG:
    """Initialise every layer in place.

    ``kaiming``: conv He-normal (fan-out), FC N(0, 0.01) — torchvision's default, trains deep
    nets from scratch. ``xavier``: Glorot-uniform everywhere — the paper notes it removes the
    need for the warm start. ``normal``: N(0, 0.01) everywhere — the paper's random init, which
    only works for shallow nets (net A) without the warm start. Biases are zero, BN is identity.
    """
    if scheme not in INIT_SCHEMES:
        raise UsageError(f"unknown init {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    head_layers = set(model.head.modules())
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(module.weight)
            elif scheme == "kaiming" and module not in head_layers:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:  # the FC layers (whether Linear or conv-shaped), or the paper's scheme
                nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    return model


def _followers(model: VGG, conv_name: str) -> list[str]:
    """The conv's own name plus its BN's, when the model has one."""
    bn_name = conv_name.replace("_conv", "_bn")
    return [conv_name, bn_name] if hasattr(model.features, bn_name) else [conv_name]


@torch.no_grad()
def init_from_shallower(model: VGG, source: VGG, layers: tuple[str, ...] = PAPER_WARM_START_LAYERS) -> list[str]:
    """Copy ``layers`` of a trained (shallower) ``source`` into ``model``; the rest stays as is.

    The paper (Sec. 3.1) trains net A from random init, then starts B–E from A's first four
    conv layers and three FC layers. Layer names are per block (``block3_conv2``), so "the
    first four conv layers of A" land in the same place of every deeper configuration. BN
    layers come along when both nets have them. Returns the names of the layers copied.
    """
    copied: list[str] = []
    for name in layers:
        if name.startswith("fc"):
            pairs = [(getattr(model.head, name, None), getattr(source.head, name, None), name)]
        else:
            names = _followers(model, name)
            pairs = [(getattr(model.features, n, None), getattr(source.features, n, None), n) for n in names]
        for dst, src, layer in pairs:
            if dst is None or src is None:
                raise WeightsError(f"layer {layer} is missing from {'model' if dst is None else 'source'}")
            dst_state, src_state = dst.state_dict(), src.state_dict()
            for key, value in src_state.items():
                if dst_state[key].numel() != value.numel():
                    raise WeightsError(
                        f"{layer}.{key}: source shape {tuple(value.shape)} does not fit {tuple(dst_state[key].shape)}"
                        " (same width, classes and fc width are needed)"
                    )
                dst_state[key].copy_(value.reshape(dst_state[key].shape))
            copied.append(layer)
    return copied


@torch.no_grad()
def init_whitening(model: VGG, images: torch.Tensor, eps: float = 5e-4) -> int:
    """Set the first conv's filters to a patch-whitening (PCA) transform of ``images``; returns filters set.

    A fast-training trick for small images (airbench's patch-whitening, here on the VGG's own first
    3×3 conv): the filters are the principal directions of the training set's k×k×C patches divided by
    the square root of their variance, each with its negation so a ReLU keeps both signs. The first
    layer then starts out decorrelating its input instead of learning to, which saves early epochs.
    Only ``2 × min(out_channels // 2, k·k·C)`` filters are set, largest variance first; the rest keep
    their random init. ``images`` are normalised N×C×H×W network inputs (a few thousand suffice).
    """
    conv = model.features[0]
    if not isinstance(conv, nn.Conv2d):
        raise ValueError("the first feature layer is not a conv")
    out_ch, in_ch, kh, kw = conv.weight.shape
    if images.dim() != 4 or images.shape[1] != in_ch:
        raise ValueError(f"need N x {in_ch} x H x W images, got {tuple(images.shape)}")
    patches = torch.nn.functional.unfold(images.float(), (kh, kw)).transpose(1, 2).reshape(-1, in_ch * kh * kw)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    eigval, eigvec = torch.linalg.eigh(cov.double())  # ascending
    k = min(out_ch // 2, len(eigval))
    variances, directions = eigval.flip(0)[:k], eigvec.flip(1)[:, :k]  # largest variance first
    filters = (directions / (variances + eps).sqrt()).T.float().reshape(k, in_ch, kh, kw)
    conv.weight[:k] = filters
    conv.weight[k:2 * k] = -filters
    if conv.bias is not None:
        conv.bias[: 2 * k] = 0.0
    return 2 * k
