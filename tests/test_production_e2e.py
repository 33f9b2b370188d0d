"""Issue #30 end to end on the digits: serve a trained demo model with the prediction store and a shadow version,
send the validation images, review the random sample through the HTTP API with the true labels, and check that
`vggnet monitor report` gives each version an accuracy whose interval holds its true validation accuracy."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("sqlalchemy")

from vggnet.cli import main as cli  # noqa: E402
from vggnet.data import digits_tensors  # noqa: E402
from vggnet.engine.recipe import load_recipe  # noqa: E402
from vggnet.engine.trainer import train  # noqa: E402
from vggnet.infer import Predictor  # noqa: E402
from vggnet.serve import ModelRepository, ServeSettings, create_app  # noqa: E402

KEY = "r" * 24
FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "train.tracking=none",
        "train.keep=0"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Version 1: the demo trained 3 epochs (answers); version 2: the same run after epoch 1 (shadow)."""
    root = tmp_path_factory.mktemp("e2e")
    run = root / "run"
    train(load_recipe("demo", [*FAST, "schedule.epochs=3"]), run, progress=False)
    model_dir = root / "repo" / "digits"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "2").mkdir()
    shutil.copy(run / "best.safetensors", model_dir / "1" / "best.safetensors")
    shutil.copy(run / "checkpoints" / "epoch-0001" / "model.safetensors", model_dir / "2" / "model.safetensors")
    (model_dir / "config.yaml").write_text('default_version: "1"\nshadow: ["2"]\n')
    return root / "repo"


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def test_served_reviewed_and_reported_accuracy_holds_the_true_one(repo, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    images, labels = digits_tensors("val", size=32, val_fraction=0.2)  # the demo recipe's own validation split
    truth = {}
    settings = ServeSettings(load_in_background=False, store=url, review_sample=0.5, api_keys=(KEY,),
                             prediction_log=False)
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(ModelRepository.from_dir(repo), settings)) as c:
        for image, label in zip(images, labels, strict=True):
            r = c.post("/predict", content=png(image), headers={"Content-Type": "image/png", **auth})
            assert r.status_code == 200 and r.json()["model_version"] == "1"
            truth[r.json()["id"]] = str(int(label))
    with TestClient(create_app(ModelRepository.from_dir(repo), settings)) as c:  # every row written: review now
        reviewed = 0
        while True:
            queue = c.get("/v2/review/queue?model=digits&limit=50", headers=auth)
            assert queue.status_code == 200
            entries = queue.json()["items"]
            if not entries:
                break
            for entry in entries:
                answer = c.post("/v2/review/label", headers=auth, json={
                    "id": entry["id"], "item": entry["item"], "model": "digits", "label": truth[entry["id"]]})
                assert answer.status_code == 201, answer.text
                reviewed += 1
    assert cli(["monitor", "report", "--store", url, "--json"]) == 0
    report = {row["version"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(report) == {"1", "2"} and report["1"]["requests"] == len(labels) and report["2"]["shadow"] == len(labels)
    for version, file in (("1", "best.safetensors"), ("2", "model.safetensors")):
        true_accuracy = _accuracy(Predictor.from_checkpoint(repo / "digits" / version / file), images, labels)
        row = report[version]
        low, high = row["interval"]
        assert 80 < row["reviewed"] < 280  # about half of the 359 images were in the random sample
        assert low <= true_accuracy <= high, (version, row, true_accuracy)
    # the shadow (epoch 1) is scored on the same reviewed images, and is worse than the answering epoch 3
    assert report["2"]["verdict"]["test"] == "mcnemar-midp" and report["2"]["verdict"]["verdict"] == "worse"
    assert reviewed >= report["1"]["reviewed"]


def _accuracy(predictor: Predictor, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The version's true accuracy on every validation image, through the same PNG decode and preprocessing."""
    decoded = [Image.open(io.BytesIO(png(i))).convert("RGB") for i in images]
    top1 = [p[0][0] for p in predictor.predict(decoded, topk=1)]
    return float(np.mean([name == str(int(y)) for name, y in zip(top1, labels, strict=True)]))
