"""The service in process (FastAPI TestClient): V2 routes, /predict, A/B routing, errors, metrics, logs."""

from __future__ import annotations

import gzip
import io
import json
import logging
from importlib import resources

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import vggnet
from serve_helpers import jpeg_bytes, metric_samples, output, png_header, tiny_checkpoint
from vggnet.infer import Predictor
from vggnet.serve import ModelRepository, ServeSettings, create_app

LIMITS = {"max_body_bytes": 1024 * 1024, "max_image_pixels": 1_000_000}


def v2_request(x: torch.Tensor, **extra) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.reshape(-1).tolist()}], **extra}


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    tiny_checkpoint(root / "cls" / "1" / "best.safetensors", seed=1)
    tiny_checkpoint(root / "cls" / "2" / "best.safetensors", seed=2)
    (root / "cls" / "config.yaml").write_text('ab: {"1": 3, "2": 1}\nmax_batch_size: 4\n')
    tiny_checkpoint(root / "solo" / "1" / "model.safetensors", seed=3)
    return root


@pytest.fixture(scope="module")
def client(repo_dir):
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False, **LIMITS))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def predictors(repo_dir):
    return {v: Predictor.from_checkpoint(repo_dir / "cls" / v) for v in ("1", "2")}


def test_health_metadata_config_and_index(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/cls/ready").status_code == 200
    assert client.get("/v2/models/cls/versions/2/ready").status_code == 200
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data", "classification", "model_repository"]
    meta = client.get("/v2/models/cls").json()
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    assert meta["outputs"][0]["shape"] == [-1, 3]
    assert meta["parameters"]["preprocessing"]["mean"] == [0.5] * 3 and meta["parameters"]["ab"] == {"1": 3, "2": 1}
    assert client.get("/v2/models/cls/versions/2").json()["versions"] == ["2"]
    config = client.get("/v2/models/cls/config").json()
    assert config["max_batch_size"] == 4 and config["input"][0]["dims"] == [3, 32, 32]
    index = client.post("/v2/repository/index").json()
    assert sorted((e["name"], e["version"], e["state"]) for e in index) == [
        ("cls", "1", "READY"), ("cls", "2", "READY"), ("solo", "1", "READY")]
    assert len(client.post("/v2/repository/index", json={"ready": True}).json()) == 3
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/cls/versions/9/ready").status_code == 404


def test_v2_infer_round_trip_equals_predictor(client, predictors):
    x = torch.randn(3, 3, 32, 32)
    r = client.post("/v2/models/cls/versions/2/infer", json=v2_request(x, id="req-7"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "cls" and body["model_version"] == "2" and body["id"] == "req-7"
    assert r.headers["x-model-version"] == "2"
    expected = predictors["2"].logits(x)
    np.testing.assert_allclose(output(r, "logits"), expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(output(r, "probabilities"), expected.softmax(1).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(predictors["1"].logits(x).numpy(), expected.numpy())  # the versions really differ


def test_v2_outputs_field_binary_tensors_and_gzip(client, predictors):
    x = torch.randn(2, 3, 32, 32)
    r = client.post("/v2/models/cls/versions/1/infer", json=v2_request(x, outputs=[{"name": "probabilities"}]))
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities"]
    # Triton's binary tensor extension, both ways, as tritonclient sends it by default
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32],
                                     "parameters": {"binary_data_size": x.numel() * 4}}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = client.post("/v2/models/cls/versions/1/infer", content=header + x.numpy().astype("<f4").tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header)),
                             "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:length])
    assert [o["parameters"]["binary_data_size"] for o in meta["outputs"]] == [24, 24]
    logits = np.frombuffer(r.content[length:length + 24], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(logits, predictors["1"].logits(x).numpy(), rtol=1e-5, atol=1e-6)
    r = client.post("/v2/models/cls/versions/1/infer", content=gzip.compress(json.dumps(v2_request(x)).encode()),
                    headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    np.testing.assert_allclose(output(r, "logits"), logits, rtol=1e-5, atol=1e-6)


def test_predict_upload_equals_predictor(client, repo_dir):
    data = jpeg_bytes()
    predictor = Predictor.from_checkpoint(repo_dir / "solo" / "1" / "model.safetensors")
    expected = predictor.predict([Image.open(io.BytesIO(data))], topk=2)[0]
    raw = client.post("/predict?model=solo&topk=2", content=data, headers={"Content-Type": "image/jpeg"})
    multipart = client.post("/predict?model=solo&topk=2", files={"image": ("x.jpg", data, "image/jpeg")})
    for r in (raw, multipart):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_name"] == "solo" and body["model_version"] == "1"
        assert [p["label"] for p in body["predictions"]] == [label for label, _ in expected]
        np.testing.assert_allclose([p["probability"] for p in body["predictions"]], [p for _, p in expected],
                                   rtol=1e-5)


def test_predict_equals_vggnet_predict_cli_with_exif_orientation(client, repo_dir, tmp_path, capsys):
    from vggnet.cli import main

    image = Image.new("RGB", (64, 40), (30, 30, 200))
    image.paste((240, 240, 20), (0, 0, 20, 40))  # asymmetric, so a rotation changes the prediction input
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif.tobytes())
    assert main(["predict", "--ckpt", str(repo_dir / "solo" / "1" / "model.safetensors"), "--topk", "3", "--json",
                 str(path)]) == 0
    expected = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    r = client.post("/predict?model=solo&topk=3", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
    got = r.json()["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in expected], rtol=1e-5)


def test_runtime_from_config_and_calibration_images(tmp_path):
    from vggnet.serve.versions import calibration_batch

    tiny_checkpoint(tmp_path / "repo" / "fast" / "1" / "best.safetensors", seed=4)
    (tmp_path / "repo" / "fast" / "config.yaml").write_text("runtime: channels_last\n")
    calib = tmp_path / "repo" / "fast" / "_calib"  # underscore folders are not versions
    calib.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 36), (60 * i, 20, 200 - 40 * i)).save(calib / f"{i}.png")
    repo = ModelRepository.from_dir(tmp_path / "repo")
    assert list(repo.models["fast"].versions) == ["1"]
    predictor = Predictor.from_checkpoint(tmp_path / "repo" / "fast" / "1")
    batch = calibration_batch(calib, 2, predictor.prep)
    assert batch.shape == (2, 3, 32, 32)
    with TestClient(create_app(repo, ServeSettings(load_in_background=False))) as c:
        assert c.get("/v2/models/fast").json()["parameters"]["runtime"] == "channels_last"
        x = torch.randn(2, 3, 32, 32)
        r = c.post("/v2/models/fast/infer", json=v2_request(x))
        np.testing.assert_allclose(output(r, "logits"), predictor.logits(x).numpy(), rtol=1e-4, atol=1e-4)


def digits_run(run):
    """A run folder of the demo recipe, as far as the server reads one: a 10-class digits checkpoint beside the
    built-in demo recipe (untrained: where the calibration images come from is tested, not accuracy)."""
    torch.manual_seed(6)
    model = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, head="gap").eval()
    run.mkdir(parents=True)
    vggnet.save_checkpoint(model, run / "best.safetensors", {"classes": [str(i) for i in range(10)],
                                                             "mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 32})
    (run / "recipe.yaml").write_text((resources.files("vggnet.recipes") / "demo.yaml").read_text())
    return run


def test_a_calibrated_runtime_follows_predicts_rule(tmp_path, monkeypatch, caplog):
    """Issue #28 item 5: a served int8 model is calibrated by the rule of `vggnet predict` (and export): without
    calib_data on the run's own training split, the same images predict takes, which the CLI accepts where it
    refuses a bare checkpoint; calib_data still wins; the log says where the images came from."""
    import vggnet.serve.app
    from vggnet.cli import main
    from vggnet.infer import find_calibration, read_calibration
    from vggnet.serve.versions import calibration_batch

    run = digits_run(tmp_path / "demo")
    ckpt = run / "best.safetensors"
    prep = Predictor.from_checkpoint(run).prep
    assert torch.equal(calibration_batch(None, 16, prep, ckpt=ckpt), read_calibration(find_calibration(ckpt), 16, prep))
    started = []
    monkeypatch.setattr(vggnet.serve.app, "run_server", lambda repo, settings, **kw: started.append(settings))
    assert main(["serve", "--ckpt", str(run), "--runtime", "onnx-int8", "--calib-n", "16"]) == 0 and started
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 36), (60 * i, 20, 200 - 40 * i)).save(calib / f"{i}.png")
    repo = ModelRepository.from_checkpoints([run])
    for calib_data, where in ((None, f"the training split of {run / 'recipe.yaml'} (digits)"), (str(calib), calib)):
        settings = ServeSettings(runtime="onnx-int8", calib_data=calib_data, calib_n=16, load_in_background=False)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vggnet.serve"), TestClient(create_app(repo, settings)) as c:
            assert c.get("/v2/health/ready").status_code == 200
        said = [r.getMessage() for r in caplog.records if "calibrating" in r.getMessage()]
        assert said == [f"model demo version 1: calibrating onnx-int8 on {16 if calib_data is None else 4} images of "
                        f"{where}"]


def test_cli_refuses_unknown_or_uncalibrated_runtimes(repo_dir, capsys):
    from vggnet.cli import main

    assert main(["serve", "--ckpt", str(repo_dir / "cls" / "1"), "--runtime", "nope"]) == 2
    assert "unknown runtime 'nope'" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(repo_dir / "cls" / "1"), "--runtime", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--calib-data" in err
    assert len(err.splitlines()) == 1 and "no recipe.yaml" in err and "calib_data in the model's config.yaml" in err
    assert main(["serve", "--model-repo", str(repo_dir / "missing")]) == 2


def test_ab_routing_splits_by_weight_and_names_the_version(client, predictors):
    x = torch.randn(1, 3, 32, 32)
    expected = {v: p.logits(x).numpy() for v, p in predictors.items()}
    seen = []
    for _ in range(12):
        r = client.post("/v2/models/cls/infer", json=v2_request(x))
        version = r.json()["model_version"]
        assert r.headers["x-model-version"] == version
        np.testing.assert_allclose(output(r, "logits"), expected[version], rtol=1e-5, atol=1e-6)
        seen.append(version)
    assert seen.count("1") == 9 and seen.count("2") == 3  # weights 3 : 1, exactly
    r = client.post("/predict?model=cls", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
    assert r.json()["model_version"] in {"1", "2"}


def _big_chunks(total: int):
    for _ in range(total // 65536):
        yield b"\0" * 65536


BAD_REQUESTS = [
    # name, method kwargs, expected status
    ("truncated JPEG", dict(url="/predict?model=solo", content=jpeg_bytes()[:250],
                            headers={"Content-Type": "image/jpeg"}), 400),
    ("empty image body", dict(url="/predict?model=solo", content=b"", headers={"Content-Type": "image/png"}), 400),
    ("empty multipart file", dict(url="/predict?model=solo", files={"f": ("x.png", b"", "image/png")}), 400),
    ("PNG claiming 20000x20000", dict(url="/predict?model=solo", content=png_header(20000, 20000),
                                      headers={"Content-Type": "image/png"}), 413),
    ("PNG over the pixel limit", dict(url="/predict?model=solo", content=png_header(1200, 1000),
                                      headers={"Content-Type": "image/png"}), 413),
    ("not an image", dict(url="/predict?model=solo", content=b"hello", headers={"Content-Type": "image/png"}), 400),
    ("text content type", dict(url="/predict?model=solo", content=b"x", headers={"Content-Type": "text/plain"}), 415),
    ("two models, none named", dict(url="/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"}),
     400),
    ("bad topk", dict(url="/predict?model=solo&topk=zero", content=jpeg_bytes(),
                      headers={"Content-Type": "image/jpeg"}), 400),
    ("oversize body (Content-Length)", dict(url="/predict?model=solo", content=b"\0" * (1024 * 1024 + 1),
                                            headers={"Content-Type": "image/jpeg"}), 413),
    ("oversize body (chunked)", dict(url="/v2/models/solo/infer", content=_big_chunks(2 * 1024 * 1024),
                                     headers={"Content-Type": "application/json"}), 413),
    ("empty V2 body", dict(url="/v2/models/solo/infer", content=b"", headers={"Content-Type": "application/json"}),
     400),
    ("V2 not JSON", dict(url="/v2/models/solo/infer", content=b"{inputs", headers={"Content-Type": "application/json"}),
     400),
    ("V2 wrong shape", dict(url="/v2/models/solo/infer", json=v2_request(torch.zeros(1, 3, 32, 31))), 400),
    ("V2 wrong channels", dict(url="/v2/models/solo/infer", json=v2_request(torch.zeros(1, 1, 32, 32))), 400),
    ("V2 NaN", dict(url="/v2/models/solo/infer", content=json.dumps(v2_request(torch.full((1, 3, 32, 32),
                    float("nan")))), headers={"Content-Type": "application/json"}), 400),
    ("V2 infinity", dict(url="/v2/models/solo/infer", content=json.dumps(v2_request(torch.zeros(1, 3, 32, 32)))
                         .replace("0.0", "Infinity", 1), headers={"Content-Type": "application/json"}), 400),
    ("V2 batch over max", dict(url="/v2/models/cls/versions/1/infer", json=v2_request(torch.zeros(5, 3, 32, 32))),
     400),
    ("V2 datatype", dict(url="/v2/models/solo/infer", json={"inputs": [
        {"name": "input", "datatype": "INT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}), 400),
    ("V2 unknown output", dict(url="/v2/models/solo/infer",
                               json=v2_request(torch.zeros(1, 3, 32, 32), outputs=[{"name": "fc7"}])), 400),
    ("V2 binary size mismatch", dict(url="/v2/models/solo/infer", content=b'{"inputs":[{"name":"input",'
                                     b'"datatype":"FP32","shape":[1,3,32,32],"parameters":{"binary_data_size":8}}]}'
                                     + b"\0" * 8, headers={"Inference-Header-Content-Length": "96"}), 400),
    ("V2 content type", dict(url="/v2/models/solo/infer", content=b"{}", headers={"Content-Type": "text/csv"}), 415),
    ("V2 gzip bomb", dict(url="/v2/models/solo/infer", content=gzip.compress(b" " * (8 * 1024 * 1024)),
                          headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}), 413),
    ("unknown model", dict(url="/v2/models/nope/infer", json=v2_request(torch.zeros(1, 3, 32, 32))), 404),
    ("unknown version", dict(url="/v2/models/solo/versions/7/infer", json=v2_request(torch.zeros(1, 3, 32, 32))),
     404),
]


@pytest.mark.parametrize("name, kwargs, status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_json_and_the_server_carries_on(client, name, kwargs, status):
    kwargs = dict(kwargs)
    if "content" in kwargs and not isinstance(kwargs["content"], bytes | str):
        kwargs["content"] = _big_chunks(2 * 1024 * 1024)  # a fresh generator per run
    r = client.post(**kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    ok = client.post("/v2/models/solo/infer", json=v2_request(torch.zeros(1, 3, 32, 32)))
    assert ok.status_code == 200


def test_unmatched_routes_and_methods_are_json(client):
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    r = client.get("/v2/models/solo/infer")
    assert r.status_code == 405 and "error" in r.json()


def test_metrics_and_access_log(client, caplog):
    x = torch.zeros(1, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="vggnet.serve.access"):
        r = client.post("/v2/models/solo/infer", json=v2_request(x), headers={"X-Request-ID": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    record = json.loads([rec.getMessage() for rec in caplog.records if "trace-42" in rec.getMessage()][-1])
    assert record["route"] == "/v2/models/{name}/infer" and record["status"] == 200
    assert record["model"] == "solo" and record["version"] == "1" and record["batch"] >= 1
    client.post("/v2/models/solo/infer", json=v2_request(torch.zeros(1, 3, 31, 32)))
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)

    def value(name: str, **labels) -> float:
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    route = "/v2/models/{name}/infer"
    assert value("vggnet_http_requests_total", route=route, status="200") >= 1
    assert value("vggnet_http_requests_total", route=route, status="400") >= 1
    assert value("vggnet_http_request_duration_seconds_count", route=route) >= 2
    assert value("vggnet_batch_size_count", model="solo", version="1") >= 1
    assert value("vggnet_queue_duration_seconds_count", model="solo", version="1") >= 1
    assert value("vggnet_compute_duration_seconds_count", model="solo", version="1") >= 1
    assert value("vggnet_model_state", model="cls", version="2", state="READY") == 1
    assert value("vggnet_model_state", model="cls", version="2", state="LOADING") == 0
    assert any(s.name == "vggnet_http_requests_in_flight" for s in samples)
    assert "{name}" in route and not any("/v2/models/solo/" in s.labels.get("route", "") for s in samples)


def test_a_broken_version_is_reported_and_isolated(tmp_path):
    tiny_checkpoint(tmp_path / "good" / "1" / "best.safetensors", seed=0)
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "best.safetensors").write_bytes(b"not a safetensors file")
    app = create_app(ModelRepository.from_dir(tmp_path), ServeSettings(warmup=False, **LIMITS))
    with TestClient(app) as c:
        assert app.state.server.wait_loaded(30)
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503  # keeps the pod out of the load balancer
        assert c.get("/v2/models/bad/ready").status_code == 503
        index = {e["name"]: e for e in c.post("/v2/repository/index").json()}
        assert index["bad"]["state"] == "UNAVAILABLE" and index["bad"]["reason"]
        assert index["good"]["state"] == "READY"
        r = c.post("/v2/models/bad/infer", json=v2_request(torch.zeros(1, 3, 32, 32)))
        assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"]
        assert c.post("/v2/models/good/infer", json=v2_request(torch.zeros(1, 3, 32, 32))).status_code == 200
        assert c.post("/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"}).status_code == 400


def test_cli_max_explain_jobs_reaches_the_settings(repo_dir, monkeypatch, capsys):
    from vggnet.cli import main
    from vggnet.serve import app as serve_app

    seen = {}
    monkeypatch.setattr(serve_app, "run_server", lambda repo, settings, **kw: seen.update(settings=settings))
    assert main(["serve", "--ckpt", str(repo_dir / "cls" / "1"), "--max-explain-jobs", "5"]) == 0
    assert seen["settings"].max_explain_jobs == 5
    assert main(["serve", "--ckpt", str(repo_dir / "cls" / "1"), "--max-explain-jobs", "0"]) == 2
    assert "--max-explain-jobs must be positive" in capsys.readouterr().err


# colours of 32×32 test images (a square of the opposite colour in each): the images a net must tell apart
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (255, 255, 0), (128, 0, 255),
           (0, 200, 200)]


def clear_answer_checkpoint(path):
    """A tiny net whose last layer is scaled up: its top-1 differs between images and is not a near-tie
    (an untrained net's three probabilities all lie within a percent of 1/3, where any noise reorders them)."""
    torch.manual_seed(1)
    model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, head="gap")
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(30)
    return vggnet.save_checkpoint(model.eval(), path, {"classes": ["a", "b", "c"], "mean": [0.5] * 3,
                                                       "std": [0.25] * 3, "image_size": 32})


def test_predict_upload_equals_the_eager_net_on_clear_answers(tmp_path):
    """/predict against the network computed here by hand, not through Predictor (the code /predict shares):
    32×32 PNGs need no resize or crop, so the input is the pixels over 255, minus 0.5, over 0.25. A bug in the
    shared preprocessing or labels shows up here; the images are ones whose top-1 leads by 0.1 or more."""
    path = clear_answer_checkpoint(tmp_path / "repo" / "clear" / "1" / "best.safetensors")
    model = vggnet.load_checkpoint(path)[0].eval()
    cases = []
    for colour in PALETTE:
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[:] = colour
        pixels[8:24, 8:16] = 255 - np.asarray(colour)
        x = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
        with torch.no_grad():
            probs = model(x[None]).softmax(1)[0]
        top = probs.sort(descending=True)
        if top.values[0] - top.values[1] >= 0.1:  # a clear answer
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG")
            expected = [("abc"[int(i)], float(v)) for v, i in zip(top.values, top.indices, strict=True)]
            cases.append((buf.getvalue(), expected))
    assert len(cases) >= 4 and len({expected[0][0] for _, expected in cases}) >= 2  # the answer depends on the image
    app = create_app(ModelRepository.from_dir(tmp_path / "repo"), ServeSettings(load_in_background=False))
    with TestClient(app) as c:
        for data, expected in cases:
            r = c.post("/predict?model=clear&topk=3", content=data, headers={"Content-Type": "image/png"})
            got = r.json()["predictions"]
            assert [p["label"] for p in got] == [label for label, _ in expected], (got, expected)
            np.testing.assert_allclose([p["probability"] for p in got], [p for _, p in expected], rtol=1e-4,
                                       atol=1e-6)
