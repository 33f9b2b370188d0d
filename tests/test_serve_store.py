"""The served predictions come back (issue #30): each /predict and V2 image is a row of the prediction store,
counted in Prometheus by class, logged as a JSON line; clients' labels arrive through
POST /v2/models/{name}/feedback. The store is a real SQLite database here (tests/test_store.py runs the store
itself against PostgreSQL too)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve_helpers import jpeg_bytes, metric_samples, stored_rows, tiny_checkpoint

pytest.importorskip("sqlalchemy")
store = pytest.importorskip("vggnet.store")

import vggnet.errors  # noqa: E402
from vggnet.serve import ModelRepository, ServeSettings, create_app  # noqa: E402

IMAGE = jpeg_bytes()
JPEG = {"content": IMAGE, "headers": {"Content-Type": "image/jpeg"}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("run") / "best.safetensors", seed=3)


def app_for(ckpt, **settings):
    return create_app(ModelRepository.from_checkpoints([ckpt], ["m"]), ServeSettings(load_in_background=False,
                                                                                    **settings))


def test_a_prediction_is_a_row_a_metric_and_a_log_line(ckpt, tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    with TestClient(app_for(ckpt, store=url, review_sample=1.0)) as c, \
            caplog.at_level(logging.INFO, logger="vggnet.serve.predictions"):
        answer = c.post("/predict?topk=2", **JPEG)
        assert answer.status_code == 200
        body = answer.json()
        assert body["id"] == answer.headers["x-request-id"]
        top = body["predictions"][0]
        text = c.get("/metrics").text
    [row] = stored_rows(url, body["id"])
    assert (row["model"], row["version"], row["route"], row["role"], row["item"]) == ("m", "1", "/predict", "served", 0)
    assert row["predicted"] == top["label"] and row["confidence"] == pytest.approx(top["probability"], rel=1e-5)
    stored = [label for label, _ in row["topk"]]  # the server's top-k (5, so all 3 classes), best first
    assert stored[:2] == [p["label"] for p in body["predictions"]] and sorted(stored) == ["a", "b", "c"]
    assert row["input_sha256"] == hashlib.sha256(IMAGE).hexdigest() and row["input_bytes"] == len(IMAGE)
    assert row["sampled"] is True and row["latency_ms"] > 0 and set(row["input_stats"]) == {"mean", "std"}
    logged = [json.loads(r.message) for r in caplog.records if r.name == "vggnet.serve.predictions"]
    assert [(line["request_id"], line["predicted"]) for line in logged] == [(body["id"], top["label"])]
    samples = metric_samples(text)
    assert any(s.name == "vggnet_predictions_total" and s.labels == {"model": "m", "version": "1",
                                                                      "class": top["label"]} and s.value == 1
               for s in samples)
    assert any(s.name == "vggnet_prediction_confidence_count" and s.value == 1 for s in samples)


def test_a_v2_batch_is_one_row_per_image_under_the_request_id(ckpt, tmp_path):
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    body = {"id": "batch-7", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                         "data": x.ravel().tolist()}]}
    with TestClient(app_for(ckpt, store=url, review_sample=0.0)) as c:
        assert c.post("/v2/models/m/infer", json=body).status_code == 200
    rows = stored_rows(url, "batch-7", want=2)
    assert [(r["item"], r["route"], r["sampled"]) for r in rows] == [(0, "/v2/infer", False), (1, "/v2/infer", False)]
    assert rows[0]["input_sha256"] != rows[1]["input_sha256"]  # each image's own tensor


def test_feedback_is_stored_as_a_user_report(ckpt, tmp_path):
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    with TestClient(app_for(ckpt, store=url)) as c:
        request_id = c.post("/predict", **JPEG).json()["id"]
        ok = c.post("/v2/models/m/feedback", json={"id": request_id, "label": "b"})
        assert ok.status_code == 201 and ok.json() == {"id": request_id, "item": 0, "label": "b", "stored": True}
        assert c.post("/v2/models/m/feedback", json={"id": request_id, "label": None}).status_code == 201
        missing = c.post("/v2/models/m/feedback", json={"id": "no-such-request", "label": "a"})
        assert missing.status_code == 404 and "no-such-request" in missing.json()["error"]
        wrong = c.post("/v2/models/m/feedback", json={"id": request_id, "label": "zebra"})
        assert wrong.status_code == 400 and "'zebra' is not a class of model 'm'" in wrong.json()["error"]
        assert c.post("/v2/models/nope/feedback", json={"id": request_id, "label": "a"}).status_code == 404
        for bad in (b"not json", b'{"label": "a"}', b'{"id": 5, "label": "a"}', b'{"id": "x", "label": 3}'):
            r = c.post("/v2/models/m/feedback", content=bad, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, bad
        foreign = c.post("/v2/models/m/feedback", json={"id": request_id, "label": "a"},
                         headers={"Origin": "https://elsewhere.example", "Sec-Fetch-Site": "cross-site"})
        assert foreign.status_code == 403
    engine = store.connect(url)
    try:
        labels = [(r["request_id"], r["label"], r["source"]) for r in store.read_labels(engine)]
    finally:
        engine.dispose()
    assert labels == [(request_id, "b", "user"), (request_id, None, "user")]


def test_feedback_needs_the_store_and_the_key(ckpt, tmp_path):
    with TestClient(app_for(ckpt)) as c:  # no --store
        off = c.post("/v2/models/m/feedback", json={"id": "x", "label": "a"})
        assert off.status_code == 501 and "--store" in off.json()["error"]
    key = "k" * 24
    app = app_for(ckpt, store=f"sqlite:///{tmp_path / 's.db'}", api_keys=(key,),
                  public_endpoints=("health", "metrics", "metadata"))
    with TestClient(app) as c:
        assert c.post("/v2/models/m/feedback", json={"id": "x", "label": "a"}).status_code == 401  # never public
        authorised = c.post("/v2/models/m/feedback", json={"id": "x", "label": "a"},
                            headers={"Authorization": f"Bearer {key}"})
        assert authorised.status_code == 404  # past the key: an unknown id


def shadow_repo(root, config: str):
    for version, seed in (("1", 3), ("2", 4)):
        tiny_checkpoint(root / "m" / version / "best.safetensors", seed=seed)
    (root / "m" / "config.yaml").write_text(config)
    return root


def test_a_shadow_version_predicts_the_same_requests_without_answering(tmp_path):
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    repo = ModelRepository.from_dir(shadow_repo(tmp_path / "repo", 'shadow: ["2"]\n'))  # default: 1, not 2
    with TestClient(create_app(repo, ServeSettings(load_in_background=False, store=url, review_sample=0.5))) as c:
        ids = []
        for i in range(6):
            r = c.post("/predict", content=jpeg_bytes(colour=(40 * i, 200 - 30 * i, 90)),
                       headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200 and r.json()["model_version"] == "1"  # the shadow never answers
            ids.append(r.json()["id"])
        # the shutdown waits for shadow passes still running, and stores them
    for request_id in ids:
        rows = stored_rows(url, request_id, want=2)
        assert sorted((r["version"], r["role"]) for r in rows) == [("1", "served"), ("2", "shadow")]
        assert rows[0]["sampled"] == rows[1]["sampled"] and rows[0]["input_sha256"] == rows[1]["input_sha256"]


@pytest.mark.parametrize("config, message", [
    ('shadow: ["1"]\ndefault_version: "1"\n', "version '1' both answers and shadows"),
    ('shadow: ["2"]\nab: {"1": 0.5, "2": 0.5}\n', "version '2' both answers and shadows"),
    ('shadow: ["7"]\n', "shadow names version '7'"),
])
def test_shadow_config_errors(tmp_path, config, message):
    with pytest.raises(vggnet.errors.UsageError, match=message):
        ModelRepository.from_dir(shadow_repo(tmp_path / "repo", config))


def test_kept_inputs_are_the_network_crop_named_by_the_input_hash(ckpt, tmp_path):
    from PIL import Image

    url, kept = f"sqlite:///{tmp_path / 'serve.db'}", tmp_path / "kept"
    settings = {"store": url, "review_sample": 1.0, "keep_inputs": str(kept)}
    with TestClient(app_for(ckpt, **settings)) as c:
        first = c.post("/predict", **JPEG).json()["id"]
        again = c.post("/predict", **JPEG).json()["id"]  # the same bytes: the same file
        deadline = time.monotonic() + 10  # the keeper writes on its own thread: its count follows the answer
        while 'vggnet_kept_inputs{outcome="kept"} 1.0' not in (text := c.get("/metrics").text):
            assert time.monotonic() < deadline, "the kept image was never counted"
            time.sleep(0.05)
    [row], [row2] = stored_rows(url, first), stored_rows(url, again)
    sha = hashlib.sha256(IMAGE).hexdigest()
    assert row["input_path"] == row2["input_path"] == f"{sha[:2]}/{sha}.png"
    assert [p.relative_to(kept).as_posix() for p in kept.rglob("*.png")] == [row["input_path"]]
    with Image.open(kept / row["input_path"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"  # the crop the network saw, not the 48x40 upload
        crop = np.asarray(image, dtype=np.float32)
    # un-normalised back to the upload's colours: red (200, 30, 60) at the far corner, the green patch too
    assert np.abs(crop[-1, -1] - [200, 30, 60]).max() < 15 and (crop[..., 1] > 180).any()
    assert any(s.name == "vggnet_kept_inputs" and s.labels == {"outcome": "kept"} and s.value == 1
               for s in metric_samples(text))


def test_kept_inputs_stop_at_their_byte_limit(ckpt, tmp_path):
    url, kept = f"sqlite:///{tmp_path / 'serve.db'}", tmp_path / "kept"
    with TestClient(app_for(ckpt, store=url, review_sample=1.0, keep_inputs=str(kept), keep_inputs_mb=1e-6)) as c:
        for i in range(3):  # the first image fills the 1-byte budget; the others are not kept
            c.post("/predict", content=jpeg_bytes(colour=(60 * i, 90, 120)), headers={"Content-Type": "image/jpeg"})
        text = c.get("/metrics").text
    assert len(list(kept.rglob("*.png"))) == 1
    counts = {s.labels["outcome"]: s.value for s in metric_samples(text) if s.name == "vggnet_kept_inputs"}
    assert counts["kept"] == 1 and counts["full"] == 2


def test_store_keep_days_removes_old_kept_inputs_too(ckpt, tmp_path):
    url, kept = f"sqlite:///{tmp_path / 'serve.db'}", tmp_path / "kept"
    with TestClient(app_for(ckpt, store=url, review_sample=1.0, keep_inputs=str(kept))) as c:
        c.post("/predict", **JPEG)
    [old] = list(kept.rglob("*.png"))
    os.utime(old, (time.time() - 3 * 86400,) * 2)  # written three days ago
    fresh = kept / "ab" / ("ab" + "0" * 62 + ".png")
    fresh.parent.mkdir(exist_ok=True)
    fresh.write_bytes(b"png")
    with TestClient(app_for(ckpt, store=url, keep_inputs=str(kept), store_keep_days=2)):
        pass
    assert not old.exists() and fresh.exists()


def test_keep_all_inputs_keeps_a_sure_answer_outside_the_review_sample(ckpt, tmp_path):
    """Without it only the review sample's and low-confidence crops are kept; retraining from a user's report on
    any request needs them all."""
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    for keep_all, expected in ((False, 0), (True, 1)):
        kept = tmp_path / f"kept-{keep_all}"
        settings = {"store": url, "review_sample": 0.0, "review_low_confidence": 0.0, "keep_inputs": str(kept),
                    "keep_all_inputs": keep_all}
        with TestClient(app_for(ckpt, **settings)) as c:
            assert c.post("/predict", **JPEG).status_code == 200
        assert len(list(kept.rglob("*.png"))) == expected


@pytest.mark.parametrize(("flags", "message"), [
    (["--keep-inputs", "kept"], "--keep-inputs needs --store URL"),
    (["--store", "sqlite:///s.db", "--keep-all-inputs"], "--keep-all-inputs needs --keep-inputs DIR"),
    (["--store-keep-days", "3"], "--store-keep-days needs --store URL"),
    (["--live-accuracy-every", "5"], "--live-accuracy-every needs --store URL"),
    (["--store", "sqlite:///s.db", "--live-accuracy-every", "-1"], "--live-accuracy-every must be 0"),
    (["--store", "sqlite:///s.db", "--review-sample", "1.5"], "--review-sample must be a share in [0, 1]"),
])
def test_store_flag_mistakes_are_one_line_before_anything_starts(ckpt, flags, message, capsys):
    from vggnet.cli import main

    code = main(["serve", "--ckpt", str(ckpt), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
