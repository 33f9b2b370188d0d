"""`vggnet serve --registry URI --model M` (issue 31, part 2) against a real MLflow registry (SQLite in tmp_path).

The CLI is run for real (flags, the registry read, the follower's wiring); only `run_server` is replaced by the
same app under a real uvicorn in a thread (`live_server`), so a test can reach the server object and stop it. The
registry is changed the way an operator changes it (`vggnet registry promote|rollback|mode`), while client threads
send requests the whole time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")
httpx = pytest.importorskip("httpx")

import vggnet.serve.app  # noqa: E402
from serve_helpers import jpeg_bytes, live_server, metric_samples, stored_rows, tiny_checkpoint  # noqa: E402
from vggnet.cli import main  # noqa: E402
from vggnet.registry import open_registry, register_run  # noqa: E402
from vggnet.serve import create_app  # noqa: E402

MODEL = "digits"
IMAGE = jpeg_bytes()
BIG = jpeg_bytes(size=(960, 720))
POLL = "0.2"


class Registry:
    """A registry in tmp_path with runs made on demand (a tiny checkpoint each)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "mlruns" / "mlflow.db"
        self.db.parent.mkdir(parents=True)
        self.uri = f"sqlite:///{self.db}"
        self.client = open_registry(self.uri)

    def register(self, seed: int, challenger: bool = False) -> str:
        run = self.root / f"run{seed}"
        run.mkdir()
        tiny_checkpoint(run / "best.safetensors", seed=seed)
        return str(register_run(self.client, MODEL, run, challenger=challenger).version)

    def checkpoint(self, version: str) -> Path:
        return Path(self.client.get_model_version(MODEL, version).tags["checkpoint"])

    def cli(self, capsys, *argv: str) -> str:
        code = main(["registry", *argv, "--tracking-uri", self.uri])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path)


@pytest.fixture(autouse=True)
def _restore_log_handlers() -> Iterator[None]:
    """`vggnet serve` sets up its log handlers each run: take them off again after the test."""
    names = ("vggnet.serve", "vggnet.serve.access", "vggnet.serve.predictions")
    before = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).level,
                     logging.getLogger(name).propagate) for name in names}
    yield
    for name, (handlers, level, propagate) in before.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@contextlib.contextmanager
def served(monkeypatch, uri: str, *extra: str) -> Iterator[tuple[str, Any]]:
    """`vggnet serve --registry URI --model digits` through the CLI; yields (base URL, ModelServer)."""
    started: dict[str, Any] = {}
    monkeypatch.setattr(vggnet.serve.app, "run_server",
                        lambda repo, settings, background=(), **kw: started.update(repo=repo, settings=settings,
                                                                                   background=background))
    argv = ["serve", "--registry", uri, "--model", MODEL, "--registry-poll-s", POLL, "--no-access-log",
            "--no-prediction-log", "--max-delay-ms", "1", *extra]
    assert main(argv) == 0 and started["background"]
    app = create_app(started["repo"], started["settings"], background=started["background"])
    with live_server(app) as (base, _):
        yield base, app.state.server


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def index(base: str) -> dict[str, dict[str, str]]:
    """version -> its index entry (a failed version's entry wins over nothing, the served one over a failed)."""
    entries = httpx.post(f"{base}/v2/repository/index").json()
    out: dict[str, dict[str, str]] = {}
    for entry in entries:
        assert entry["name"] == MODEL
        if entry["version"] not in out or entry["state"] == "READY":
            out[entry["version"]] = entry
    return out


def ready_versions(base: str) -> set[str]:
    return {v for v, e in index(base).items() if e["state"] == "READY"}


def predict(client: Any, base: str, image: bytes = IMAGE) -> tuple[int, str]:
    r = client.post(f"{base}/predict", content=image, headers={"Content-Type": "image/jpeg"})
    return r.status_code, r.headers.get("x-model-version", "")


