"""What a server following the registry should serve (``vggnet serve --registry URI --model M``), and the
registered model's setting for its challenger (``vggnet registry mode M shadow|ab:W``).

:func:`state_reader` gives the CLI a plain callable answering a :class:`ServingState`: the champion's and the
challenger's version, checkpoint path and recorded sha256, and the challenger's mode. The serve room polls it
without importing this room (the CLI converts it). The mode lives on the registered model as the tag
``vggnet.challenger_mode``: ``shadow`` (the default: the challenger runs on every request, never answers) or
``ab:W`` (it answers the share W of the requests that name no version). Setting it is recorded as an event like a
promotion, with who and when.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

from vggnet.errors import UsageError, VggnetError

from .mlflow_registry import CHALLENGER, CHAMPION, open_registry

__all__ = ["DEFAULT_MODE", "MODE_TAG", "RegisteredFile", "RegistryUnreachable", "ServingState", "display_uri",
           "format_mode", "get_mode", "parse_mode", "serving_state", "set_mode", "state_reader"]

MODE_TAG = "vggnet.challenger_mode"
DEFAULT_MODE = "shadow"
MODE_HELP = "shadow (the challenger runs on every request beside the champion, never answering) or ab:W " \
            "(it answers the share W, 0 < W < 1, of the requests that name no version)"


class RegistryUnreachable(VggnetError):
    """The registry did not answer (a server down, a database that cannot be read): not the user's model."""


@dataclass(frozen=True)
class RegisteredFile:
    """One version to serve: its number, its checkpoint's path and the sha256 recorded when it was registered."""

    version: str
    checkpoint: str
    sha256: str | None


@dataclass(frozen=True)
class ServingState:
    """What the registry says ``name`` should serve now."""

    name: str
    champion: RegisteredFile
    challenger: RegisteredFile | None
    mode: str = DEFAULT_MODE  # "shadow" or "ab"
    challenger_share: float | None = None  # ab only


def parse_mode(text: str) -> tuple[str, float | None]:
    """``shadow`` → ("shadow", None); ``ab:0.1`` → ("ab", 0.1); anything else is a UsageError."""
    text = text.strip()
    if text == "shadow":
        return "shadow", None
    if text.startswith("ab:"):
        try:
            share = float(text[3:])
        except ValueError:
            share = float("nan")
        if 0 < share < 1:
            return "ab", share
    raise UsageError(f"challenger mode {text!r}: expected {MODE_HELP}, e.g. ab:0.1")


def format_mode(mode: str, share: float | None) -> str:
    return "shadow" if mode == "shadow" else f"ab:{share:g}"


def _model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(f"no registered model {name!r}") from exc
        raise


def get_mode(client: Any, name: str) -> str:
    """The model's challenger mode as set (``shadow`` when never set)."""
    return _model(client, name).tags.get(MODE_TAG, DEFAULT_MODE)


def set_mode(client: Any, name: str, text: str, who: str) -> dict[str, Any]:
    """Set the challenger mode of ``name`` (checked first), recorded as an event; returns the event."""
    from datetime import UTC, datetime

    mode = format_mode(*parse_mode(text))
    previous = get_mode(client, name)
    when = datetime.now(UTC).isoformat(timespec="microseconds")
    event = {"action": "mode", "who": who, "when": when, "mode": mode, "previous": previous}
    client.set_registered_model_tag(name, MODE_TAG, mode)
    client.set_registered_model_tag(name, f"event.{when.replace('+00:00', 'Z')}", json.dumps(event, sort_keys=True))
    return event


def _checkpoint(mv: Any) -> str:
    """The version's checkpoint path: its ``checkpoint`` tag, else its source when that is a file URI (the
    source of a version ``vggnet registry register`` made), else the source as it is (it will not load)."""
    if mv.tags.get("checkpoint"):
        return str(mv.tags["checkpoint"])
    source = str(mv.source or "")
    parts = urlsplit(source)
    if parts.scheme == "file":
        return url2pathname(unquote(parts.path))
    return source


def _file(client: Any, name: str, version: str) -> RegisteredFile:
    mv = client.get_model_version(name, version)
    return RegisteredFile(str(mv.version), _checkpoint(mv), mv.tags.get("checkpoint_sha256") or None)


def serving_state(client: Any, name: str) -> ServingState:
    """The champion (required: a UsageError without one), the challenger (if aliased, and not the champion) and
    the challenger's mode of ``name``."""
    model = _model(client, name)
    aliases = {alias: str(v) for alias, v in model.aliases.items()}
    if CHAMPION not in aliases:
        raise UsageError(f"registered model {name!r} has no champion: `vggnet registry promote {name} --version N "
                         "--force --reason TEXT` names one")
    mode, share = parse_mode(model.tags.get(MODE_TAG, DEFAULT_MODE))
    champion = _file(client, name, aliases[CHAMPION])
    other = aliases.get(CHALLENGER)
    challenger = _file(client, name, other) if other is not None and other != champion.version else None
    return ServingState(name, champion, challenger, mode, share)


def display_uri(uri: str) -> str:
    """``uri`` without a password (for logs and messages)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def state_reader(uri: str, name: str) -> Callable[[], ServingState]:
    """A callable reading :func:`serving_state` of ``name`` from the registry at ``uri`` on each call. The
    registry's own failures (connection refused, a database that cannot be read) are :class:`RegistryUnreachable`;
    an answer that cannot be served (no such model, no champion, a bad mode tag) is a UsageError. A SQLite file
    that does not exist is refused (at once, and on each read): MLflow would create an empty registry in its place."""
    db = _sqlite_file(uri)
    if db is not None and not db.is_file():
        raise UsageError(f"no model registry at {db} (a SQLite file that does not exist); check --registry")
    client = open_registry(uri)

    def read() -> ServingState:
        if db is not None and not db.is_file():  # moved or deleted: a new connection would create an empty one
            raise RegistryUnreachable(f"model registry {db} no longer exists")
        try:
            return serving_state(client, name)
        except VggnetError:
            raise
        except Exception as exc:  # MLflow's, SQLAlchemy's, requests' own: the registry did not answer
            text = " ".join(str(exc).split())[:300]
            raise RegistryUnreachable(f"model registry {display_uri(uri)} unreachable: {type(exc).__name__}: "
                                      f"{text}") from exc

    return read

