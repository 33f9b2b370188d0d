"""The prediction store (vggnet.store) on SQLite and on a real PostgreSQL, never a mock.

PostgreSQL comes from VGGNET_TEST_POSTGRES (``make postgres`` starts a throwaway cluster and prints the export
line); each test gets a database of its own, dropped after it. Unset, the PostgreSQL cases skip with the reason,
unless VGGNET_REQUIRE_POSTGRES=1 (.ci/run sets it), which turns the skip into a failure.

    .venv/bin/pytest tests/test_store.py        # about 10 s
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")

from alembic import command  # noqa: E402
from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402

from vggnet import store  # noqa: E402
from vggnet.errors import UsageError, VggnetError  # noqa: E402
from vggnet.store import schema  # noqa: E402
from vggnet.store.engine import MIGRATIONS, SQLITE_BUSY_MS, VERSION_TABLE  # noqa: E402

PG_URL = os.environ.get("VGGNET_TEST_POSTGRES")
REQUIRED = os.environ.get("VGGNET_REQUIRE_POSTGRES") == "1"
SECRET = "s3cret-pw"


def _pg_unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"VGGNET_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _require_pg() -> str:
    if not PG_URL:
        _pg_unavailable("VGGNET_TEST_POSTGRES is not set (`make postgres` starts a server and prints the line)")
    if importlib.util.find_spec("psycopg") is None:
        _pg_unavailable("psycopg is not installed (pip install 'vggnet[store]')")
    return PG_URL


@contextmanager
def _fresh_pg_database():
    """A uniquely named database on the test server, dropped afterwards: no test sees another's rows."""
    admin = sa.create_engine(_require_pg(), isolation_level="AUTOCOMMIT")
    name = f"vggnet_t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        admin.dispose()
        _pg_unavailable(f"the server at VGGNET_TEST_POSTGRES does not answer: {store.engine.first_line(e)}")
    try:
        yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/not/yet/there/store.db"
        return
    with _fresh_pg_database() as pg_url:
        yield pg_url


@pytest.fixture
def engine(url):
    engine = store.connect(url)
    yield engine
    engine.dispose()


def row(i: int = 0, **values) -> dict:
    base = {"request_id": f"r{i}", "model": "m", "version": "1", "route": "/predict", "predicted": "cat",
            "confidence": 0.9, "topk": [["cat", 0.9], ["dog", 0.1]]}
    return {**base, **values}


def count(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(schema.predictions)).scalar_one()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("vggnet.store") and r.levelno == logging.WARNING]


# --- connect and the migrations -----------------------------------------------------------------------------------

def test_connect_creates_the_schema_and_a_second_connect_changes_nothing(url, caplog):
    caplog.set_level(logging.INFO, logger="alembic")
    engine = store.connect(url)
    assert {"predictions", "labels", VERSION_TABLE} <= set(sa.inspect(engine).get_table_names())
    with engine.connect() as connection:
        assert MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision() \
            == store.head_revision() == "0002"
    assert any("Running upgrade  -> 0001" in r.getMessage() for r in caplog.records)
    writer = store.PredictionWriter(engine, flush_s=0.01)
    writer.put(row(1))
    writer.close()
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_MS
    engine.dispose()

    caplog.clear()
    again = store.connect(url)
    assert not any("Running upgrade" in r.getMessage() for r in caplog.records)
    assert [r["request_id"] for r in store.read_predictions(again)] == ["r1"]
    again.dispose()


def _diff(engine, metadata) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE, "compare_type": True})
        return compare_metadata(context, metadata)


def test_the_migrations_build_exactly_schema_py(engine):
    assert _diff(engine, schema.metadata) == []
    # and the comparison would see a drift: schema.py with one more column and one index fewer
    drifted = sa.MetaData()
    for table in schema.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["labels"].append_column(sa.Column("comment", sa.String(200)))
    predictions = drifted.tables["predictions"]
    predictions.indexes.discard(next(i for i in predictions.indexes if i.name == "ix_predictions_time"))
    kinds = sorted(change[0] for change in _diff(engine, drifted))
    assert kinds == ["add_column", "remove_index"]


def test_the_migrations_downgrade_to_nothing_and_up_again(engine):
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(sa.inspect(engine).get_table_names()) == {VERSION_TABLE}
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    assert _diff(engine, schema.metadata) == []


def test_a_database_from_a_newer_vggnet_is_refused_in_one_line(engine, url):
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '0099'"))
    with pytest.raises(store.StoreError, match="newer vggnet") as raised:
        store.connect(url)
    assert "\n" not in str(raised.value)


