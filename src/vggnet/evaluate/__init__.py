"""The paper's test-time evaluation (Sec. 3.2, 4.1–4.5): single crop, dense, multi-crop, multi-scale, ensembles.

Imports ``vggnet.models`` and ``vggnet.data`` only, never training (``engine``) or ``cli``.

>>> models, meta = load_models(["runs/D", "runs/E"])              # an ensemble of two runs
>>> images, labels, classes = eval_images("runs/D", "data/imagenet", "val", classes=meta["classes"])
>>> probs = predict_proba(models, images, parse_protocol("dense+multicrop@256,384,512"),
...                       crop=meta["image_size"], mean=meta["mean"], std=meta["std"])
>>> summarize(probs, labels, classes)["top1_err"]
"""

from .protocols import (
    KINDS,
    RELATIVE_BELOW,
    Protocol,
    crop_boxes,
    parse_protocol,
    predict_proba,
    resolve_scale,
    summarize,
)
from .sources import FolderImages, checkpoint_file, eval_images, find_recipe, load_models

__all__ = [
    "KINDS", "RELATIVE_BELOW", "FolderImages", "Protocol", "checkpoint_file", "crop_boxes", "eval_images",
    "find_recipe", "load_models", "parse_protocol", "predict_proba", "resolve_scale", "summarize",
]
