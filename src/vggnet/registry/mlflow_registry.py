"""Model versions in the MLflow Model Registry: register a run's checkpoint, list, promote with evidence, roll back.

The registry is the tracking store training already uses (SQLite in ``mlruns/`` beside the runs, or any MLflow
server named by ``--tracking-uri`` / ``$MLFLOW_TRACKING_URI``); the mlflow-skinny client is enough. A version's
source is the checkpoint file's URI; what it is (metrics, recipe, data fingerprint, checkpoint hash, parent) lives
in its tags, so ``list`` and a server need nothing but the registry. Aliases: ``champion`` (what is served),
``challenger`` (what may replace it) and ``previous-champion`` (where ``rollback`` goes). Every promotion and
rollback is an event, JSON in tags: on the version that became champion (``promotion``) and on the registered
model (``event.<UTC time>``), with who, when, the previous champion and the evidence or the forced reason.

Deciding whether a version is better is not done here: the caller (the CLI, with :mod:`vggnet.monitor`) passes
the evidence in, so this room imports no other.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vggnet.atomic import file_sha256
from vggnet.errors import UsageError, VggnetError

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS", "VersionRow", "challenger_of", "champion_of", "data_fingerprint",
           "list_versions", "model_version", "open_registry", "promote", "register_run", "resolve_uri", "rollback"]

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
STORE_DIR, DB_FILE = "mlruns", "mlflow.db"  # as vggnet.engine.tracking: SQLite in mlruns/ beside the run folders
DEFAULT_RUNS = Path("runs")  # where `vggnet train` puts runs by default (runs/<recipe name>)
CHECKPOINTS = ("best.safetensors", "last.safetensors")
INSTALL = "pip install 'vggnet[tracking]'"


class RegistryUnavailable(VggnetError, ValueError):
    """MLflow (or, for the local SQLite store, SQLAlchemy / Alembic) does not import."""


def resolve_uri(given: str | None, runs_dir: Path | None = None, create: bool = False) -> str:
    """The registry's URI: ``given``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store training writes beside
    the runs (``runs_dir/mlruns/mlflow.db``; ``runs_dir`` defaults to ``runs/``). A missing default store is an
    error unless ``create`` (registering creates it), so a mistyped folder is not an empty registry."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(runs_dir if runs_dir is not None else DEFAULT_RUNS).resolve() / STORE_DIR
    if not (store / DB_FILE).exists():
        if not create:
            raise UsageError(f"no model registry at {store / DB_FILE}: register a run first, or pass --tracking-uri "
                             "(or set $MLFLOW_TRACKING_URI)")
        store.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + str(store / DB_FILE)


def open_registry(uri: str) -> Any:
    """An MlflowClient on ``uri`` (tracking and registry the same store); MLflow's own INFO lines are quietened."""
    import logging

    needs = ["mlflow.tracking"] + (["sqlalchemy", "alembic"] if uri.startswith("sqlite") else [])
    for name in needs:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RegistryUnavailable(f"the model registry needs {name.split('.')[0]}, which does not import "
                                      f"({exc}): {INSTALL}") from exc
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)



def _run_facts(run: Path) -> tuple[Path, dict[str, Any], str]:
    """The run's checkpoint (best, else last), its final metrics and its recipe text; what is missing, said."""
    if not run.is_dir():
        raise UsageError(f"run folder {run} does not exist")
    checkpoint = next((run / n for n in CHECKPOINTS if (run / n).is_file()), None)
    if checkpoint is None:
        raise UsageError(f"{run} has no {' or '.join(CHECKPOINTS)}: not a finished run")
    final = json.loads((run / "final.json").read_text()) if (run / "final.json").is_file() else {}
    recipe = (run / "recipe.yaml").read_text() if (run / "recipe.yaml").is_file() else ""
    return checkpoint, final, recipe