def test_replicas_connecting_at_once_all_get_the_schema(url):
    """Four server processes and two threads of this one start on a new database at the same moment."""
    start = time.time() + 2.0  # all import first, then connect together
    code = ("import sys, time; from vggnet.store import connect; time.sleep(max(0, float(sys.argv[2]) - time.time()));"
            " connect(sys.argv[1]).dispose()")
    processes = [subprocess.Popen([sys.executable, "-c", code, url, str(start)], stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    engines, errors = [], []

    def go():
        try:
            time.sleep(max(0.0, start - time.time()))
            engines.append(store.connect(url))
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    failed = [p.stderr.read() for p in processes if p.wait(60) != 0]
    assert errors == [] and failed == [] and len(engines) == 2
    assert _diff(engines[0], schema.metadata) == []
    for e in engines:
        e.dispose()


@pytest.mark.parametrize("bad", [
    "not a database url",
    f"nosuchdb://ana:{SECRET}@db.example/x",
    f"postgresql+pg8000://ana:{SECRET}@db.example/x",  # a driver that is not installed
    f"postgresql+psycopg://ana:{SECRET}@127.0.0.1:{{port}}/x",  # nothing listens there
    "sqlite:///{tmp}/a-file/store.db",  # its folder cannot be made: a file is in the way
])
def test_a_bad_url_or_unreachable_server_is_one_store_error_line_without_the_password(bad, tmp_path):
    if "psycopg" in bad and importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg is not installed")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(store.StoreError) as raised:
        store.connect(bad.format(port=closed_port(), tmp=tmp_path))
    message = str(raised.value)
    assert isinstance(raised.value, VggnetError) and "\n" not in message and SECRET not in message
    if SECRET in bad:
        assert "***" in message


def test_a_real_server_refusing_the_login_is_one_store_error_line_without_the_password():
    wrong = sa.make_url(_require_pg()).set(password=SECRET, database="vggnet_no_such_database")
    with pytest.raises(store.StoreError) as raised:
        store.connect(wrong.render_as_string(hide_password=False))
    message = str(raised.value)
    assert "\n" not in message and SECRET not in message and "***" in message


def test_sqlite_in_memory_is_one_database_for_the_writer_thread_too():
    engine = store.connect("sqlite://")
    with store.PredictionWriter(engine, flush_s=0.01) as writer:
        assert all(writer.put(row(i)) for i in range(3))
    assert count(engine) == 3


# --- the writer -----------------------------------------------------------------------------------------------------

def test_rows_arrive_in_batches_with_every_value(engine):
    inserts = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda *args: inserts.append(1) if args[2].lstrip().upper().startswith("INSERT") else None)
    writer = store.PredictionWriter(engine, batch_size=256, flush_s=0.05)
    # only odd rows carry latency_ms: executemany takes its columns from the first row, the writer must not
    assert all(writer.put(row(i, item=i % 3, **({"latency_ms": float(i)} if i % 2 else {}))) for i in range(1000))
    writer.close()
    assert writer.stats() == {"written": 1000, "dropped_full": 0, "dropped_error": 0, "dropped_closed": 0,
                              "queued": 0}
    assert count(engine) == 1000
    assert len(inserts) <= 20  # batches, not one statement per row
    rows = {(r["request_id"], r["item"]): r for r in store.read_predictions(engine)}
    r7 = rows[("r7", 1)]
    assert r7["latency_ms"] == 7.0 and rows[("r8", 2)]["latency_ms"] is None
    assert r7["topk"] == [["cat", 0.9], ["dog", 0.1]] and r7["role"] == "served" and r7["sampled"] is False
    assert r7["created_at"].tzinfo is not None and abs(datetime.now(UTC) - r7["created_at"]) < timedelta(minutes=1)
    assert not writer.put(row(1000))  # after close: dropped and counted, not raised
    assert writer.stats()["dropped_closed"] == 1


def test_a_full_queue_drops_and_counts_instead_of_blocking(engine, monkeypatch, caplog):
    entered, release = threading.Event(), threading.Event()
    insert = store.PredictionWriter._insert

    def held(self, rows):  # the database is slow: the writer thread sits in its insert
        entered.set()
        release.wait(10)
        insert(self, rows)

    monkeypatch.setattr(store.PredictionWriter, "_insert", held)
    writer = store.PredictionWriter(engine, max_queue=4, batch_size=1, flush_s=0.01)
    assert writer.put(row(0)) and entered.wait(5)
    accepted = []
    putter = threading.Thread(target=lambda: accepted.extend(writer.put(row(i)) for i in range(1, 11)))
    putter.start()
    putter.join(2.0)  # ten put() calls take microseconds unless one waits for room
    blocked, stats = putter.is_alive(), writer.stats()
    full = [r for r in store_warnings(caplog) if "full" in r.getMessage()]
    release.set()  # either way, let the writer go on so that nothing hangs
    putter.join(30)
    writer.close()
    assert not blocked, "put() blocked on a full queue"
    assert accepted == [True] * 4 + [False] * 6
    assert stats["dropped_full"] == 6 and stats["queued"] == 5
    assert len(full) == 1  # once a minute at most, not once a row
    assert writer.stats()["written"] == 5 and count(engine) == 5


def test_a_database_that_goes_away_drops_batches_counts_them_and_recovers(engine, caplog):
    writer = store.PredictionWriter(engine, batch_size=10, flush_s=0.02)
    schema.predictions.drop(engine)
    assert all(writer.put(row(i)) for i in range(25))  # returns at once, raises nothing
    wait_for(lambda: writer.stats()["queued"] == 0)
    assert writer.stats()["dropped_error"] == 25 and writer.stats()["written"] == 0
    dropped = [r for r in store_warnings(caplog) if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].exc_info is None and "\n" not in dropped[0].getMessage()

    schema.predictions.create(engine)  # the database is back: later batches go in
    assert all(writer.put(row(i)) for i in range(5))
    writer.close()
    assert writer.stats()["written"] == 5 and count(engine) == 5
    assert any("writing again" in r.getMessage() for r in store_warnings(caplog))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_unreachable_database_drops_every_row_and_put_never_raises(backend, tmp_path, caplog):
    if backend == "postgresql" and importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg is not installed")
    url = (f"sqlite:///{tmp_path}/no/such/folder/store.db" if backend == "sqlite"
           else f"postgresql+psycopg://ana:{SECRET}@127.0.0.1:{closed_port()}/x")
    engine = sa.create_engine(url)
    writer = store.PredictionWriter(engine, batch_size=8, flush_s=0.01)
    assert all(writer.put(row(i)) for i in range(20))
    writer.close()
    assert writer.stats()["dropped_error"] == 20 and writer.stats()["written"] == 0
    assert not any(SECRET in r.getMessage() for r in caplog.records)


def test_a_bad_row_drops_only_itself_and_an_unknown_key_is_said(engine, caplog):
    writer = store.PredictionWriter(engine, flush_s=0.05)
    for i in range(10):
        writer.put(row(i, predicted=None if i == 5 else "cat"))  # NOT NULL: refused by the database
    assert not writer.put("not a row")  # refused by put itself
    assert writer.put(row(10, latncy_ms=3.0))  # a typo: the row is kept, the key is said
    writer.close()
    assert writer.stats()["written"] == 10 and writer.stats()["dropped_error"] == 2
    assert sorted(r["request_id"] for r in store.read_predictions(engine)) == sorted(
        f"r{i}" for i in range(11) if i != 5)
    assert any("latncy_ms" in r.getMessage() for r in store_warnings(caplog))


# --- labels, purge, reads -------------------------------------------------------------------------------------------

def test_add_label_needs_a_stored_prediction(engine):
    with store.PredictionWriter(engine, flush_s=0.01) as writer:
        writer.put(row(1, item=2))
    with pytest.raises(store.UnknownPrediction):
        store.add_label(engine, request_id="nope", model="m", label="cat", source="review", who="ana")
    for other in ({"item": 0}, {"model": "other"}):  # the same request, another image or model
        with pytest.raises(store.UnknownPrediction):
            store.add_label(engine, **{"request_id": "r1", "item": 2, "model": "m", **other}, label="cat",
                            source="user", who="anonymous")
    with pytest.raises(UsageError):
        store.add_label(engine, request_id="r1", item=2, model="m", label="cat", source="oracle", who="ana")
    with pytest.raises(UsageError):
        store.add_label(engine, request_id="r1", item=2, model="m", label="x" * 500, source="review", who="ana")
    store.add_label(engine, request_id="r1", item=2, model="m", label=None, source="review", who="ana")
    [label] = store.read_labels(engine)
    assert (label["request_id"], label["item"], label["label"], label["source"]) == ("r1", 2, None, "review")
    assert label["created_at"].tzinfo is not None
    assert store.read_labels(engine, model="other") == []


def test_purge_deletes_old_predictions_and_their_labels_only(engine):
    old = datetime.now(UTC) - timedelta(days=10)
    with store.PredictionWriter(engine, flush_s=0.01) as writer:
        for i in range(3):
            writer.put(row(i, created_at=old))
        for i in range(3, 5):
            writer.put(row(i))
    store.add_label(engine, request_id="r0", model="m", label="dog", source="review", who="ana")
    store.add_label(engine, request_id="r3", model="m", label="cat", source="user", who="anonymous")

    assert store.purge(engine, 30) == 0
    assert store.purge(engine, 7) == 3
    assert [r["request_id"] for r in store.read_predictions(engine)] == ["r3", "r4"]
    assert [r["request_id"] for r in store.read_labels(engine)] == ["r3"]
    assert store.purge(engine, 7) == 0
    with pytest.raises(UsageError):
        store.purge(engine, -1)


def test_read_predictions_by_model_and_time(engine):
    now = datetime.now(UTC)
    with store.PredictionWriter(engine, flush_s=0.01) as writer:
        writer.put(row(0, model="a", created_at=now - timedelta(hours=2)))
        writer.put(row(1, model="a", created_at=now.replace(tzinfo=None)))  # naive: taken as UTC
        writer.put(row(2, model="b", created_at=now - timedelta(minutes=1), role="shadow"))
    assert [r["request_id"] for r in store.read_predictions(engine)] == ["r0", "r2", "r1"]
    assert [r["request_id"] for r in store.read_predictions(engine, model="a")] == ["r0", "r1"]
    assert [r["request_id"] for r in store.read_predictions(engine, since=now - timedelta(hours=1))] == ["r2", "r1"]
    assert store.read_predictions(engine, model="b")[0]["role"] == "shadow"
