"""Who the server answers and what it lets them change (issue #29, items 8-11): the Host check against DNS
rebinding, /docs off by default, ``nosniff`` on every response, and Triton's model repository extension (load and
unload, behind the API key, refused from another site's page)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from serve_helpers import jpeg_bytes, live_server, metric_samples, output, tiny_checkpoint
from vggnet.errors import UsageError
from vggnet.infer import Predictor
from vggnet.serve import ModelRepository, ServeSettings, create_app
from vggnet.serve.hosts import allowed_hosts_for, normalise_host, parse_allowed_hosts

KEY = "0123456789abcdef-security"
AUTH = {"Authorization": f"Bearer {KEY}"}


def v2_request(x: torch.Tensor) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


@pytest.fixture
def repo_dir(tmp_path):
    """A repository folder per test: load and unload change it, or the server's view of it."""
    root = tmp_path / "repo"
    tiny_checkpoint(root / "cls" / "1" / "best.safetensors", seed=1)
    tiny_checkpoint(root / "solo" / "1" / "best.safetensors", seed=3)
    return root


def app_for(root, **settings):
    return create_app(ModelRepository.from_dir(root), ServeSettings(load_in_background=False, access_log=False,
                                                                     **settings))


def state_metric(c: TestClient, model: str, version: str) -> str:
    samples = metric_samples(c.get("/metrics", headers=AUTH).text)
    return next(s.labels["state"] for s in samples if s.name == "vggnet_model_state" and s.value == 1
                and s.labels["model"] == model and s.labels["version"] == version)


# --- Host -----------------------------------------------------------------------------------------------------


def test_allowed_hosts_follow_the_bound_address_and_the_list():
    loopback = ("localhost", "127.0.0.1", "[::1]")
    assert allowed_hosts_for("127.0.0.1") == ("127.0.0.1", "localhost", "[::1]")
    assert allowed_hosts_for("localhost") == loopback
    assert allowed_hosts_for("::1") == ("[::1]", "localhost", "127.0.0.1")
    assert allowed_hosts_for("10.0.0.5") == ("10.0.0.5",)  # not loopback: only its own address
    assert allowed_hosts_for("10.0.0.5", ["Models.Example.com"]) == ("10.0.0.5", "models.example.com")
    assert allowed_hosts_for("0.0.0.0") == ("*",) and allowed_hosts_for("::") == ("*",)  # documented: any host
    assert allowed_hosts_for("0.0.0.0", ["*.example.com"]) == (*loopback, "*.example.com")
    assert allowed_hosts_for("127.0.0.1", ["a.example", "*"]) == ("*",)  # only when asked for
    assert parse_allowed_hosts(" a.example, ::1 ,") == ("a.example", "[::1]")
    assert normalise_host("[2001:DB8::1]") == "[2001:db8::1]"
    for bad in ("a.example:8000", "http://a.example", "a.*.example", "*example.com", " "):
        with pytest.raises(UsageError):
            normalise_host(bad)


