"""The service behind a real uvicorn on 127.0.0.1 (a free port): round trips, batching under concurrency,
malformed input over the wire, draining shutdown, tritonclient, and the ``vggnet serve`` command."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serve_helpers import jpeg_bytes, live_server, metric_samples, output, png_header, tiny_checkpoint
from vggnet.infer import RUNTIMES, Predictor
from vggnet.serve import ModelRepository, ServeSettings, create_app

SLOW_S = 0.3
HTTP_JPEG = dict(size=(60, 44), colour=(20, 90, 200), patch=((250, 250, 10), (10, 4, 40, 30)))


class SlowRuntime:
    """The eager model behind a fixed delay: a forward pass long enough for requests to queue behind it."""

    name = "test_slow"

    def __init__(self, model) -> None:
        self.eager = RUNTIMES["eager"](model, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLOW_S)
        return self.eager(x)


@pytest.fixture(scope="module", autouse=True)
def _slow_runtime():
    RUNTIMES["test_slow"] = lambda model, prep, calib=None, **_: SlowRuntime(model)
    yield
    RUNTIMES.pop("test_slow", None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("run") / "best.safetensors", seed=5)


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor.from_checkpoint(ckpt)


def v2_json(x: torch.Tensor) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


def metric_value(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in metric_samples(text)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_round_trip_and_malformed_inputs_over_the_wire(ckpt, predictor):
    repo = ModelRepository.from_checkpoints([ckpt], ["m"])
    app = create_app(repo, ServeSettings(load_in_background=False, max_body_bytes=256 * 1024,
                                         max_image_pixels=1_000_000))
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        x = torch.randn(2, 3, 32, 32)
        r = http.post("/v2/models/m/infer", json=v2_json(x))
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        np.testing.assert_allclose(output(r, "logits"), predictor.logits(x).numpy(), rtol=1e-5, atol=1e-6)
        image = jpeg_bytes(**HTTP_JPEG)
        r = http.post("/predict?topk=3", content=image, headers={"Content-Type": "image/jpeg"})
        expected = predictor.predict([Image.open(io.BytesIO(image))], topk=3)[0]
        assert [p["label"] for p in r.json()["predictions"]] == [label for label, _ in expected]

        nan = json.dumps(v2_json(torch.full((1, 3, 32, 32), float("nan"))))
        bad = [
            ("/predict", jpeg_bytes(**HTTP_JPEG)[:200], "image/jpeg", 400),  # truncated JPEG
            ("/predict", b"", "image/jpeg", 400),  # empty body
            ("/predict", png_header(20000, 20000), "image/png", 413),  # decompression bomb header
            ("/v2/models/m/infer", json.dumps(v2_json(torch.zeros(1, 3, 16, 16))), "application/json", 400),
            ("/v2/models/m/infer", nan, "application/json", 400),
            ("/v2/models/m/infer", b"", "application/json", 400),
            ("/v2/models/m/infer", b"x" * (300 * 1024), "application/json", 413),  # over the body limit
        ]
        for path, body, content_type, status in bad:
            r = http.post(path, content=body, headers={"Content-Type": content_type})
            assert r.status_code == status, (path, r.text)
            assert r.json()["error"]

        def chunked():
            for _ in range(8):
                yield b"\0" * 65536

        r = http.post("/v2/models/m/infer", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        # the server answers normally afterwards
        assert http.get("/v2/health/ready").status_code == 200
        r = http.post("/v2/models/m/infer", json=v2_json(x))
        np.testing.assert_allclose(output(r, "logits"), predictor.logits(x).numpy(), rtol=1e-5, atol=1e-6)
        metrics = http.get("/metrics").text
        assert metric_value(metrics, "vggnet_http_requests_total", route="/predict", status="413") == 1
        assert metric_value(metrics, "vggnet_http_requests_total", route="/v2/models/{name}/infer", status="400") == 3


def test_concurrent_requests_are_batched_and_bad_ones_fail_alone(ckpt, predictor):
    repo = ModelRepository.from_checkpoints([ckpt], ["m"])
    app = create_app(repo, ServeSettings(runtime="test_slow", warmup=False, load_in_background=False,
                                         max_batch_size=16, max_delay_ms=20))
    inputs = [torch.randn(1, 3, 32, 32) for _ in range(8)]
    bodies = [json.dumps(v2_json(x)) for x in inputs]
    bodies.insert(3, json.dumps(v2_json(torch.full((1, 3, 32, 32), float("inf")))))  # invalid, mid-burst
    bodies.insert(6, json.dumps(v2_json(torch.zeros(1, 2, 32, 32))))  # wrong shape
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=30,
                                                     limits=httpx.Limits(max_connections=16)) as http:
        start = threading.Barrier(len(bodies))

        def send(body: str) -> httpx.Response:
            start.wait()
            return http.post("/v2/models/m/infer", content=body, headers={"Content-Type": "application/json"})

        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(send, bodies))
        metrics = http.get("/metrics").text
    statuses = [r.status_code for r in responses]
    assert statuses.count(400) == 2 and statuses.count(200) == 8, statuses
    good = [r for r in responses if r.status_code == 200]
    for x, r in zip(inputs, good, strict=True):  # every request got its own rows back
        np.testing.assert_allclose(output(r, "logits"), predictor.logits(x).numpy(), rtol=1e-5, atol=1e-6)
    batches = metric_value(metrics, "vggnet_batch_size_count", model="m", version="1")
    rows = metric_value(metrics, "vggnet_batch_size_sum", model="m", version="1")
    singles = metric_value(metrics, "vggnet_batch_size_bucket", model="m", version="1", le="1.0")
    assert rows == 8  # the invalid requests never reached the model
    assert batches < 8 and singles < batches  # at least one forward pass served several requests
    assert max(r.json()["parameters"]["batch_size"] for r in good) > 1


def test_shutdown_drains_queued_requests(ckpt):
    repo = ModelRepository.from_checkpoints([ckpt], ["m"])
    app = create_app(repo, ServeSettings(runtime="test_slow", warmup=False, load_in_background=False,
                                         max_batch_size=2, max_delay_ms=0))
    x = torch.zeros(1, 3, 32, 32)
    with live_server(app) as (url, server), httpx.Client(base_url=url, timeout=30) as http:
        batcher = app.state.server.models["m"].versions["1"].batcher  # exists once the lifespan has loaded
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(http.post, "/v2/models/m/infer", json=v2_json(x)) for _ in range(6)]
            registry = app.state.metrics.registry

            def arrived() -> float:  # requests inside the app: being handled or already answered
                done = registry.get_sample_value("vggnet_http_requests_total", {
                    "route": "/v2/models/{name}/infer", "method": "POST", "status": "200"}) or 0
                return registry.get_sample_value("vggnet_http_requests_in_flight") + done

            deadline = time.monotonic() + 10
            while (arrived() < 6 or batcher.queued_rows < 2) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert arrived() == 6 and batcher.queued_rows >= 2  # all connected, some waiting behind a batch
            server.should_exit = True  # what SIGTERM does
            statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 6  # everything queued at shutdown was answered
    assert batcher.closing and app.state.server.closing


def test_tritonclient_http_works_unchanged(ckpt, predictor):
    import tritonclient.http as triton  # in the dev extra: a missing client fails this test, it is never skipped
    repo = ModelRepository.from_checkpoints([ckpt], ["m"])
    app = create_app(repo, ServeSettings(load_in_background=False))
    with live_server(app) as (url, _):
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m")
        assert client.get_model_metadata("m")["inputs"][0]["shape"] == [-1, 3, 32, 32]
        assert [m["name"] for m in client.get_model_repository_index()] == ["m"]
        x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
        expected = predictor.logits(torch.from_numpy(x)).numpy()
        for binary in (True, False):
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            result = client.infer("m", [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
            np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
        result = client.infer("m", [tensor], model_version="1",
                              outputs=[triton.InferRequestedOutput("probabilities", class_count=1)])
        top = [s.decode() if isinstance(s, bytes) else s for s in result.as_numpy("probabilities")[:, 0]]
        assert [int(s.split(":")[1]) for s in top] == expected.argmax(1).tolist()
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_answers_logs_and_exits_on_sigterm(ckpt, predictor):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vggnet", "serve", "--ckpt", str(ckpt.parent), "--port", str(port),
                             "--max-batch-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "vggnet serve did not become ready"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        name = ckpt.parent.name  # served under its run folder's name
        x = torch.randn(1, 3, 32, 32)
        r = httpx.post(f"{url}/v2/models/{name}/infer", json=v2_json(x), timeout=30)
        assert r.status_code == 200
        np.testing.assert_allclose(output(r, "logits"), predictor.logits(x).numpy(), rtol=1e-5, atol=1e-6)
        assert httpx.post(f"{url}/v2/models/{name}/infer", json=v2_json(torch.zeros(5, 3, 32, 32))).status_code == 400
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    infer = [rec for rec in records if rec["route"] == "/v2/models/{name}/infer"]
    assert [rec["status"] for rec in infer] == [200, 400] and infer[0]["model"] == name
    assert "shutdown complete" in stderr
