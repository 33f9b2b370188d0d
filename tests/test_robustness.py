"""The adversarial-input guard (issue #30, item 5): feature squeezing's squeezers on hand-made tensors, the detector on
a tiny trained digits model under PGD, the threshold's false-alarm rate, ``vggnet robustness`` end to end, and the
server's ``--adversarial-guard`` / ``--reject-adversarial`` against a real SQLite store."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from serve_helpers import metric_samples, stored_rows, tiny_checkpoint
from vggnet.cli import main
from vggnet.data import digits_tensors
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train
from vggnet.infer import Predictor, preprocess
from vggnet.infer import squeeze as sq

pytest.importorskip("art")
store = pytest.importorskip("vggnet.store")

from fastapi.testclient import TestClient  # noqa: E402

from vggnet.robustness.attacks import attack  # noqa: E402
from vggnet.serve import ModelRepository, ServeSettings, create_app  # noqa: E402

FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "schedule.epochs=2"]


# ---- the squeezers --------------------------------------------------------------------------------------------------

def test_bit_depth_rounds_to_the_levels_and_clamps():
    pixels = torch.tensor([0.0, 0.2, 0.4, 0.9, 1.2, -0.1])
    assert sq.bit_depth(pixels, 2).tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1, 1, 0])  # 4 levels: 0, 1/3, 2/3, 1
    grey = torch.arange(256, dtype=torch.float32) / 255  # an 8-bit image is its own 8-bit squeeze
    assert torch.allclose(sq.bit_depth(grey, 8), grey)
    assert sq.bit_depth(grey, 1).unique().tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        sq.bit_depth(grey, 0)


def test_median_2x2_removes_an_outlier_keeps_flat_patches_and_matches_scipy():
    flat = torch.full((1, 1, 5, 5), 0.3)
    assert torch.equal(sq.median_2x2(flat), flat)
    salt = torch.zeros(1, 1, 5, 5)
    salt[0, 0, 2, 2] = 1.0
    assert sq.median_2x2(salt).abs().max() == 0  # one bright pixel in a dark patch: gone
    hand = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])[None, None]
    # window = the pixel, its left, upper, upper-left neighbours (first row / column repeated); upper middle of 4
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])[None, None]
    assert torch.equal(sq.median_2x2(hand), expected)
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    reference = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, 2, 2), mode="reflect")  # the paper's code
    assert np.array_equal(sq.median_2x2(x).numpy(), reference)


def test_squeezing_happens_in_pixel_space(tmp_path):
    """Un-normalise, squeeze, normalise again: a normalised input whose pixels are already 4-bit comes back."""
    prep = Predictor.from_checkpoint(tiny_checkpoint(tmp_path / "best.safetensors")).prep  # mean 0.5, std 0.25
    pixels = torch.randint(0, 16, (1, 3, 32, 32)).float() / 15
    x = (pixels - 0.5) / 0.25
    bits, median = sq.Squeezer(prep, bits=4).squeezed(x)
    assert torch.allclose(bits, x, atol=1e-6)  # squeezed in normalised units it would change
    assert torch.allclose(median, (sq.median_2x2(pixels) - 0.5) / 0.25, atol=1e-6)


def test_the_threshold_flags_the_stated_share_of_the_images_it_was_set_on():
    scores = np.random.default_rng(0).gamma(2.0, 0.05, size=1000)
    for target in (0.01, 0.05, 0.2):
        t = sq.threshold(scores, target)
        assert (scores > t).mean() == pytest.approx(target, abs=0.002)
    assert sq.squeeze_distances(torch.tensor([[9.0, 0.0]]), torch.tensor([[0.0, 9.0]])).item() == pytest.approx(
        2.0, abs=1e-3)  # disjoint predictions: the largest L1 distance


# ---- the detector on a trained model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny digits run (2 epochs, width 0.125): about 97 % on its validation split."""
    out = tmp_path_factory.mktemp("robust") / "run"
    train(load_recipe("demo", FAST), out, progress=False)
    return out


@pytest.fixture(scope="module")
def val(run):
    images, labels = digits_tensors("val", size=32, channels=3, val_fraction=0.2, seed=0)
    keep = torch.arange(0, len(labels), 6)  # 60 images, every class
    return images[keep], labels[keep].tolist()


def test_the_detector_flags_pgd_examples_far_more_often_than_clean_ones(run, val):
    predictor = Predictor.from_checkpoint(run / "best.safetensors")
    model, prep = predictor.model.eval(), predictor.prep
    images, labels = val
    x = preprocess(list(images), prep)
    squeezer = sq.Squeezer(prep)
    clean = sq.squeeze_score(model, x, squeezer)
    limit = sq.threshold(clean, 0.05)
    adversarial = squeezer.to_input(attack(model, prep, squeezer.to_pixels(x), labels, "pgd", 8 / 255))
    attacked = sq.squeeze_score(model, adversarial, squeezer)
    assert (model(adversarial).argmax(1) != torch.tensor(labels)).float().mean() > 0.2  # the attack works
    assert float((clean > limit).float().mean()) <= 0.05 + 1e-9
    assert float((attacked > limit).float().mean()) > 0.5  # measured: 0.9+ at 8/255