def metric(base: str, name: str, **labels: str) -> float:
    samples = metric_samples(httpx.get(f"{base}/metrics").text)
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class Traffic:
    """Client threads sending /predict without pause until stopped; every answer's status and version kept."""

    def __init__(self, base: str, threads: int = 4, image: bytes = IMAGE) -> None:
        self.image = image
        self.base, self.answers, self.stop = base, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._send, daemon=True) for _ in range(threads)]

    def _send(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    answer = predict(client, self.base, self.image)
                except httpx.HTTPError as exc:
                    answer = (0, repr(exc))
                with self.lock:
                    self.answers.append(answer)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def versions_since(self, n: int) -> Counter:
        with self.lock:
            return Counter(v for _, v in self.answers[n:])

    def __len__(self) -> int:
        return len(self.answers)


def test_serves_the_champion_as_its_version_and_the_challenger_in_shadow(registry, monkeypatch, tmp_path):
    assert registry.register(0) == "1" and registry.register(1, challenger=True) == "2"
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    with served(monkeypatch, registry.uri, "--store", url, "--review-sample", "1") as (base, server):
        wait_for("the challenger", lambda: ready_versions(base) == {"1", "2"})  # loaded by the first poll
        meta = httpx.get(f"{base}/v2/models/{MODEL}").json()
        assert meta["name"] == MODEL and meta["parameters"]["default_version"] == "1"
        assert server.models[MODEL].config.shadow == ("2",)
        ids = []
        with httpx.Client() as client:
            for _ in range(3):
                r = client.post(f"{base}/predict", content=IMAGE, headers={"Content-Type": "image/jpeg"})
                assert r.status_code == 200 and r.json()["model_version"] == "1"  # the shadow never answers
                ids.append(r.json()["id"])
        assert metric(base, "vggnet_registry_polls_total", outcome="ok") >= 1
        assert metric(base, "vggnet_registry_swaps_total", outcome="done") == 1
    for request_id in ids:
        rows = stored_rows(url, request_id, want=2)
        assert sorted((r["version"], r["role"]) for r in rows) == [("1", "served"), ("2", "shadow")]


def test_ab_mode_gives_the_challenger_its_share_and_a_mode_change_reloads_nothing(registry, monkeypatch, capsys):
    registry.register(0)
    registry.register(1, challenger=True)
    assert "challenger mode ab:0.25 (was shadow)" in registry.cli(capsys, "mode", MODEL, "ab:0.25")
    assert "challenger mode ab:0.25" in registry.cli(capsys, "mode", MODEL)
    events = [json.loads(v) for k, v in registry.client.get_registered_model(MODEL).tags.items()
              if k.startswith("event.")]
    assert [(e["action"], e["mode"], e["previous"]) for e in events] == [("mode", "ab:0.25", "shadow")]
    with served(monkeypatch, registry.uri) as (base, server):
        wait_for("the A/B split", lambda: server.models[MODEL].config.ab == {"1": 0.75, "2": 0.25})
        loaded = dict(server.models[MODEL].versions)
        with httpx.Client() as client:
            answers = Counter(predict(client, base) for _ in range(20))
        assert answers == {(200, "1"): 15, (200, "2"): 5}  # smooth weighted round-robin: exactly 1 in 4

        registry.cli(capsys, "mode", MODEL, "shadow")
        wait_for("shadow mode", lambda: server.models[MODEL].config.shadow == ("2",))
        assert server.models[MODEL].config.ab == {}
        assert all(server.models[MODEL].versions[v] is loaded[v] for v in ("1", "2"))  # kept, not reloaded
        with httpx.Client() as client:
            assert Counter(predict(client, base) for _ in range(8)) == {(200, "1"): 8}


def test_promotion_and_rollback_are_served_under_load_without_a_failed_request(registry, monkeypatch, capsys):
    registry.register(0)
    registry.register(1, challenger=True)
    with served(monkeypatch, registry.uri) as (base, server):
        wait_for("the challenger", lambda: ready_versions(base) == {"1", "2"})
        shadow = server.models[MODEL].versions["2"]
        with Traffic(base, threads=8, image=BIG) as traffic:
            wait_for("traffic", lambda: len(traffic) > 20)
            registry.cli(capsys, "promote", MODEL, "--version", "2", "--force", "--reason", "test")
            mark = len(traffic)
            wait_for("version 2 answering", lambda: traffic.versions_since(mark)["2"] > 20)
            assert server.models[MODEL].versions["2"] is shadow  # the shadow became champion as it was loaded
            wait_for("version 1 retired", lambda: ready_versions(base) == {"2"})

            registry.cli(capsys, "rollback", MODEL)  # version 1 was closed: loaded again, beside version 2
            mark = len(traffic)
            wait_for("version 1 answering", lambda: traffic.versions_since(mark)["1"] > 20)
            wait_for("version 2 retired", lambda: ready_versions(base) == {"1"})
            wait_for("more traffic", lambda: len(traffic) > mark + 50)
        statuses = Counter(status for status, _ in traffic.answers)
        assert statuses.keys() == {200}, statuses
        assert len(traffic.answers) > 100
        assert metric(base, "vggnet_registry_swaps_total", outcome="done") == 3  # challenger, promote, rollback


@pytest.mark.parametrize("damage, says", [
    ("changed", "the registry recorded"),  # the file changed after it was registered: its sha256 differs
    ("missing", "not found"),
    ("corrupt", "not a readable safetensors file"),  # registered corrupt (the hash matches): the load fails
])
def test_a_broken_champion_leaves_the_old_one_serving_with_the_reason_in_the_index(registry, monkeypatch, capsys,
                                                                                    damage, says, caplog):
    registry.register(0)
    registry.register(1)
    if damage == "corrupt":
        run = registry.root / "run9"
        run.mkdir()
        (run / "best.safetensors").write_bytes(b"not a safetensors file")
        assert str(register_run(registry.client, MODEL, run).version) == "3"
    else:
        assert registry.register(2) == "3"
        ckpt = registry.checkpoint("3")
        if damage == "changed":
            tiny_checkpoint(ckpt, seed=7)
            assert hashlib.sha256(ckpt.read_bytes()).hexdigest() != \
                registry.client.get_model_version(MODEL, "3").tags["checkpoint_sha256"]
        else:
            ckpt.unlink()
    with served(monkeypatch, registry.uri) as (base, server), caplog.at_level(logging.INFO, "vggnet.serve"):
        wait_for("version 1", lambda: ready_versions(base) == {"1"})
        with Traffic(base, threads=2) as traffic:
            registry.cli(capsys, "promote", MODEL, "--version", "3", "--force", "--reason", "test")
            entry = wait_for("the failure in the index", lambda: index(base).get("3"))
            assert entry["state"] == "UNAVAILABLE" and says in entry["reason"], entry
            assert str(registry.root) not in entry["reason"]  # paths cut to file names
            polls = metric(base, "vggnet_registry_polls_total", outcome="ok")
            wait_for("more polls", lambda: metric(base, "vggnet_registry_polls_total", outcome="ok") >= polls + 3)
            assert metric(base, "vggnet_registry_swaps_total", outcome="failed") == 1  # not retried every poll
            assert ready_versions(base) == {"1"} and server.models[MODEL].config.default_version == "1"
            assert any("did not load" in r.getMessage() and "version 3" in r.getMessage() for r in caplog.records)

            registry.cli(capsys, "promote", MODEL, "--version", "2", "--force", "--reason", "a good one")
            wait_for("version 2", lambda: ready_versions(base) == {"2"})
            assert "3" not in index(base)  # the registry moved on: the old failure is gone from the index
            mark = len(traffic)
            wait_for("version 2 answering", lambda: traffic.versions_since(mark)["2"] > 5)
        assert Counter(status for status, _ in traffic.answers).keys() == {200}


def test_a_broken_challenger_is_left_out_and_the_champion_serves(registry, monkeypatch, capsys):
    registry.register(0)
    registry.register(1, challenger=True)
    registry.checkpoint("2").unlink()
    with served(monkeypatch, registry.uri) as (base, server):
        entry = wait_for("the failure in the index", lambda: index(base).get("2"))
        assert entry["state"] == "UNAVAILABLE" and "not found" in entry["reason"]
        assert ready_versions(base) == {"1"} and server.models[MODEL].config.shadow == ()
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200  # a failed challenger does not block
        assert metric(base, "vggnet_registry_swaps_total", outcome="partial") == 1


def test_the_registry_gone_mid_run_keeps_the_server_serving(registry, monkeypatch, capsys, caplog):
    registry.register(0)
    registry.register(1)
    away = registry.db.with_name("away.db")
    with served(monkeypatch, registry.uri) as (base, _), caplog.at_level(logging.INFO, "vggnet.serve"):
        wait_for("version 1", lambda: ready_versions(base) == {"1"})
        with Traffic(base, threads=2) as traffic:
            shutil.move(registry.db, away)
            wait_for("failed polls", lambda: metric(base, "vggnet_registry_polls_total", outcome="unreachable") >= 3)
            mark = len(traffic)
            wait_for("answers meanwhile", lambda: traffic.versions_since(mark)["1"] > 10)
            shutil.move(away, registry.db)
            registry.cli(capsys, "promote", MODEL, "--version", "2", "--force", "--reason", "back")
            mark = len(traffic)
            wait_for("version 2 answering", lambda: traffic.versions_since(mark)["2"] > 5)
        assert Counter(status for status, _ in traffic.answers).keys() == {200}
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "still serving version 1" in warnings[0]  # once per outage, not per poll
    assert any("answers again" in r.getMessage() for r in caplog.records)


def serve_err(capsys, *argv: str) -> str:
    code = main(["serve", *argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_startup_and_flag_errors_are_one_line(registry, monkeypatch, capsys, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("the server must not start")

    monkeypatch.setattr(vggnet.serve.app, "run_server", never)
    missing = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    assert "no model registry at" in serve_err(capsys, "--registry", missing, "--model", MODEL)
    assert not (tmp_path / "nowhere").exists()  # not created as an empty registry
    registry.register(0)
    assert "no registered model 'other'" in serve_err(capsys, "--registry", registry.uri, "--model", "other")
    registry.client.delete_registered_model_alias(MODEL, "champion")
    assert "has no champion" in serve_err(capsys, "--registry", registry.uri, "--model", MODEL)
    registry.client.set_registered_model_alias(MODEL, "champion", "1")
    registry.checkpoint("1").write_bytes(b"changed")
    err = serve_err(capsys, "--registry", registry.uri, "--model", MODEL)
    assert "digits@champion cannot be served" in err and "sha256" in err
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert "unreachable" in serve_err(capsys, "--registry", "http://127.0.0.1:9", "--model", MODEL)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)  # the default URI: $MLFLOW_TRACKING_URI
    assert "cannot be served" in serve_err(capsys, "--registry", "--model", MODEL)

    ckpt = str(registry.checkpoint("1"))
    for argv, says in ((["--ckpt", ckpt, "--model", MODEL], "--model names a registered model"),
                       (["--registry", registry.uri], "--registry needs --model"),
                       (["--registry", "--model", MODEL, "--registry-poll-s", "0"], "must be positive"),
                       (["--ckpt", ckpt, "--registry-poll-s", "1"], "--registry-poll-s needs --registry"),
                       (["--registry", "--model", MODEL, "--name", "x"], "--model")):
        assert says in serve_err(capsys, *argv), argv
    with pytest.raises(SystemExit) as exit_:  # argparse: the sources exclude each other
        main(["serve", "--registry", "--ckpt", ckpt, "--model", MODEL])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

    code = main(["registry", "mode", MODEL, "ab:1.5", "--tracking-uri", registry.uri])
    err = capsys.readouterr().err
    assert code == 2 and "expected shadow" in err and len(err.strip().splitlines()) == 1
