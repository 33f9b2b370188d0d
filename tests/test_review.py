"""Human review (issue #30): the store's review queue on planted rows (SQLite and a real PostgreSQL), and the
key-only routes GET /v2/review/queue and POST /v2/review/label on the real app over a real SQLite store.
The page in a real browser: tests/test_review_page.py.

    .venv/bin/pytest tests/test_review.py        # about 10 s
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from serve_helpers import tiny_checkpoint

sa = pytest.importorskip("sqlalchemy")
store = pytest.importorskip("vggnet.store")

from test_store import _fresh_pg_database  # noqa: E402
from vggnet.errors import UsageError  # noqa: E402
from vggnet.serve import ModelRepository, ServeSettings, create_app  # noqa: E402
from vggnet.store.schema import predictions  # noqa: E402

KEY = "review-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
WHO = "key-" + hashlib.sha256(KEY.encode()).hexdigest()[:8]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def row(request_id: str, minute: int, item: int = 0, model: str = "m", version: str = "1", predicted: str = "a",
        confidence: float = 0.9, **values) -> dict:
    top = [[predicted, confidence], ["c" if predicted != "c" else "b", round(1 - confidence, 6)]]
    base = {"request_id": request_id, "item": item, "created_at": T0 + timedelta(minutes=minute), "model": model,
            "version": version, "role": "served", "route": "/predict", "predicted": predicted,
            "confidence": confidence, "topk": top, "sampled": False}
    return {**base, **values}


#: one of each case; inserted out of time order, so "oldest first" is the time and not the insertion order
PLANTED = [
    row("late-sample", 6, sampled=True),
    row("plain", 0),                                                     # confident, alone: not queued
    row("low", 1, confidence=0.3),
    row("sample-low", 2, sampled=True, confidence=0.4),
    row("split", 3, predicted="a"), row("split", 3, version="2", role="shadow", predicted="b"),
    row("agree", 4), row("agree", 4, version="2", role="shadow"),         # two versions, one answer: not queued
    row("reported", 5),
    row("done", 0, sampled=True),                                        # reviewed already: not queued
    row("other", 7, model="m2", sampled=True),
    row("batch", 8, item=0), row("batch", 8, item=1, confidence=0.2),    # one entry per image of a batch
]
ORDER = [("sample-low", 0, ["random", "low_confidence"]), ("late-sample", 0, ["random"]), ("other", 0, ["random"]),
         ("low", 0, ["low_confidence"]), ("batch", 1, ["low_confidence"]), ("reported", 0, ["user_report"]),
         ("split", 0, ["disagreement"])]


def plant(engine) -> None:
    with engine.begin() as connection:
        connection.execute(predictions.insert(), PLANTED)
    store.add_label(engine, request_id="reported", model="m", label="b", source="user", who="client")
    store.add_label(engine, request_id="done", model="m", label="a", source="review", who="ana")


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = store.connect(f"sqlite:///{tmp_path}/store.db")
        yield engine
        engine.dispose()
        return
    with _fresh_pg_database() as url:
        engine = store.connect(url)
        yield engine
        engine.dispose()


def shown(queue: list[dict]) -> list[tuple]:
    return [(e["request_id"], e["item"], e["reasons"]) for e in queue]


# --- the store's queue ------------------------------------------------------------------------------------------

def test_the_queue_puts_the_random_sample_first_then_each_reason_oldest_first(engine):
    plant(engine)
    queue = store.review_queue(engine, limit=50)
    assert shown(queue) == ORDER
    assert store.review_queue(engine, limit=50) == queue  # one store state, one queue
    assert store.review_queue_size(engine) == len(ORDER)
    assert shown(store.review_queue(engine, limit=2)) == ORDER[:2]
    assert [e["request_id"] for e in store.review_queue(engine, model="m2")] == ["other"]
    assert store.review_queue_size(engine, model="m") == len(ORDER) - 1
    split = next(e for e in queue if e["request_id"] == "split")
    assert [(p["version"], p["role"], p["predicted"]) for p in split["predictions"]] == [
        ("1", "served", "a"), ("2", "shadow", "b")]  # every version's answer to that input, served first
    assert split["created_at"] == T0 + timedelta(minutes=3) and split["model"] == "m"
    assert split["predictions"][1]["topk"] == [["b", 0.9], ["c", 0.1]]
    # a stricter threshold queues the confident ones too; a review label takes an entry out, a user label does not
    assert store.review_queue_size(engine, low_confidence=0.95) == len(ORDER) + 3  # plain, agree, batch 0
    store.add_label(engine, request_id="low", model="m", label="a", source="review", who="ana")
    store.add_label(engine, request_id="split", model="m", label="b", source="user", who="client")
    after = shown(store.review_queue(engine, limit=50))
    assert ("low", 0, ["low_confidence"]) not in after
    assert after[-2:] == [("split", 0, ["user_report", "disagreement"]), ("reported", 0, ["user_report"])]


def test_the_queue_refuses_a_bad_limit_or_threshold(engine):
    for limit in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="limit"):
            store.review_queue(engine, limit=limit)
    with pytest.raises(UsageError, match="low-confidence"):
        store.review_queue_size(engine, low_confidence=1.5)


# --- the routes ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("run") / "best.safetensors", seed=3)  # classes a, b, c


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    engine = store.connect(url)
    plant(engine)
    engine.dispose()
    return url


def app_for(ckpt, **settings):
    return create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                      ServeSettings(load_in_background=False, access_log=False, **settings))


def labels_of(url: str) -> list[dict]:
    engine = store.connect(url)
    try:
        return store.read_labels(engine)
    finally:
        engine.dispose()


def test_a_reviewer_reads_the_queue_and_labels_with_the_key(ckpt, url):
    with TestClient(app_for(ckpt, store=url, api_keys=(KEY,))) as c:
        r = c.get("/v2/review/queue?limit=3", headers=AUTH)
        assert r.status_code == 200
        body = r.json()
        assert [(e["id"], e["item"], e["reasons"]) for e in body["items"]] == ORDER[:3]
        assert body["queued"] == len(ORDER) and body["classes"] == {"m": ["a", "b", "c"], "m2": ["a", "c"]}
        assert body["items"][0]["created_at"] == (T0 + timedelta(minutes=2)).isoformat()
        assert c.get("/v2/review/queue?model=m2", headers=AUTH).json()["queued"] == 1

        r = c.post("/v2/review/label", headers=AUTH, json={"id": "sample-low", "model": "m", "label": "b",
                                                            "reviewer": "Ana"})
        assert r.status_code == 201 and r.json()["who"] == f"Ana ({WHO})"
        r = c.post("/v2/review/label", headers=AUTH, json={"id": "batch", "item": 1, "model": "m", "label": None})
        assert r.status_code == 201 and r.json()["who"] == WHO
        r = c.post("/v2/review/label", headers=AUTH, json={"id": "late-sample", "model": "m", "skip": True})
        assert r.status_code == 200 and r.json() == {"id": "late-sample", "item": 0, "model": "m", "skipped": True,
                                                     "stored": False}
        after = c.get("/v2/review/queue?limit=50", headers=AUTH).json()
    assert [(e["id"], e["item"]) for e in after["items"]] == [
        (i, item) for i, item, _ in ORDER if (i, item) not in {("sample-low", 0), ("batch", 1)}]  # skip: still queued
    assert after["queued"] == len(ORDER) - 2
    reviews = [(lab["request_id"], lab["item"], lab["label"], lab["who"]) for lab in labels_of(url)
               if lab["source"] == "review"]
    assert reviews == [("done", 0, "a", "ana"), ("sample-low", 0, "b", f"Ana ({WHO})"), ("batch", 1, None, WHO)]


def test_a_bad_review_label_is_a_400_and_an_unknown_prediction_a_404(ckpt, url):
    with TestClient(app_for(ckpt, store=url, api_keys=(KEY,))) as c:
        def post(**doc):
            return c.post("/v2/review/label", headers=AUTH, json=doc)

        r = post(id="low", model="m", label="zebra")
        assert r.status_code == 400 and "not a class of model 'm': a, b, c" in r.json()["error"]
        assert post(id="low", model="m", label=3).status_code == 400
        assert post(id="low", label="a").status_code == 400  # no model
        assert post(id="low", model="m", label="a", item=-1).status_code == 400
        assert post(id="low", model="m", label="a", skip="yes").status_code == 400
        assert post(id="low", model="m", label="a", reviewer="x" * 65).status_code == 400
        assert c.post("/v2/review/label", headers=AUTH, content=b"{not json").status_code == 400
        assert c.get("/v2/review/queue?limit=0", headers=AUTH).status_code == 400
        r = post(id="nobody", model="m", label="a")
        assert r.status_code == 404 and "no stored prediction" in r.json()["error"]
    assert [lab["request_id"] for lab in labels_of(url) if lab["source"] == "review"] == ["done"]


def test_review_needs_the_key_and_the_page_does_not(ckpt, url):
    app = app_for(ckpt, store=url, api_keys=(KEY,), public_endpoints=("health", "metrics", "metadata"))
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}):
            assert c.get("/v2/review/queue", headers=headers).status_code == 401
            assert c.post("/v2/review/label", headers=headers,
                          json={"id": "low", "model": "m", "label": "a"}).status_code == 401
        page = c.get("/review")  # static, public like GET /: the key goes with every call the page makes
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert 'src="static/review.js"' in page.text
        for name in ("review.js", "review.css"):
            assert c.get(f"/static/{name}").status_code == 200
    assert [lab["request_id"] for lab in labels_of(url) if lab["source"] == "review"] == ["done"]


def test_a_server_without_keys_refuses_review(ckpt, url):
    with TestClient(app_for(ckpt, store=url)) as c:
        for r in (c.get("/v2/review/queue"), c.get("/v2/review/queue?limit=0", headers=AUTH),
                  c.post("/v2/review/label", json={"id": "low", "model": "m", "label": "a"})):
            assert r.status_code == 403 and "--api-key-file" in r.json()["error"]
        assert c.get("/review").status_code == 200  # the page loads, and says the same when it asks for the queue
    assert [lab["request_id"] for lab in labels_of(url) if lab["source"] == "review"] == ["done"]


def test_review_without_a_store_is_a_501(ckpt):
    with TestClient(app_for(ckpt, api_keys=(KEY,))) as c:
        r = c.get("/v2/review/queue", headers=AUTH)
        assert r.status_code == 501 and "--store" in r.json()["error"]


def test_a_kept_input_is_served_to_the_reviewer_only(ckpt, tmp_path):
    from serve_helpers import jpeg_bytes

    url, kept = f"sqlite:///{tmp_path / 'kept.db'}", tmp_path / "kept"
    auth = {"Authorization": f"Bearer {KEY}"}
    app = app_for(ckpt, store=url, api_keys=(KEY,), review_sample=1.0, keep_inputs=str(kept))
    with TestClient(app) as c:
        sent = c.post("/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg", **auth})
        assert sent.status_code == 200
    with TestClient(app_for(ckpt, store=url, api_keys=(KEY,), keep_inputs=str(kept))) as c:
        [entry] = c.get("/v2/review/queue", headers=auth).json()["items"]
        path = entry["predictions"][0]["input_path"]
        assert path == f"{path[:2]}/{path[3:]}" and path.endswith(".png")
        image = c.get(f"/v2/review/input/{path}", headers=auth)
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.content == (kept / path).read_bytes()
        assert c.get(f"/v2/review/input/{path}").status_code == 401  # the users' images: never without the key
        for bad in ("ab/..%2F..%2Fkept.db", f"{path[:2]}/{'0' * 64}.png", "zz/notahash.png"):
            assert c.get(f"/v2/review/input/{bad}", headers=auth).status_code == 404, bad
    with TestClient(app_for(ckpt, store=url, api_keys=(KEY,))) as c:  # no --keep-inputs: a one-line 404
        answer = c.get(f"/v2/review/input/{path}", headers=auth)
        assert answer.status_code == 404 and "--keep-inputs" in answer.json()["error"]
