"""FGSM and PGD (L∞) in pixel space, from the Adversarial Robustness Toolbox (ART, the ``robustness`` extra).

Why ART and not torchattacks: torchattacks 3.5.1 (its latest release, 2023) pins ``requests~=2.25.1``, so
installing it would downgrade requests, urllib3 and idna below what the rest of the environment (MLflow, the
Triton client) needs; ART 1.20 installs against torch 2.14 with only ``six`` added and is maintained (LF AI).

The attacks see [0, 1] images: ART's classifier carries the model's mean / std as its own preprocessing, so ε is
in pixel units whatever the normalisation (ε = 8/255 changes each pixel by at most 8 grey levels), and the
adversarial images are clipped to [0, 1] like any image the server can receive.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vggnet.errors import UsageError
from vggnet.infer import Preprocessing

__all__ = ["ATTACKS", "PGD_STEPS", "attack", "check_available"]

ATTACKS = ("fgsm", "pgd")
#: PGD's steps, each of ε/4, from the clean image (no random start: the same images every run)
PGD_STEPS = 10


def check_available() -> None:
    """A message, not an ImportError, when ART is not installed."""
    if importlib.util.find_spec("art") is None:
        raise UsageError("vggnet robustness needs the Adversarial Robustness Toolbox, which is not installed: "
                         "pip install 'vggnet[robustness]'")


def _classifier(model: torch.nn.Module, prep: Preprocessing, device: str) -> Any:
    from art.estimators.classification import PyTorchClassifier

    shape = (-1, 1, 1)
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(shape)
    std = np.asarray(prep.std, dtype=np.float32).reshape(shape)
    return PyTorchClassifier(model=model.eval(), loss=torch.nn.CrossEntropyLoss(), nb_classes=prep.num_classes,
                             input_shape=(prep.in_channels, prep.image_size, prep.image_size), clip_values=(0.0, 1.0),
                             preprocessing=(mean, std), device_type="gpu" if device.startswith("cuda") else "cpu")


def attack(model: torch.nn.Module, prep: Preprocessing, pixels: torch.Tensor, labels: Sequence[int], kind: str,
           eps: float, batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Adversarial copies of ``pixels`` (N×C×S×S in [0, 1]) for the true ``labels``: ``fgsm`` (one signed gradient
    step of ε) or ``pgd`` (:data:`PGD_STEPS` steps of ε/4, projected onto the ε-ball), untargeted, L∞."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    classifier = _classifier(model, prep, device)
    if kind == "fgsm":
        method = FastGradientMethod(classifier, norm=np.inf, eps=eps, batch_size=batch_size)
    elif kind == "pgd":
        method = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=eps / 4, max_iter=PGD_STEPS,
                                          num_random_init=0, batch_size=batch_size, verbose=False)
    else:
        raise UsageError(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}")
    y = np.asarray(labels, dtype=np.int64)
    adversarial = method.generate(x=pixels.detach().cpu().numpy().astype(np.float32), y=y)
    return torch.from_numpy(np.asarray(adversarial, dtype=np.float32)).clamp(0, 1)
