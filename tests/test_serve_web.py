"""POST /explain (Grad-CAM over HTTP) and GET / (the web page) in process, with FastAPI's TestClient; the explain
jobs' place in the batcher's queue. The page in a real browser: tests/test_web_page.py."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from serve_helpers import hold_explanations, jpeg_bytes, metric_samples, tiny_checkpoint
from vggnet.serve import Batcher, ModelRepository, QueueFull, ServeSettings, create_app
from vggnet.serve import cam as serve_cam
from vggnet.serve.web import PAGE_FILES

KEY = "k" * 24
JPEG = {"content": jpeg_bytes(), "headers": {"Content-Type": "image/jpeg"}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("run") / "best.safetensors", seed=7)


@pytest.fixture(scope="module")
def client(ckpt):
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                     ServeSettings(load_in_background=False, max_body_bytes=64 * 1024, max_image_pixels=500_000))
    with TestClient(app) as c:
        yield c


def metric(c: TestClient, name: str, **labels: str) -> float:
    return sum(s.value for s in metric_samples(c.get("/metrics").text)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# --- GET / ----------------------------------------------------------------------------------------------------

def test_page_is_served_from_package_files_with_nothing_external(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    html = r.text
    refs = re.findall(r'(?:href|src)="([^"]+)"', html)
    assert set(refs) == {"static/page.css", "static/page.js", "data:,"}
    bodies = {"index.html": html}
    for name, media in PAGE_FILES.items():
        if name == "index.html":
            continue
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media, name
        assert r.headers["x-content-type-options"] == "nosniff"
        bodies[name] = r.text
    for name, text in bodies.items():  # no URL to anywhere but this origin (all of the page's are relative)
        assert not re.search(r"https?://", text, re.IGNORECASE), name
    assert "url(" not in bodies["page.css"] and "@import" not in bodies["page.css"]  # no fonts or images fetched
    # the API the page calls, by relative URL
    assert all(f'"{path}"' in bodies["page.js"] for path in ("predict", "explain", "v2/repository/index"))
    assert client.get("/static/nothing.js").status_code == 404
    assert client.get("/static/..%2Fapp.py").status_code == 404


def test_page_is_public_while_the_api_needs_the_key(ckpt):
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                     ServeSettings(load_in_background=False, api_keys=(KEY,), access_log=False))
    with TestClient(app) as c:
        assert c.get("/").status_code == 200
        assert c.get("/static/page.js").status_code == 200
        assert c.post("/v2/repository/index").status_code == 401
        assert c.post("/explain", **JPEG).status_code == 401
        assert c.post("/predict", **JPEG).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        r = c.post("/explain", content=JPEG["content"], headers={**JPEG["headers"], **auth})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


# --- POST /explain ----------------------------------------------------------------------------------------------

def test_explain_png_defaults_to_the_top_class_at_the_deepest_4x4_map(client):
    top = client.post("/predict?topk=3", **JPEG).json()["predictions"]
    r = client.post("/explain", **JPEG)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-model-version"] == "1" and r.headers["x-request-id"]
    assert int(r.headers["x-explained-class"]) == top[0]["index"]
    assert r.headers["x-explained-label"] == top[0]["label"]
    assert float(r.headers["x-explained-probability"]) == pytest.approx(top[0]["probability"], rel=1e-4)
    # VGG-11 at 32 px: block 5 is 2x2, one blob, so the default is block 4's 4x4
    assert r.headers["x-layer"] == "block4_relu2" and r.headers["x-layer-shape"] == "4x4"
    image = Image.open(io.BytesIO(r.content))
    side = serve_cam.display_side(32)
    assert image.format == "PNG" and image.size == (side, side) == (224, 224) and image.mode == "RGB"


def test_explain_json_class_by_index_and_name_layer_by_alias(client):
    r = client.post("/explain?format=json&class=1&layer=relu3_1", **JPEG)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model_name"] == "m" and body["model_version"] == "1"
    assert body["class"]["index"] == 1 and body["class"]["label"] == "b" and 0 < body["class"]["probability"] < 1
    assert body["layer"] == "block3_relu1" and body["layer_shape"] == [8, 8] and body["shape"] == [32, 32]
    heat = np.asarray(body["map"])
    assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1
    assert heat.max() in (0.0, 1.0)  # scaled to peak 1 (or no evidence at all)
    by_name = client.post("/explain?class=b&layer=block3_relu1", content=JPEG["content"],
                          headers={**JPEG["headers"], "Accept": "application/json"})  # Accept picks JSON too
    assert by_name.json()["map"] == body["map"]
    # multipart, as the page sends it
    r = client.post("/explain?class=2&format=json", files={"image": ("x.jpg", JPEG["content"], "image/jpeg")})
    assert r.status_code == 200 and r.json()["class"]["index"] == 2
    png = client.post("/explain?class=0", **JPEG).content
    assert png != client.post("/explain?class=2", **JPEG).content  # another class, another map


@pytest.mark.parametrize(("query", "status", "words"), [
    ("class=3", 400, "out of range"),
    ("class=-1", 400, "out of range"),
    ("class=zebra", 400, "unknown class"),
    ("layer=block9_conv1", 400, "unknown layer"),
    ("layer=fc", 400, "not a grid"),
    ("format=gif", 400, "format must be png or json"),
    ("model=nope", 404, "unknown model"),
    ("version=9", 404, "no version"),
])
def test_explain_refuses_bad_parameters_before_reading_the_body(client, query, status, words):
    before = metric(client, "vggnet_http_requests_total", route="/explain", status=str(status))
    r = client.post(f"/explain?{query}", **JPEG)
    assert r.status_code == status and words in r.json()["error"]
    assert metric(client, "vggnet_http_requests_total", route="/explain", status=str(status)) == before + 1


def test_explain_has_the_limits_of_predict(client, caplog):
    big = b"\xff\xd8" + bytes(70 * 1024)
    r = client.post("/explain", content=big, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = client.post("/explain", content=b"not an image at all", headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "not an image" in r.json()["error"]
    assert client.post("/explain", content=b"{}", headers={"Content-Type": "application/json"}).status_code == 415
    buf = io.BytesIO()
    Image.new("RGB", (1000, 600)).save(buf, "PNG")  # 600 k pixels > 500 k
    r = client.post("/explain", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "pixels" in r.json()["error"]
    assert client.post("/explain", content=b"", headers={"Content-Type": "image/png"}).status_code == 400
    with caplog.at_level(logging.INFO, logger="vggnet.serve.access"):
        assert client.post("/explain?class=1", **JPEG).status_code == 200
    line = json.loads([r.message for r in caplog.records if r.name == "vggnet.serve.access"][-1])
    assert line["route"] == "/explain" and line["status"] == 200 and line["model"] == "m" and line["explained"] == 1
    assert line["layer"] == "block4_relu2" and line["compute_ms"] > 0 and "queue_ms" in line
    assert metric(client, "vggnet_explain_duration_seconds_count", model="m", version="1") >= 1
    assert metric(client, "vggnet_queue_duration_seconds_count", model="m", version="1") >= 1


def test_explain_is_refused_in_words_for_an_exported_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from vggnet.export import export_model

    ckpt = tiny_checkpoint(tmp_path / "run" / "best.safetensors", seed=3)
    (tmp_path / "repo" / "m" / "1").mkdir(parents=True)
    export_model(ckpt, "onnx", tmp_path / "repo" / "m" / "1" / "model.onnx", check_batches=(1,))
    app = create_app(ModelRepository.from_dir(tmp_path / "repo"),
                     ServeSettings(load_in_background=False, access_log=False))
    with TestClient(app) as c:
        assert c.post("/predict", **JPEG).status_code == 200
        r = c.post("/explain", **JPEG)
        assert r.status_code == 501
        message = r.json()["error"]
        assert "Grad-CAM is not available" in message and "exported" in message and "checkpoint" in message


def test_explain_jobs_beyond_their_share_are_503_busy(ckpt, monkeypatch):
    """One explanation held on the worker takes the version's one slot (max_explain_jobs=1): the next is 503 at
    once, in words, and predictions still go through once it is done."""
    entered, release = hold_explanations(monkeypatch, 10)
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                     ServeSettings(load_in_background=False, access_log=False, max_explain_jobs=1))
    with TestClient(app) as c:
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(r=c.post("/explain", **JPEG)))
        thread.start()
        assert entered.wait(10)
        r = c.post("/explain?class=1", **JPEG)
        assert r.status_code == 503 and "busy" in r.json()["error"] and r.headers["retry-after"]
        release.set()
        thread.join(10)
        assert first["r"].status_code == 200
        assert c.post("/predict", **JPEG).status_code == 200
        assert c.post("/explain?class=1", **JPEG).status_code == 200  # the slot is free again


# --- the batcher's jobs ------------------------------------------------------------------------------------------

def test_batcher_runs_jobs_alone_in_arrival_order_and_bounds_them():
    calls: list[str] = []
    gate = threading.Event()

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(f"forward {x.shape[0]}")
        return x * 2

    def job(name: str, wait: bool = False):
        def run():
            if wait:
                gate.wait(10)
            calls.append(name)
            return name
        return run

    batcher = Batcher(forward, max_batch_size=8, max_delay_ms=50, max_jobs=2, adaptive=False).start()
    try:
        held = batcher.submit_job(job("held", wait=True))
        time.sleep(0.05)  # the worker is inside "held" now
        a = batcher.submit(torch.ones(1, 2))
        j = batcher.submit_job(job("job"))
        with pytest.raises(QueueFull, match="explanations"):
            batcher.submit_job(job("third"))  # two queued or running already
        b = batcher.submit(torch.ones(2, 2))
        gate.set()
        assert held.result(5)[0] == "held" and j.result(5)[0] == "job"
        out_a, info_a = a.result(5)
        out_b, info_b = b.result(5)
        assert torch.equal(out_a, torch.full((1, 2), 2.0)) and torch.equal(out_b, torch.full((2, 2), 2.0))
        # a and b are not batched across the job between them: arrival order is kept, the job runs alone
        assert calls == ["held", "forward 1", "job", "forward 2"]
        assert info_a.batch_requests == 1 and info_b.batch_requests == 1
        assert j.result(5)[1].batch_rows == 1 and j.result(5)[1].queue_s > 0
        batcher.submit_job(job("again")).result(5)  # the count went back down
        failing = batcher.submit_job(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(5)
        assert batcher.submit(torch.ones(1, 2)).result(5)[0].shape == (1, 2)  # the worker survived
    finally:
        gate.set()
        batcher.close(5)


# --- the page's one request per upload, and its limits -----------------------------------------------------------

def test_predict_with_explain_streams_the_prediction_then_the_map_from_one_upload(client):
    plain = client.post("/predict?topk=3", **JPEG)
    assert plain.headers["content-type"] == "application/json"  # API clients: unchanged without explain=
    r = client.post("/predict?topk=3&explain=1&layer=pool3", **JPEG)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) == 2 and lines[0].pop("ood") is None  # no reference: no verdict
    first, answer = lines[0], plain.json()
    assert first.pop("id") == r.headers["x-request-id"] and answer.pop("id") == plain.headers["x-request-id"]
    assert first == answer  # the same answer as /predict's, each with its own request id
    explained = lines[1]["explain"]
    top = plain.json()["predictions"][0]
    assert explained["class"]["index"] == top["index"] and explained["layer"] == "block3_pool"
    prefix = "data:image/png;base64,"
    assert explained["overlay"].startswith(prefix)
    png = Image.open(io.BytesIO(base64.b64decode(explained["overlay"][len(prefix):])))
    assert png.format == "PNG" and png.size == (224, 224)
    assert client.post("/predict?explain=1&layer=fc9", **JPEG).status_code == 400  # checked before the body


def test_predict_with_explain_of_an_exported_model_still_predicts(tmp_path, ckpt):
    pytest.importorskip("onnxruntime")
    from vggnet.export import export_model

    (tmp_path / "repo" / "m" / "1").mkdir(parents=True)
    export_model(ckpt, "onnx", tmp_path / "repo" / "m" / "1" / "model.onnx", check_batches=(1,))
    app = create_app(ModelRepository.from_dir(tmp_path / "repo"),
                     ServeSettings(load_in_background=False, access_log=False))
    with TestClient(app) as c:
        lines = [json.loads(line) for line in c.post("/predict?explain=1", **JPEG).text.splitlines()]
    assert len(lines[0]["predictions"]) == 3
    assert lines[1]["explain_error"]["status"] == 501 and "exported file" in lines[1]["explain_error"]["error"]


def test_page_limits_are_public_and_match_the_settings(ckpt):
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                     ServeSettings(load_in_background=False, api_keys=(KEY,), access_log=False,
                                   max_body_bytes=5_000_000, max_image_pixels=2_000_000))
    with TestClient(app) as c:
        r = c.get("/static/limits.json")
    assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
    body = r.json()
    assert body["max_upload_bytes"] == 5_000_000 and body["max_image_pixels"] == 2_000_000
    assert "image/jpeg" in body["image_types"] and "application/octet-stream" not in body["image_types"]