def test_robustness_cli_writes_the_reference_and_prints_the_table(run, tmp_path, capsys):
    assert main(["robustness", "--ckpt", str(run), "--limit", "40", "--eps", "2/255,8/255", "--out",
                 str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "| none (clean) | 0 |" in printed and "| FGSM | 8/255 |" in printed and "| PGD-10 | 2/255 |" in printed
    reference = json.loads((run / "adversarial.json").read_text())
    assert reference["detector"] == "feature_squeezing" and reference["false_alarm"] == 0.05
    assert reference["images"] == 40 and reference["measured"]["false_alarm"] <= 0.05
    assert reference["command"].startswith("vggnet robustness --ckpt")
    results = json.loads((tmp_path / "r" / "robustness.json").read_text())
    assert [(r["attack"], r["eps_text"]) for r in results["attacks"]] == [
        ("fgsm", "2/255"), ("fgsm", "8/255"), ("pgd", "2/255"), ("pgd", "8/255")]
    pgd8 = results["attacks"][-1]
    assert pgd8["accuracy"] < results["clean_accuracy"] and pgd8["flagged"] > reference["measured"]["false_alarm"]
    assert (tmp_path / "r" / "robustness.md").read_text().startswith("40 images")
    assert main(["robustness", "--ckpt", str(run), "--eps", "9"]) == 2
    assert "(0, 1)" in capsys.readouterr().err


# ---- the server -----------------------------------------------------------------------------------------------------

def png(pixels: torch.Tensor) -> bytes:
    """A lossless upload of uint8 C×H×W pixels: /predict decodes exactly these."""
    buf = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, "PNG")
    return buf.getvalue()


def flagged_count(text: str) -> float:
    return sum(s.value for s in metric_samples(text) if s.name == "vggnet_adversarial_flagged_total")


def app_for(ckpt, **settings):
    return create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                      ServeSettings(load_in_background=False, review_sample=0.0, **settings))


def test_the_guard_scores_and_stores_and_rejection_answers_422_for_a_flagged_input(run, val, tmp_path):
    """The run's own threshold (written by the CLI test or here): a clean digit passes, a PGD one is refused."""
    if not (run / "adversarial.json").is_file():
        assert main(["robustness", "--ckpt", str(run), "--limit", "40", "--eps", "8/255", "--attacks", "pgd"]) == 0
    limit = json.loads((run / "adversarial.json").read_text())["threshold"]
    predictor = Predictor.from_checkpoint(run / "best.safetensors")
    model, prep = predictor.model.eval(), predictor.prep
    images, labels = val
    x = preprocess(list(images), prep)
    squeezer = sq.Squeezer(prep)
    adversarial = attack(model, prep, squeezer.to_pixels(x), labels, "pgd", 8 / 255)
    quantised = (adversarial * 255).round().to(torch.uint8)  # what a PNG carries
    scores = sq.squeeze_score(model, preprocess(list(quantised), prep), squeezer)
    clean_scores = sq.squeeze_score(model, x, squeezer)
    bad, good = int(scores.argmax()), int(clean_scores.argmin())
    assert scores[bad] > limit >= clean_scores[good]
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    upload = {"headers": {"Content-Type": "image/png"}}
    with TestClient(app_for(run / "best.safetensors", store=url, reject_adversarial=True,
                            adversarial_guard=True)) as c:
        ok = c.post("/predict", content=png(images[good]), **upload)
        refused = c.post("/predict", content=png(quantised[bad]), **upload)
        metrics = c.get("/metrics").text
    assert ok.status_code == 200
    assert refused.status_code == 422 and "flagged as adversarial" in refused.json()["error"]
    assert "\n" not in refused.json()["error"]
    [stored_ok] = stored_rows(url, ok.json()["id"])
    [stored_bad] = stored_rows(url, refused.headers["x-request-id"])  # refused, still stored
    assert stored_ok["adv_score"] == pytest.approx(float(clean_scores[good]), abs=1e-4)
    assert stored_bad["adv_score"] == pytest.approx(float(scores[bad]), abs=1e-4)
    assert flagged_count(metrics) == 1


def test_the_guard_alone_stores_every_score_and_counts_the_flagged(tmp_path):
    """A hand-written reference with threshold 0 flags everything; without --reject-adversarial all are answered."""
    ckpt = tiny_checkpoint(tmp_path / "run" / "best.safetensors", seed=3)
    (tmp_path / "run" / "adversarial.json").write_text(json.dumps({"threshold": 0.0, "bits": 5}))
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    body = {"id": "guarded", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                         "data": x.ravel().tolist()}]}
    with TestClient(app_for(ckpt, store=url, adversarial_guard=True)) as c:
        assert c.post("/v2/models/m/infer", json=body).status_code == 200
        metrics = c.get("/metrics").text
    rows = stored_rows(url, "guarded", want=2)
    assert len(rows) == 2 and all(r["adv_score"] is not None and r["adv_score"] > 0 for r in rows)
    assert flagged_count(metrics) == 2
    with TestClient(app_for(ckpt, store=url)) as c:  # the guard off: no score, nothing counted
        reply = c.post("/v2/models/m/infer", json={**body, "id": "unguarded"})
        assert reply.status_code == 200 and flagged_count(c.get("/metrics").text) == 0
    assert [r["adv_score"] for r in stored_rows(url, "unguarded", want=2)] == [None, None]


def test_without_the_reference_the_guard_refuses_to_start(tmp_path, capsys, monkeypatch):
    import vggnet.serve.app

    ckpt = tiny_checkpoint(tmp_path / "run" / "best.safetensors")
    started = []
    monkeypatch.setattr(vggnet.serve.app, "run_server", lambda repo, settings, **kw: started.append(settings))
    for flag in ("--adversarial-guard", "--reject-adversarial"):
        assert main(["serve", "--ckpt", str(ckpt), flag]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"vggnet robustness --ckpt {tmp_path / 'run'}" in err
    assert started == []
    with TestClient(app_for(ckpt, adversarial_guard=True)) as c:  # the app alone: the version does not load
        state = c.post("/v2/repository/index").json()[0]
        assert state["state"] == "UNAVAILABLE" and "adversarial.json" in state["reason"]
