"""The page's out-of-domain reference (vggnet.serve.ood): computed when a version loads from the run's own
validation split when it is in memory (the embedded digits), read from ``ood.json`` when stored, absent otherwise;
and the verdict the page shows. The measured rates: benchmarks/ood_page.py."""

from __future__ import annotations

import json

import numpy as np
import torch
from fastapi.testclient import TestClient

import vggnet
from serve_helpers import jpeg_bytes
from vggnet.infer import Preprocessing
from vggnet.models import checkpoint_meta
from vggnet.serve import ModelRepository, ServeSettings, create_app, ood

META = {"classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}


def _run(folder, recipe: bool):
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, head="gap")
    ckpt = vggnet.save_checkpoint(model, folder / "best.safetensors", META)
    if recipe:
        (folder / "recipe.yaml").write_text("data:\n  dataset: digits\n  val_fraction: 0.1\n  split_seed: 0\n")
    return ckpt


def _served_ood(ckpt):
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                     ServeSettings(load_in_background=False, access_log=False))
    with TestClient(app) as c:
        r = c.post("/predict?explain=1", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
        first = json.loads(r.text.splitlines()[0])
        return first["ood"]


def test_reference_from_the_digits_validation_split_at_load_and_the_verdict(tmp_path):
    ckpt = _run(tmp_path / "run", recipe=True)
    model, extra = vggnet.load_checkpoint(ckpt)
    model.eval()
    prep = Preprocessing.from_meta(checkpoint_meta(ckpt, model, extra))
    ref = ood.compute_reference(model, prep, ckpt)
    assert ref["images"] == 179 and ref["false_alarm"] == 0.05  # the 10 % split of 1,797 digits
    shown = _served_ood(ckpt)
    assert shown["signal"] == "max_softmax" and abs(shown["threshold"] - ref["threshold"]) < 1e-4
    assert shown["unusual"] == (shown["score"] < shown["threshold"])
    scores = np.random.default_rng(0).random(1000)
    assert abs((scores < ood.threshold(scores)).mean() - 0.05) < 0.002  # 5 % flagged by construction


def test_stored_reference_wins_and_none_without_a_run(tmp_path):
    ckpt = _run(tmp_path / "run", recipe=True)
    ood.write_reference(ckpt, {"signal": "max_softmax", "false_alarm": 0.05, "threshold": 1.0, "images": 5})
    shown = _served_ood(ckpt)
    assert shown["threshold"] == 1.0 and shown["unusual"] is True
    bare = _run(tmp_path / "bare", recipe=False)
    shown = _served_ood(bare)
    assert shown is None  # no recipe, nothing stored: no warning rather than a made-up threshold
    assert ood.verdict(0.3, None) is None