def test_a_wrong_host_is_refused_before_auth_and_counted(repo_dir):
    with TestClient(app_for(repo_dir, api_keys=(KEY,))) as c:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.", "[::2]:80"):
            r = c.get("/v2/models/cls", headers={"Host": host, **AUTH})
            assert r.status_code == 400 and r.text == "Invalid host header", host  # Starlette's answer
            assert r.headers["x-content-type-options"] == "nosniff"
        r = c.post("/v2/models/cls/infer", headers={"Host": "evil.example"}, json={})  # no key: still 400, not 401
        assert r.status_code == 400 and "www-authenticate" not in r.headers
        for host in ("testserver", "localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
            assert c.get("/v2/models/cls", headers={"Host": host, **AUTH}).status_code == 200, host
        assert c.get("/v2/models/cls", headers={"Host": "localhost"}).status_code == 401  # then the key counts
        samples = metric_samples(c.get("/metrics").text)
        refused = [s.value for s in samples if s.name == "vggnet_http_requests_total" and s.labels["status"] == "400"]
        assert sum(refused) == 6


def test_a_wrong_host_is_refused_before_a_byte_of_the_body_is_read(repo_dir):
    app = app_for(repo_dir, allowed_hosts=("models.example.com", "*.internal.example"))
    received, sent = [], []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    def call(host: str) -> int:
        received.clear(), sent.clear()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v2/repository/index", "raw_path": b"/v2/repository/index", "query_string": b"",
                 "root_path": "", "headers": [(b"host", host.encode()), (b"content-length", b"2")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"]

    assert call("evil.example") == 400 and received == []
    assert call("testserver") == 400 and received == []  # a list replaces the defaults, TestClient's host included
    assert call("models.example.com") == 200 and received == [1]
    assert call("a.internal.example:8000") == 200


def test_dns_rebinding_over_a_real_socket(repo_dir):
    """What a rebinding page's requests look like to the server: its own address, another name in Host."""
    with live_server(app_for(repo_dir)) as (url, _), httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/v2/models/cls").status_code == 200  # Host: 127.0.0.1:<port>
        r = http.post("/v2/models/cls/infer", headers={"Host": "rebind.evil.example"}, json=v2_request(torch.zeros(
            1, 3, 32, 32)))
        assert r.status_code == 400 and r.text == "Invalid host header"
        port = url.rsplit(":", 1)[1]
        assert http.get("/v2/health/live", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_cli_allowed_hosts_and_docs_reach_the_settings(repo_dir, monkeypatch, capsys):
    from vggnet.cli import main
    from vggnet.serve import app as serve_app

    seen = {}
    monkeypatch.setattr(serve_app, "run_server", lambda repo, settings, **kw: seen.update(settings=settings, **kw))
    ckpt = str(repo_dir / "cls" / "1")
    assert main(["serve", "--ckpt", ckpt]) == 0
    assert seen["settings"].allowed_hosts is None and seen["settings"].docs is False  # run_server derives them
    assert main(["serve", "--ckpt", ckpt, "--allowed-hosts", "models.example.com, 10.0.0.5", "--docs"]) == 0
    assert seen["settings"].allowed_hosts == ("127.0.0.1", "localhost", "[::1]", "models.example.com", "10.0.0.5")
    assert seen["settings"].docs is True
    assert main(["serve", "--ckpt", ckpt, "--host", "0.0.0.0", "--allowed-hosts", "*"]) == 0
    assert seen["settings"].allowed_hosts == ("*",) and seen["host"] == "0.0.0.0"
    assert main(["serve", "--ckpt", ckpt, "--allowed-hosts", "models.example.com:8000"]) == 2
    assert "without a scheme or port" in capsys.readouterr().err
    assert main(["serve", "--ckpt", ckpt, "--allowed-hosts", ","]) == 2
    assert "--allowed-hosts names no host" in capsys.readouterr().err


def test_run_server_derives_the_list_from_the_bind_and_warns_on_a_wildcard(repo_dir, monkeypatch, caplog):
    import uvicorn

    from vggnet.serve import run_server

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: apps.append(self.config.app))
    repo = ModelRepository.from_dir(repo_dir)
    with caplog.at_level(logging.WARNING, logger="vggnet.serve"):
        run_server(repo, ServeSettings(), host="127.0.0.1")
        assert not caplog.records
        run_server(repo, ServeSettings(), host="0.0.0.0")
    assert apps[0].state.server.settings.allowed_hosts == ("127.0.0.1", "localhost", "[::1]")
    assert apps[1].state.server.settings.allowed_hosts == ("*",)
    assert "any Host header is accepted" in caplog.text and "--allowed-hosts" in caplog.text
    run_server(repo, ServeSettings(allowed_hosts=("a.example",)), host="0.0.0.0")
    assert apps[2].state.server.settings.allowed_hosts == ("a.example",)  # a given list is used as it is


# --- /docs, nosniff -------------------------------------------------------------------------------------------


def test_docs_are_off_by_default_and_nothing_served_loads_from_another_origin(repo_dir):
    with TestClient(app_for(repo_dir)) as c:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert c.get(path).status_code == 404, path
        assert c.get("/openapi.json").json()["info"]["title"] == "vggnet"  # the schema loads nothing
        for path in ("/", "/static/page.js", "/static/page.css"):  # everything else a browser would render
            text = c.get(path).text
            assert "http://" not in text and "https://" not in text and 'src="//' not in text, path
    with TestClient(app_for(repo_dir, docs=True, api_keys=(KEY,))) as c:
        assert c.get("/docs").status_code == 401  # not public
        page = c.get("/docs", headers=AUTH)
        # what --docs turns on, as SECURITY.md says: Swagger UI from a CDN
        assert page.status_code == 200 and "https://cdn.jsdelivr.net/" in page.text
        assert c.get("/redoc", headers=AUTH).status_code == 200


def test_every_response_says_nosniff(repo_dir, monkeypatch):
    from vggnet.serve import v2 as serve_v2

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    x = torch.zeros(1, 3, 32, 32)
    image = {"content": jpeg_bytes(), "headers": {"Content-Type": "image/jpeg", **AUTH}}
    with TestClient(app_for(repo_dir, api_keys=(KEY,), public_endpoints=("health",), max_body_bytes=64 * 1024),
                    raise_server_exceptions=False) as c:
        responses = [
            c.get("/v2", headers=AUTH), c.get("/v2/health/live"), c.get("/v2/health/ready"),
            c.get("/v2/models/cls", headers=AUTH), c.get("/v2/models/cls/config", headers=AUTH),
            c.get("/v2/models/cls/ready", headers=AUTH), c.post("/v2/repository/index", headers=AUTH),
            c.post("/v2/models/cls/infer", json=v2_request(x), headers=AUTH),
            c.post("/v2/models/cls/infer", json=v2_request(torch.zeros(1, 3, 8, 8)), headers=AUTH),  # 400
            c.post("/v2/models/cls/infer", content=b"x" * 70_000, headers={"Content-Type": "application/json",
                                                                          **AUTH}),  # 413
            c.post("/predict?model=cls", **image), c.post("/predict?model=cls", content=b"x",
                                                          headers={"Content-Type": "text/plain", **AUTH}),  # 415
            c.post("/explain?model=cls&format=json", **image), c.get("/metrics", headers=AUTH),
            c.get("/v2/models/nope", headers=AUTH), c.get("/no/such/path", headers=AUTH),  # 404s
            c.get("/v2/models/cls"),  # 401
            c.get("/v2/health/live", headers={"Host": "evil.example"}),  # 400 for the host
            c.get("/"), c.get("/static/page.js"), c.get("/openapi.json", headers=AUTH),
            c.post("/v2/repository/models/solo/unload", headers=AUTH),
            c.post("/v2/models/solo/infer", json=v2_request(x), headers=AUTH),  # 503: unloaded
            c.post("/v2/repository/models/solo/load", headers=AUTH),
        ]
        monkeypatch.setattr(serve_v2, "encode_response", boom)
        responses.append(c.post("/v2/models/cls/infer", json=v2_request(x), headers=AUTH))  # 500
    statuses = {r.status_code for r in responses}
    assert statuses >= {200, 400, 401, 404, 413, 415, 500, 503}, statuses
    for r in responses:
        assert r.headers.get_list("x-content-type-options") == ["nosniff"], (r.request.url, r.status_code)


# --- load / unload --------------------------------------------------------------------------------------------


def test_unload_then_load_through_tritonclient(repo_dir):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    app = app_for(repo_dir)
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        assert "model_repository" in http.get("/v2").json()["extensions"]
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        before = client.infer("cls", [tensor]).as_numpy("logits")
        client.unload_model("cls")
        assert not client.is_model_ready("cls") and client.is_model_ready("solo")
        assert client.is_server_ready()  # an unloaded model does not count
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert index["cls"]["state"] == "UNAVAILABLE" and index["cls"]["reason"] == "unloaded"
        with pytest.raises(InferenceServerException, match="unloaded") as info:
            client.infer("cls", [tensor])
        assert info.value.status() == "503"
        assert app.state.server.models["cls"].versions["1"].predictor is None  # the weights are freed
        client.load_model("cls")
        assert client.is_model_ready("cls")
        np.testing.assert_allclose(client.infer("cls", [tensor]).as_numpy("logits"), before, rtol=1e-5, atol=1e-6)
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.unload_model("nope")
        client.close()


def test_load_reads_the_model_folder_again_and_swaps_only_when_every_version_is_ready(repo_dir):
    x = torch.randn(1, 3, 32, 32)
    with TestClient(app_for(repo_dir)) as c:
        first = output(c.post("/v2/models/cls/infer", json=v2_request(x)), "logits")
        # a retrained checkpoint in place, and a new version folder
        tiny_checkpoint(repo_dir / "cls" / "1" / "best.safetensors", seed=11)
        tiny_checkpoint(repo_dir / "cls" / "2" / "best.safetensors", seed=12)
        r = c.post("/v2/repository/models/cls/load")
        assert r.status_code == 200, r.text
        assert [(e["version"], e["state"]) for e in r.json()] == [("1", "READY"), ("2", "READY")]
        now = output(c.post("/v2/models/cls/versions/1/infer", json=v2_request(x)), "logits")
        expected = Predictor.from_checkpoint(repo_dir / "cls" / "1").logits(x).numpy()
        np.testing.assert_allclose(now, expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(now, first)
        assert c.post("/v2/models/cls/infer", json=v2_request(x)).json()["model_version"] == "2"  # the new default
        assert state_metric(c, "cls", "1") == "READY" and state_metric(c, "cls", "2") == "READY"

        # a broken version: 400 with its reason, the running model keeps serving unchanged
        (repo_dir / "cls" / "3").mkdir()
        (repo_dir / "cls" / "3" / "best.safetensors").write_bytes(b"not a checkpoint")
        r = c.post("/v2/repository/models/cls/load")
        assert r.status_code == 400 and "version 3" in r.json()["error"] and "stays as it was" in r.json()["error"]
        assert str(repo_dir) not in r.json()["error"]  # paths cut to file names
        assert c.get("/v2/models/cls").json()["versions"] == ["1", "2"]
        assert c.post("/v2/models/cls/infer", json=v2_request(x)).status_code == 200
        assert state_metric(c, "cls", "2") == "READY"
        shutil.rmtree(repo_dir / "cls" / "3")

        # a model folder that was not served yet is served after a load; a name that is not a folder is 404
        tiny_checkpoint(repo_dir / "late" / "1" / "best.safetensors", seed=4)
        assert c.post("/v2/models/late/infer", json=v2_request(x)).status_code == 404
        assert c.post("/v2/repository/models/late/load").status_code == 200
        assert c.post("/v2/models/late/infer", json=v2_request(x)).status_code == 200
        assert c.post("/v2/repository/models/..%2Fcls/load").status_code == 404
        r = c.post("/v2/repository/models/cls/load", json={"parameters": {"config": "{}"}})
        assert r.status_code == 400 and "no config or file overrides" in r.json()["error"]


def test_load_and_unload_need_the_key_whatever_is_public(repo_dir):
    settings = {"api_keys": (KEY,), "public_endpoints": ("health", "metrics", "metadata")}
    with TestClient(app_for(repo_dir, **settings)) as c:
        for action in ("load", "unload"):
            r = c.post(f"/v2/repository/models/cls/{action}")
            assert r.status_code == 401, action
        assert c.get("/v2/models/cls/ready").status_code == 200  # untouched
        assert c.post("/v2/repository/models/cls/unload", headers=AUTH).status_code == 200
        assert c.get("/v2/models/cls/ready").status_code == 503


def test_load_and_unload_are_refused_from_another_sites_page(repo_dir):
    """Without keys, a cross-site POST needs no preflight, so a browser would send it: refused when a browser says
    where it comes from; a same-origin page and clients that send no Origin are served."""
    with TestClient(app_for(repo_dir)) as c:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"}):
            r = c.post("/v2/repository/models/cls/unload", headers=headers, content=b"{}")
            assert r.status_code == 403 and "another site" in r.json()["error"], headers
        assert c.get("/v2/models/cls/ready").status_code == 200
        r = c.post("/v2/repository/models/cls/unload", headers={"Origin": "http://testserver",
                                                                 "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200 and r.json()[0]["state"] == "UNAVAILABLE"


def test_load_and_unload_wait_for_the_startup_loading(repo_dir):
    """While the models load in the background, a load or unload would race the loader: 503, retry later."""
    from vggnet.infer import RUNTIMES

    release = threading.Event()

    def held(model, prep, calib=None, **_):
        release.wait(20)
        return RUNTIMES["eager"](model, prep)

    RUNTIMES["test_held"] = held
    try:
        app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(runtime="test_held", warmup=False))
        with TestClient(app) as c:
            for action in ("load", "unload"):
                r = c.post(f"/v2/repository/models/cls/{action}")
                assert r.status_code == 503 and "still loading" in r.json()["error"] and r.headers["retry-after"]
            release.set()
            assert app.state.server.wait_loaded(20)
            assert c.post("/v2/repository/models/cls/unload").status_code == 200
    finally:
        release.set()
        RUNTIMES.pop("test_held", None)


def test_a_new_model_is_looked_up_by_folder_name_only(repo_dir):
    repo = ModelRepository.from_dir(repo_dir)
    assert repo.new_model_folder("cls") == repo_dir / "cls"
    for name in ("..", "../repo", ".hidden", "_calib", "nope", "cls/1"):
        assert repo.new_model_folder(name) is None, name
    assert ModelRepository.from_checkpoints([repo_dir / "cls" / "1"]).new_model_folder("cls") is None