def data_fingerprint(recipe_text: str) -> str:
    """sha256 of the recipe's ``data`` section as canonical JSON (sorted keys): the same data settings give the
    same fingerprint whatever the rest of the recipe or its formatting. It names the data, not its bytes."""
    import yaml

    data = (yaml.safe_load(recipe_text) or {}).get("data") if recipe_text else None
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _existing_version(client: Any, name: str, version: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise UsageError(f"model {name} has no version {version}") from exc


def register_run(client: Any, name: str, run: Path, parent: int | str | None = None, challenger: bool = False,
                 tags: dict[str, str] | None = None, alias: bool = True, once: bool = False) -> Any:
    """Record ``run``'s checkpoint as a new version of ``name``; the model's first version becomes champion,
    a later one challenger only when asked. Returns the ModelVersion.

    ``tags`` are added to the version's own (e.g. ``gate``: why a retrained version passed or failed).
    ``alias=False`` gives the version no alias at all, not even champion as a first version: a version kept for
    the record only (a retrain that failed its gate). ``once``: when a version of this very run and checkpoint
    (same folder, same sha256) is already registered, that version is returned (its tags and alias set as asked)
    instead of a second one, so a step that is re-run after an interruption registers once."""
    from mlflow.exceptions import MlflowException

    run = Path(run).resolve()
    checkpoint, final, recipe = _run_facts(run)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="VGG checkpoints registered by `vggnet registry`")
    if parent is not None:
        _existing_version(client, name, parent)
    all_tags = {f"metric.{k}": str(v) for k, v in final.items() if isinstance(v, int | float) and k != "time"}
    all_tags.update({
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "run": str(run),
        "recipe_sha256": hashlib.sha256(recipe.encode()).hexdigest(), "data_fingerprint": data_fingerprint(recipe),
        "parent": "" if parent is None else str(parent),
    })
    if (run / "mlflow.json").is_file():  # the MLflow run training logged to, when it used MLflow
        all_tags["mlflow_run_id"] = str(json.loads((run / "mlflow.json").read_text()).get("run_id", ""))
    all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    version = _version_of_run(client, name, run, all_tags["checkpoint_sha256"]) if once else None
    if version is None:
        version = client.create_model_version(name, source=checkpoint.as_uri(), tags=all_tags,
                                              description=f"recipe.yaml of {run}:\n{recipe}")
    else:
        for key, value in all_tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    if alias and CHAMPION not in client.get_registered_model(name).aliases:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    elif alias and challenger:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def _version_of_run(client: Any, name: str, run: Path, sha256: str) -> Any:
    """The oldest version of ``name`` registered from ``run`` with this checkpoint hash, or None."""
    same = [mv for mv in client.search_model_versions(f"name='{name}'")
            if mv.tags.get("run") == str(run) and mv.tags.get("checkpoint_sha256") == sha256]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def model_version(client: Any, ref: str) -> Any:
    """The ModelVersion ``ref`` names: ``M@champion``, ``M@challenger`` (any alias) or ``M@3`` (a version)."""
    from mlflow.exceptions import MlflowException

    name, sep, which = str(ref).partition("@")
    if not sep or not name or not which:
        raise UsageError(f"{ref!r} names no model version: use NAME@champion, NAME@challenger or NAME@N")
    if which.isdigit():
        return _existing_version(client, name, which)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise UsageError(f"no registered model {name!r}") from exc
    try:
        return client.get_model_version_by_alias(name, which)
    except MlflowException as exc:
        raise UsageError(f"model {name} has no {which!r} alias (`vggnet registry list {name}` shows its "
                         "versions)") from exc


@dataclass
class VersionRow:
    """One line of ``vggnet registry list``."""

    version: str
    aliases: list[str]
    created: str
    val_top1: str
    checkpoint: str
    parent: str


def _when(ms: int | None) -> str:
    return "" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def list_versions(client: Any, name: str) -> list[VersionRow]:
    """Every version of ``name``, oldest first, with its aliases (search results carry none: read the model's)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        raise UsageError(f"no registered model {name!r}") from exc
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version)):
        t = mv.tags
        rows.append(VersionRow(str(mv.version), sorted(by_version.get(str(mv.version), [])),
                               _when(mv.creation_timestamp), t.get("metric.val_top1", ""), t.get("checkpoint", ""),
                               t.get("parent", "")))
    return rows


def _alias(client: Any, name: str, alias: str) -> str | None:
    """The version an alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_registered_model(name).aliases[alias])
    except KeyError:
        return None
    except MlflowException as exc:
        raise UsageError(f"no registered model {name!r}") from exc


def champion_of(client: Any, name: str) -> str | None:
    """The version ``champion`` points at (None: none yet)."""
    return _alias(client, name, CHAMPION)


def challenger_of(client: Any, name: str) -> str | None:
    """The version ``challenger`` points at (None: none)."""
    return _alias(client, name, CHALLENGER)


def _record(client: Any, name: str, version: str, event: dict[str, Any]) -> dict[str, Any]:
    """Write the event on the version that became champion and in the model's history."""
    text = json.dumps(event, sort_keys=True, default=str)
    client.set_model_version_tag(name, version, event["action"], text)
    key = event["when"].replace("+00:00", "Z")  # a tag key may not hold '+'
    client.set_registered_model_tag(name, f"event.{key}", text)
    return event


def promote(client: Any, name: str, version: str, who: str, evidence: dict[str, Any] | None = None,
            reason: str | None = None) -> dict[str, Any]:
    """Move ``champion`` to ``version`` on ``evidence`` (the monitor's verdict) or a forced ``reason``; the old
    champion keeps ``previous-champion`` and a ``challenger`` alias on ``version`` is removed. Returns the event."""
    if evidence is None and not reason:
        raise UsageError("a promotion needs evidence (--store) or --force with --reason")
    version = str(_existing_version(client, name, version).version)
    previous = champion_of(client, name)
    if previous == version:
        raise UsageError(f"version {version} of {name} is already the champion")
    event = {"action": "promotion", "who": who, "when": _now(), "version": version, "previous": previous,
             "evidence": evidence, "forced": evidence is None, "reason": reason}
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    if challenger_of(client, name) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return _record(client, name, version, event)


def rollback(client: Any, name: str, who: str) -> dict[str, Any]:
    """Move ``champion`` back to ``previous-champion`` (then removed: a second rollback has nowhere to go)."""
    target, current = _alias(client, name, PREVIOUS), champion_of(client, name)
    if target is None:
        raise UsageError(f"nothing to roll back to: {name} has no previous champion")
    event = {"action": "rollback", "who": who, "when": _now(), "version": target, "previous": current}
    client.set_registered_model_alias(name, CHAMPION, target)
    client.delete_registered_model_alias(name, PREVIOUS)
    return _record(client, name, target, event)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
