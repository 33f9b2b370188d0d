"""Open the prediction store: one URL in, an Engine out whose schema is at the newest Alembic revision.

Why Alembic, run from here: the server upgrades the database it is pointed at when it starts, so nobody runs a
migration tool or keeps an alembic.ini; a later vggnet adds a revision under migrations/versions and the same call
upgrades old databases in place. Every failure a user can cause is one StoreError line naming the URL without its
password.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from .errors import StoreError

__all__ = ["MIGRATIONS", "VERSION_TABLE", "connect", "head_revision", "safe_url"]

MIGRATIONS = Path(__file__).with_name("migrations")
#: not Alembic's default alembic_version: MLflow's tracking store (Alembic too) may share the database
VERSION_TABLE = "vggnet_alembic_version"
SQLITE_BUSY_MS = 10_000  # a second process (the monitor, a purge) may hold the write lock for a moment
PG_CONNECT_TIMEOUT_S = 10  # libpq waits for ever by default on a host that drops packets
_PG_MIGRATION_LOCK = 7_660_001  # pg_advisory_xact_lock key: replicas starting together migrate one at a time
_UPGRADE_LOCK = threading.Lock()  # Alembic's context and op are module globals: one migration per process at a time
_EXAMPLES = "e.g. sqlite:///runs/serve.db or postgresql+psycopg://user:password@host:5432/db"


def safe_url(url: str | URL) -> str:
    """The URL as logs and errors show it: the password replaced by ***, even when the URL does not parse."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: hide whatever sits between user: and @
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def connect(url: str, create: bool = True) -> Engine:
    """An Engine for ``url`` with the store's tables created or upgraded to the newest revision (idempotent).

    ``create=False`` is for readers (``vggnet monitor``): a SQLite file that does not exist is an error naming it,
    not a new empty database that reports "no predictions" for a mistyped path."""
    shown = safe_url(url)
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise StoreError(f"store URL {shown!r} is not a database URL ({_EXAMPLES})") from None
    if not create and parsed.get_backend_name() == "sqlite" and not _sqlite_memory(parsed) \
            and not parsed.database.startswith("file:") and not Path(parsed.database).expanduser().is_file():
        raise StoreError(f"store {shown}: no such database file {parsed.database} (a server started with "
                         "--store writes it)")
    engine = _create_engine(parsed, shown)
    try:
        _upgrade(engine, shown)
    except exc.DBAPIError as e:
        engine.dispose()
        message = first_line(e)
        if parsed.password:  # drivers do not echo it; should one ever do, it is not shown either
            message = message.replace(str(parsed.password), "***")
        raise StoreError(f"store {shown}: {message}") from e
    except BaseException:
        engine.dispose()
        raise
    return engine


def head_revision() -> str:
    """The newest revision this vggnet ships (what connect() upgrades to)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def first_line(error: BaseException) -> str:
    """The driver's own message, first line only: SQLAlchemy appends the SQL and a link, not for a one-line error."""
    orig = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def _create_engine(url: URL, shown: str) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a server restarted under a running writer: reconnect
    backend = url.get_backend_name()
    if backend == "sqlite":
        kwargs = _sqlite_options(url, shown)
    elif url.drivername in ("postgresql+psycopg", "postgresql+psycopg2", "postgresql") \
            and "connect_timeout" not in url.query:
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    try:
        engine = sa.create_engine(url, **kwargs)
    except exc.NoSuchModuleError:
        raise StoreError(f"store {shown}: SQLAlchemy knows no database {url.drivername!r} ({_EXAMPLES})") from None
    except ImportError as e:
        hint = "pip install 'vggnet[store]'" if backend == "postgresql" else f"install the {url.drivername} driver"
        raise StoreError(f"store {shown}: the driver is not installed ({e}; {hint})") from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas(memory=_sqlite_memory(url)))
    elif engine.dialect.driver == "psycopg":
        # a batch as one multi-row INSERT (as SQLAlchemy does for psycopg2), not psycopg 3's pipelined executemany,
        # which logs a warning of its own on every failed batch: one round trip, and no log storm when the table goes
        engine.dialect.use_insertmanyvalues_wo_returning = True
    return engine


def _sqlite_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _sqlite_options(url: URL, shown: str) -> dict[str, Any]:
    if _sqlite_memory(url):  # one shared connection, or the writer's thread would see another, empty database
        return {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    if not url.database.startswith("file:"):
        folder = Path(url.database).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"store {shown}: cannot create the folder {folder}: {e.strerror}") from None
    return {"connect_args": {"check_same_thread": False}}  # the writer's thread uses pooled connections


def _sqlite_pragmas(memory: bool):
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
        if not memory:  # readers (the monitor) never block the writer, nor it them
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    return on_connect


def _upgrade(engine: Engine, shown: str) -> None:
    try:
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError
    except ImportError as e:
        raise StoreError(f"store {shown}: Alembic is not installed ({e}; pip install 'vggnet[store]')") from None
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    attempts = 3 if engine.dialect.name == "sqlite" else 1
    for attempt in range(attempts):
        try:
            with _UPGRADE_LOCK, engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
            return
        except CommandError as e:
            raise StoreError(f"store {shown}: its schema is not one this vggnet knows ({e}); "
                             "was it written by a newer vggnet?") from None
        except exc.OperationalError:
            # SQLite has no lock to take: two processes creating the schema at once, the loser sees "already
            # exists"; a moment later the winner's schema is there and the upgrade is a no-op
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
