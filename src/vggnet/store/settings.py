"""What a server records about itself for later readers: one key/value row per setting, the last writer wins.

Why in the store: the server and ``vggnet retrain`` already share it, so the retrainer finds the folder the crops
were kept in (``--keep-inputs``) without a flag that could drift from the server's. Writing never stops a server:
a database error is one warning, and the reader then asks for the value instead.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Engine

from .engine import first_line, safe_url
from .schema import server_settings
from .writer import utc

__all__ = ["KEEP_INPUTS", "read_setting", "record_setting"]

log = logging.getLogger(__name__)

#: the absolute folder of the server's --keep-inputs crops (rows' input_path is relative to it)
KEEP_INPUTS = "keep_inputs"


def record_setting(engine: Engine, key: str, value: str) -> bool:
    """Set ``key`` to ``value`` (insert or update); False, with a warning, when the database refuses."""
    row = {"value": str(value), "updated_at": utc()}
    for attempt in range(2):  # two replicas inserting the same new key at once: the loser updates
        try:
            with engine.begin() as connection:
                updated = connection.execute(server_settings.update().where(server_settings.c.key == key)
                                             .values(**row)).rowcount
                if not updated:
                    connection.execute(server_settings.insert().values(key=key, **row))
            return True
        except exc.IntegrityError:
            if attempt:
                break
        except exc.SQLAlchemyError as e:
            log.warning("prediction store %s: setting %s not recorded: %s", safe_url(engine.url), key, first_line(e))
            return False
    log.warning("prediction store %s: setting %s not recorded (written at the same time by another server)",
                safe_url(engine.url), key)
    return False


def read_setting(engine: Engine, key: str) -> str | None:
    """The value of ``key``, or None when no server recorded it."""
    with engine.connect() as connection:
        return connection.execute(sa.select(server_settings.c.value)
                                  .where(server_settings.c.key == key)).scalar_one_or_none()
