"""CIFAR-10 and Fashion-MNIST from torchvision, rewritten once as an ImageFolder tree.

The only module that can reach the network, and only when the caller passes ``download=True``:
tests and the default recipes never download. Writing the arrays out as ``train/`` and ``val/``
class folders means the rest of the pipeline (splits, decode cache, ``vggnet data info``) has one
input format.
"""

from __future__ import annotations

import json
from pathlib import Path

from vggnet import progress as vprogress
from vggnet.atomic import atomic_dir

from .folder import DataError
from .prepare import MARKER

BUILTIN = ("cifar10", "fashion_mnist")


def download_builtin(kind: str, root: str | Path, download: bool = False, *, progress: bool | None = None) -> Path:
    """``root/<kind>`` holding ``train/`` and ``val/`` (the official test split), built on first use. Writing
    60,000 PNGs takes minutes, so ``progress`` None or True reports it: a bar on a terminal, a line every 30 s with
    the time left elsewhere; False, nothing."""
    from torchvision import datasets

    if kind not in BUILTIN:
        raise DataError(f"unknown built-in dataset {kind!r}; choose one of {', '.join(BUILTIN)}")
    root = Path(root)
    out = root / kind
    if (out / MARKER).is_file():
        return out
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists but was not built by vggnet; move it away or pass another root")
    cls = {"cifar10": datasets.CIFAR10, "fashion_mnist": datasets.FashionMNIST}[kind]
    raw = root / f".{kind}-raw"
    try:
        splits = {"train": cls(str(raw), train=True, download=download),
                  "val": cls(str(raw), train=False, download=download)}
    except RuntimeError as exc:
        raise DataError(f"{raw}: {kind} is not there ({exc}); pass download=True "
                        "(recipe: data.download=true) to fetch it, or use an ImageFolder tree") from exc
    with atomic_dir(out) as tmp:  # replaces at most an empty folder (checked above)
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
        for split, dataset in splits.items():
            names = [c.replace("/", "-") for c in dataset.classes]  # Fashion-MNIST has "T-shirt/top"
            for name in names:
                (tmp / split / name).mkdir(parents=True)
            bar = vprogress.progress_bar(dataset, total=len(dataset), desc=f"writing {kind} {split}", unit="img",
                                         progress=progress)
            for i, (image, label) in enumerate(bar):
                image.save(tmp / split / names[label] / f"{i:05d}.png")
        (tmp / MARKER).write_text(json.dumps({"source": f"torchvision.datasets.{cls.__name__}", "root": "."}))
    return out
