"""The server's parts (issue #27): routers wired by create_app, user mistakes as VggnetError, bugs with tracebacks."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from serve_helpers import jpeg_bytes, tiny_checkpoint
from vggnet.cli import main
from vggnet.errors import UsageError, VggnetError
from vggnet.serve import ModelRepository, ServeSettings, create_app
from vggnet.serve.auth import read_api_keys
from vggnet.serve.versions import ModelVersion, check_exported, ensure_runtime

JPEG = {"content": jpeg_bytes(), "headers": {"content-type": "image/jpeg"}}


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    tiny_checkpoint(root / "cls" / "1" / "best.safetensors", seed=1)
    return root


def _routes(routes) -> list[tuple[str, str]]:
    """(method, path) of every route, through included routers (FastAPI >= 0.16x keeps them as one entry)."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found += _routes(inner.routes)
        else:
            found += [(method, route.path) for method in getattr(route, "methods", None) or ()]
    return found


def test_create_app_wires_every_route_once(repo_dir):
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False))
    routes = sorted(route for route in _routes(app.routes) if not route[1].startswith(("/docs", "/redoc", "/openapi")))
    assert routes == sorted([
        ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/{name}/load"), ("POST", "/v2/repository/models/{name}/unload"),
        ("GET", "/v2/models/{name}"), ("GET", "/v2/models/{name}/versions/{version}"),
        ("GET", "/v2/models/{name}/ready"), ("GET", "/v2/models/{name}/versions/{version}/ready"),
        ("GET", "/v2/models/{name}/config"), ("GET", "/v2/models/{name}/versions/{version}/config"),
        ("POST", "/v2/models/{name}/infer"), ("POST", "/v2/models/{name}/versions/{version}/infer"),
        ("POST", "/v2/models/{name}/feedback"),
        ("GET", "/review"), ("GET", "/v2/review/queue"), ("POST", "/v2/review/label"),
        ("GET", "/v2/review/input/{prefix}/{name}"),
        ("POST", "/predict"), ("POST", "/explain"), ("GET", "/"), ("GET", "/static/{name}"), ("GET", "/metrics"),
    ])


def test_two_apps_in_one_process_keep_their_own_state(repo_dir):
    """Routes reach the server through dependencies, not a module-level or closed-over one."""
    one = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False, topk=1))
    two = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False, topk=2))
    with TestClient(one) as a, TestClient(two) as b:
        assert len(a.post("/predict", **JPEG).json()["predictions"]) == 1
        assert len(b.post("/predict", **JPEG).json()["predictions"]) == 2
        assert 'route="/predict"' in a.get("/metrics").text
    assert one.state.server is not two.state.server


def test_a_load_that_fails_on_a_bug_logs_its_traceback_and_leaves_the_version_unavailable(repo_dir, monkeypatch,
                                                                                           caplog):
    def boom(self):
        raise RuntimeError(f"boom in {repo_dir}/cls/1/best.safetensors")

    monkeypatch.setattr(ModelVersion, "_load_checkpoint", boom)
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False))
    with caplog.at_level(logging.ERROR, logger="vggnet.serve"), TestClient(app) as c:
        index = c.post("/v2/repository/index").json()
    assert index == [{"name": "cls", "version": "1", "state": "UNAVAILABLE",
                      "reason": "RuntimeError: boom in best.safetensors"}]
    failed = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert failed and failed[-1].exc_info is not None


def test_a_load_that_fails_on_a_user_error_logs_one_line(repo_dir, monkeypatch, caplog):
    def refuse(self):
        raise UsageError("unknown runtime 'x'")

    monkeypatch.setattr(ModelVersion, "_load_checkpoint", refuse)
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False))
    with caplog.at_level(logging.ERROR, logger="vggnet.serve"), TestClient(app) as c:
        assert c.get("/v2/models/cls/ready").status_code == 503
    failed = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert failed and failed[-1].exc_info is None and "unknown runtime" in failed[-1].getMessage()


def test_a_failing_model_is_a_500_with_the_traceback_in_the_log(repo_dir, monkeypatch, caplog):
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False))
    with TestClient(app, raise_server_exceptions=False) as c:
        def fail(x):
            raise RuntimeError("the model broke")

        monkeypatch.setattr(app.state.server.version("cls", None).batcher, "fn", fail)
        with caplog.at_level(logging.ERROR, logger="vggnet.serve"):
            r = c.post("/predict", **JPEG)
    assert r.status_code == 500 and r.json()["error"] == "internal error"
    logged = [rec for rec in caplog.records if "inference failed" in rec.getMessage()]
    assert logged and logged[-1].exc_info is not None and "the model broke" in str(logged[-1].exc_info[1])


def test_malformed_multipart_bodies_are_400(repo_dir):
    app = create_app(ModelRepository.from_dir(repo_dir), ServeSettings(load_in_background=False))
    with TestClient(app) as c:
        for content_type in ("multipart/form-data", "multipart/form-data; boundary=x"):
            r = c.post("/predict", content=b"--x\r\nbroken", headers={"content-type": content_type})
            assert r.status_code == 400 and "multipart body" in r.json()["error"]
        for body in (b"garbage\r\n--y--", b"--x\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--x--\r\n"):
            r = c.post("/predict", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
            assert r.status_code == 400 and r.json()["error"].startswith("malformed multipart body: ")


def test_user_errors_are_vggnet_errors(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.yaml").write_text("name: [unclosed\n")
    with pytest.raises(VggnetError, match="not valid YAML"):
        ModelRepository.from_dir(tmp_path)
    (tmp_path / "m" / "config.yaml").write_text("ab: [1, 2]\n")
    tiny_checkpoint(tmp_path / "m" / "1" / "best.safetensors")
    with pytest.raises(VggnetError, match="ab must map versions to weights"):
        ModelRepository.from_dir(tmp_path)
    (tmp_path / "m" / "config.yaml").write_text("max_batch: 4\n")
    with pytest.raises(UsageError, match="unknown key"):
        ModelRepository.from_dir(tmp_path)
    with pytest.raises(UsageError, match="unknown runtime"):
        ensure_runtime("warp-drive")
    with pytest.raises(UsageError, match="--trust-model-code"):
        check_exported(tmp_path / "m.pt2", "eager", False)
    keys = tmp_path / "keys"
    keys.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UsageError, match="not a text file"):
        read_api_keys(keys)


def test_cli_reports_a_bad_repository_in_one_line(tmp_path, capsys):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.yaml").write_text("name: [unclosed\n")
    assert main(["serve", "--model-repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err
    assert main(["serve", "--ckpt", str(tmp_path), "--port", "-1"]) == 2
    assert "--port must be 0 or more" in capsys.readouterr().err
