"""Alembic's environment for the prediction store, run by vggnet.store.connect() (no alembic.ini anywhere).

connect() hands over an open connection in ``config.attributes["connection"]``; without one (a developer's
``alembic`` call, or offline ``--sql`` mode) the URL comes from the ``sqlalchemy.url`` option. To add a revision
after changing schema.py, point a Config at this folder and autogenerate against a database at head, e.g.::

    from alembic import command; from alembic.config import Config
    c = Config(); c.set_main_option("script_location", "src/vggnet/store/migrations")
    c.set_main_option("sqlalchemy.url", "sqlite:////tmp/head.db")  # after vggnet.store.connect() on that URL
    command.revision(c, "what changed", autogenerate=True, rev_id="0002")

tests/test_store.py fails while schema.py and the revisions disagree.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from vggnet.store.engine import VERSION_TABLE
from vggnet.store.schema import metadata


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Compare only the store's own tables: a shared database's other tables are not ours to drop."""
    if type_ == "table" and reflected and compare_to is None:
        return False
    return True


def _configure(**kwargs) -> None:
    context.configure(target_metadata=metadata, version_table=VERSION_TABLE, include_object=include_object,
                      compare_type=True, **kwargs)


def run() -> None:
    config = context.config
    if context.is_offline_mode():
        _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as own:
        _configure(connection=own, render_as_batch=own.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
