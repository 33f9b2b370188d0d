"""What the INT8 and the mobile-format export tests share: the digits run they export (a tiny VGG trained for
seconds, in a folder as `vggnet train` leaves it) and its preprocessing."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

import vggnet
from vggnet.data import digits_tensors
from vggnet.infer import Preprocessing, preprocess

CLASSES = [str(i) for i in range(10)]
META = {"classes": CLASSES, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "image_size": 32}
DATA = {"dataset": "digits", "image_size": 32, "val_fraction": 0.2, "split_seed": 0}
PREP = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), image_size=32, in_channels=3, num_classes=10,
                     classes=tuple(CLASSES))


def digits(split):
    return digits_tensors(split, size=32, channels=3, val_fraction=DATA["val_fraction"], seed=DATA["split_seed"])


def trained_run(folder: Path) -> Path:
    """A run folder as `vggnet train` leaves it, as far as export reads it: best.safetensors and recipe.yaml.

    Trained (three epochs, a few seconds), not random: an untrained net's logits are nearly tied, so INT8
    rounding would flip its top-1 on many images and the agreement would measure noise, not the export.
    """
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, head="gap")
    x, y = digits("train")
    x = preprocess(list(x), PREP)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    vggnet.save_checkpoint(model.eval(), folder / "best.safetensors", META)
    recipe = {"model": {"name": "vgg11_bn", "width": 0.125, "head": "gap"}, "data": DATA}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder
