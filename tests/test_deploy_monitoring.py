"""deploy/'s alert rules and Grafana dashboard against real Prometheus, and the live accuracy gauges behind them.

- The store's ``reviewed_counts`` (what ``vggnet serve --store`` exports as ``vggnet_live_accuracy``) counts exactly
  as ``vggnet monitor report`` does, on a planted store with every case that report tells apart (SQLite, and the
  real PostgreSQL at $VGGNET_TEST_POSTGRES when it is set).
- ``promtool check rules`` and ``promtool test rules deploy/prometheus-rules.test.yaml``: each alert fires on
  planted series, with its rendered text, and stays silent on the normal ones.
- A real server (uvicorn) with the store, drift and out-of-domain references, scraped every second by a real
  Prometheus (scripts/prometheus.sh) with the rules loaded: every panel's query of the dashboard JSON runs through
  Prometheus' HTTP API without an error, the core panels have data, the live accuracy Prometheus holds is the
  reviews' own figure, and every rule is evaluated without an error.

Prometheus is Debian's ``prometheus`` package (promtool included); the tests skip without it unless
VGGNET_REQUIRE_PROMETHEUS=1 (.ci/run sets it), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

sa = pytest.importorskip("sqlalchemy")

from serve_helpers import jpeg_bytes, live_server, stored_rows, tiny_checkpoint  # noqa: E402
from vggnet import store  # noqa: E402
from vggnet.infer import Predictor, reference  # noqa: E402
from vggnet.monitor import version_report  # noqa: E402
from vggnet.serve import ModelRepository, ServeMetrics, ServeSettings, create_app  # noqa: E402
from vggnet.serve.live import LiveAccuracy  # noqa: E402
from vggnet.stats import wilson_interval  # noqa: E402
from vggnet.store import schema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus-rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
PROMETHEUS_SH = ROOT / "scripts" / "prometheus.sh"
REQUIRED = os.environ.get("VGGNET_REQUIRE_PROMETHEUS") == "1"
PG_URL = os.environ.get("VGGNET_TEST_POSTGRES")
KEY = "k" * 24
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _need(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        reason = f"{binary} is not installed (apt-get install prometheus)"
        if REQUIRED:
            pytest.fail(f"VGGNET_REQUIRE_PROMETHEUS=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return found


# ---- the live accuracy: the store's counts are the report's -----------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = store.connect(f"sqlite:///{tmp_path / 'store.db'}")
        yield engine
        engine.dispose()
        return
    if not PG_URL or importlib.util.find_spec("psycopg") is None:
        if os.environ.get("VGGNET_REQUIRE_POSTGRES") == "1":
            pytest.fail("VGGNET_REQUIRE_POSTGRES=1 but VGGNET_TEST_POSTGRES is not set or psycopg is missing")
        pytest.skip("VGGNET_TEST_POSTGRES is not set (`make postgres` starts a server and prints the line)")
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"vggnet_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = store.connect(sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _plant(engine) -> None:
    """Two models; every case the report tells apart, each on its own request ids."""
    preds, labs = [], []

    def predict(rid, version, predicted, *, sampled=True, role="served", model="digits", item=0, minutes=0):
        preds.append({"request_id": rid, "item": item, "created_at": T0 + timedelta(minutes=minutes), "model": model,
                      "version": version, "role": role, "route": "/predict", "predicted": predicted,
                      "confidence": 0.9, "topk": [], "sampled": sampled})

    def label(rid, value, *, source="review", minutes=1, model="digits", item=0):
        labs.append({"request_id": rid, "item": item, "model": model, "label": value, "source": source,
                     "who": "ann", "created_at": T0 + timedelta(minutes=minutes)})

    for i in range(7):  # sampled, served by v1 and run by v2 in shadow; v1 right on 5, v2 on 3
        predict(f"s{i}", "1", "cat" if i < 5 else "dog")
        predict(f"s{i}", "2", "cat" if i < 3 else "dog", role="shadow", sampled=i % 2 == 0)  # one sampled row: all
        label(f"s{i}", "cat")
    predict("relabel", "1", "cat")
    label("relabel", "dog", minutes=1)
    label("relabel", "cat", minutes=5)  # the latest review label wins: right
    predict("tie", "1", "cat")
    label("tie", "cat", minutes=2)
    label("tie", "dog", minutes=2)  # same time: the later insertion wins: wrong
    predict("none", "1", "cat")
    label("none", None)  # "none of these": wrong for every version
    predict("outside", "1", "cat", sampled=False)
    label("outside", "cat")  # a review outside the random sample: not counted
    predict("user", "1", "dog")
    label("user", "cat", source="user")  # a client's report: never counted
    predict("unlabelled", "1", "cat")  # sampled, nobody reviewed it yet
    predict("batch", "1", "cat", item=0)
    predict("batch", "1", "dog", item=1)
    label("batch", "dog", item=1)  # item 1 of a batched request: right; item 0 unreviewed
    predict("again", "3", "cat", minutes=0)
    predict("again", "3", "dog", minutes=3)  # the same request id twice for one version: counted once
    label("again", "dog")
    predict("m2", "1", "x", model="other")
    label("m2", "x", model="other")
    predict("m2", "1", "x", model="digits")  # the same request id under another model: labels stay per model
    with engine.begin() as connection:
        connection.execute(sa.insert(schema.predictions), preds)
        connection.execute(sa.insert(schema.labels), labs)


def test_reviewed_counts_agree_with_the_monitor_report(engine):
    _plant(engine)
    counts = {(c["model"], c["version"]): (c["reviewed"], c["correct"]) for c in store.reviewed_counts(engine)}
    # v1: s0-s6 (5 right), relabel (right), tie (wrong), none (wrong), batch item 1 (right); v2: s0-s6 (3 right)
    assert counts == {("digits", "1"): (11, 7), ("digits", "2"): (7, 3), ("digits", "3"): (1, 1),
                      ("other", "1"): (1, 1)}
    report = {(r["model"], r["version"]): (r["reviewed"], r["correct"]) for r in version_report(engine)}
    assert {k: v for k, v in report.items() if v[0]} == counts
    assert store.reviewed_counts(engine, model="other") == [{"model": "other", "version": "1", "reviewed": 1,
                                                             "correct": 1}]


def test_live_gauges_show_the_store_figures_and_keep_them_when_it_fails(tmp_path):
    engine = store.connect(f"sqlite:///{tmp_path / 'store.db'}")
    metrics = ServeMetrics()
    live = LiveAccuracy(engine, metrics, every_s=3600)

    def gauges(version):
        return [metrics.registry.get_sample_value(f"vggnet_live_{name}", {"model": "digits", "version": version})
                for name in ("reviewed", "accuracy", "accuracy_low", "accuracy_high")]

    live.note("digits", "9")  # served, never reviewed: n = 0 and no value yet
    reviewed, *values = gauges("9")
    assert reviewed == 0 and all(math.isnan(v) for v in values)
    assert metrics.registry.get_sample_value("vggnet_live_accuracy_refreshed_timestamp_seconds") is None
    _plant(engine)
    metrics.live_started()
    before = time.time()
    assert live.refresh()
    low, high = wilson_interval(7, 11)
    assert gauges("1") == [11, pytest.approx(7 / 11), pytest.approx(low), pytest.approx(high)]
    assert gauges("2")[:2] == [7, pytest.approx(3 / 7)]
    assert gauges("9")[0] == 0  # still known, still unreviewed
    stamp = metrics.registry.get_sample_value("vggnet_live_accuracy_refreshed_timestamp_seconds")
    assert stamp >= before
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE labels"))  # the store fails to answer: gauges keep their values
    assert not live.refresh()
    assert gauges("1")[:2] == [11, pytest.approx(7 / 11)]
    assert metrics.registry.get_sample_value("vggnet_live_accuracy_refreshed_timestamp_seconds") == stamp
    engine.dispose()


# ---- promtool: the rules are valid, and each alert fires when it should and only then ------------------------------

def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    promtool = _need("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts = [r["alert"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]]
    assert f"SUCCESS: {len(alerts)} rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a case where it fires and one where it is silent
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == set(alerts)
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == set(alerts)


# ---- a real Prometheus scraping a real server: every panel's query ---------------------------------------------------

SCRAPE_S = 1
#: Grafana's $__rate_interval: max(4 × the scrape interval, the panel's step + the scrape interval); for a range of
#: minutes the step is the scrape interval
RATE_INTERVAL = f"{max(4 * SCRAPE_S, 2 * SCRAPE_S)}s"
#: panels that must have data after the traffic below (the others may be empty: no 5xx, no refusals, ...)
CORE = ("Latency p95", "Requests per second", "Predicted-class distribution", "Drift score", "Out-of-domain",
        "Confidence", "Live accuracy", "Reviewed predictions")


def dashboard_queries(model: str, rate_interval: str = RATE_INTERVAL) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every panel target, with Grafana's variables substituted."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval).replace("$model", model)
            out.append((panel["title"], target["refId"], expr))
    return out


@contextlib.contextmanager
def prometheus(target: str, folder: Path):
    """scripts/prometheus.sh: a Prometheus scraping ``target`` every second, the rules loaded; yields its URL."""
    _need("prometheus")
    env = {**os.environ, "VGGNET_PROM_DIR": str(folder), "VGGNET_PROM_SCRAPE": f"{SCRAPE_S}s"}
    env.pop("VGGNET_PROM_PORT", None)
    started = subprocess.run([str(PROMETHEUS_SH), "start", target], env=env, capture_output=True, text=True,
                             timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        yield started.stdout.strip()
    finally:
        subprocess.run([str(PROMETHEUS_SH), "stop"], env=env, capture_output=True, timeout=30)


def _api(client: httpx.Client, path: str, **params) -> dict:
    answer = client.get(path, params=params)
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", (path, params, body)
    return body["data"]


def _served_model(tmp_path: Path) -> Path:
    """An untrained three-class checkpoint with a drift reference (from plain colour images) and an out-of-domain
    threshold: enough for every metric the dashboard reads."""
    ckpt = tiny_checkpoint(tmp_path / "model" / "best.safetensors")
    predictor = Predictor.from_checkpoint(ckpt)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(np.full((32, 32, 3), rng.integers(0, 256, 3), dtype=np.uint8)) for _ in range(64)]
    values = reference.signals(predictor.logits, predictor.prep, images)
    reference.write_reference(ckpt, reference.build_reference(values, predictor.prep.classes, "test colours"))
    confidence = float(np.median(values["confidence"]))
    (ckpt.parent / "ood.json").write_text(json.dumps({"signal": "max_softmax", "threshold": confidence}))
    return ckpt


def _traffic(client: httpx.Client, n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    answers = []
    for i in range(n):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        data = jpeg_bytes(colour=colour, patch=None) if i % 2 else jpeg_bytes(colour=colour)
        r = client.post("/predict", content=data, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return answers


def test_every_dashboard_query_and_rule_runs_on_a_real_prometheus_scraping_a_real_server(tmp_path):
    _need("prometheus")
    ckpt = _served_model(tmp_path)
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    settings = ServeSettings(load_in_background=False, access_log=False, prediction_log=False, store=url,
                             review_sample=1.0, api_keys=(KEY,), drift_min_window=10, drift_every=5,
                             live_accuracy_every_s=1.0)
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["shapes"]), settings)
    auth = {"Authorization": f"Bearer {KEY}"}
    with live_server(app) as (base, _), httpx.Client(base_url=base, headers=auth, timeout=30) as client, \
            prometheus(base.removeprefix("http://"), tmp_path / "prom") as prom_url, \
            httpx.Client(base_url=prom_url, timeout=30) as prom:
        start = time.time()
        answers = _traffic(client, 30)
        stored_rows(url, answers[-1]["id"])
        right = 0
        for i, a in enumerate(answers[:20]):  # the first 13 labelled as predicted, the other 7 as another class
            predicted = a["predictions"][0]["label"]
            label = predicted if i < 13 else next(c for c in ("a", "b", "c") if c != predicted)
            right += label == predicted
            r = client.post("/v2/review/label", json={"id": a["id"], "model": "shapes", "label": label})
            assert r.status_code == 201, r.text
        _traffic(client, 20)  # keeps the rates up while the reviews are read and scraped
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            live = _api(prom, "/api/v1/query", query="vggnet_live_reviewed")["result"]
            if live and float(live[0]["value"][1]) == 20:
                break
            time.sleep(0.5)
        _traffic(client, 10)
        time.sleep(3 * SCRAPE_S)
        end = time.time()

        # the dashboard's variable: Grafana's label_values(vggnet_predictions_total, model) is this API call
        assert "shapes" in _api(prom, "/api/v1/label/model/values", **{"match[]": "vggnet_predictions_total"})
        empty = []
        for model in ("shapes", ".*"):  # one model chosen, and "All" (the variable's allValue)
            for title, ref, expr in dashboard_queries(model):
                data = _api(prom, "/api/v1/query_range", query=expr, start=start, end=end, step=SCRAPE_S)
                finite = [float(v) for s in data["result"] for _, v in s["values"] if math.isfinite(float(v))]
                if not finite:
                    empty.append((title, ref))
                    assert not title.startswith(CORE), f"{title} {ref}: no data for {expr}"
        assert {t for t, _ in empty} <= {"Errors (5xx share) and refusals"}, empty  # no 5xx were sent

        # the live accuracy Prometheus holds is the reviews' own figure
        low, high = wilson_interval(right, 20)
        for name, want in (("vggnet_live_accuracy", right / 20), ("vggnet_live_accuracy_low", low),
                           ("vggnet_live_accuracy_high", high)):
            [series] = _api(prom, "/api/v1/query", query=f'max by (model, version) ({name}{{model="shapes"}})')[
                "result"]
            assert float(series["value"][1]) == pytest.approx(want, abs=1e-9), name

        # every rule: evaluated by Prometheus without an error, and its expression runs through the query API
        groups = _api(prom, "/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        alerts = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
        assert {r["name"] for r in rules} == {a["alert"] for a in alerts}
        assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), [
            (r["name"], r["health"], r.get("lastError")) for r in rules]
        for alert in alerts:
            _api(prom, "/api/v1/query", query=alert["expr"])
