"""Experiment tracking besides the run's own files: TensorBoard (the default), MLflow or none (``train.tracking``).

The trainer sees a tiny interface: :func:`check_tracking` before anything is built (a missing package fails
there, not after the data is loaded), :func:`open_tracker` on rank 0, then ``log_epoch`` and ``finish``.
MLflow, imported only when chosen, gets the recipe as parameters, each epoch as metrics and the final plots,
best checkpoint and recipe as artifacts. Its default store is SQLite in ``mlruns/`` beside the run folder, so
all runs under ``runs/`` can be compared without a server; ``mlflow.json`` in the run folder names the MLflow
run, so a resumed run continues it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vggnet.atomic import write_json
from vggnet.errors import UsageError, VggnetError

from .recipe import Recipe, parse_yaml, save_recipe

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "none")
STORE_DIR = "mlruns"  # beside the run folder, unless a tracking URI is given
RUN_FILE = "mlflow.json"  # in the run folder: which MLflow run a resume continues
ARTIFACTS = ("curves.png", "confusion.png", "best.safetensors", "recipe.yaml")
DEFAULT_EXPERIMENT = "vggnet"
INSTALL = "pip install 'vggnet[tracking]'"
_NOT_METRICS = ("epoch", "epochs", "time")  # the step itself, a constant and a timestamp


class TrackingUnavailable(VggnetError, ValueError):
    """``train.tracking: mlflow`` without MLflow installed (a message for the CLI, raised before training)."""


def check_tracking(recipe: Recipe) -> None:
    """Refuse an unknown ``train.tracking``, or ``mlflow`` when the packages it needs do not import."""
    kind = recipe.train.tracking
    if kind not in TRACKERS:
        raise UsageError(f"unknown train.tracking {kind!r}; choose {', '.join(TRACKERS)}")
    if kind == "mlflow":
        _mlflow_client(local_store=_given_uri(recipe) is None)


def open_tracker(recipe: Recipe, out: Path, resuming: bool) -> Tracker:
    """The tracker of ``train.tracking`` for the main process (others log nothing, so never call this)."""
    if recipe.train.tracking == "mlflow":
        return MlflowTracker(recipe, out, resuming)
    return Tracker()  # tensorboard is written by RunLogger with the metrics files; none writes only those


class Tracker:
    """Nothing to do (TensorBoard or none); the interface the trainer calls."""

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, out: Path) -> None:
        pass

    def fail(self, status: str) -> None:
        """Training raised: mark the run ``FAILED`` (``KILLED`` for Ctrl-C); never raises itself."""


def flatten(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; an empty mapping stays one value."""
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def param_value(value: Any, limit: int = 6000) -> str:
    """A recipe value as a parameter: strings as they are, others as YAML / JSON spell them (null, true, [1, 2])."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "signature", "credential")


def redact_uri(uri: str) -> str:
    """``https://user:secret@host/?token=abc`` -> ``https://user:***@host/?token=***``: a tracking URI may carry
    a password or a token, which must not end up in the run's parameters, artifacts or log."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_keys = [k for k, _ in pairs if any(w in k.lower() for w in _SECRET_WORDS)]
    if password is None and not secret_keys:
        return uri  # untouched (urlunsplit would rewrite sqlite:////abs/path as sqlite://abs/path)
    if password is not None:
        parts = parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}")
    if secret_keys:
        parts = parts._replace(query=urlencode([(k, "***" if k in secret_keys else v) for k, v in pairs], safe="*"))
    return urlunsplit(parts)


def _given_uri(recipe: Recipe) -> str | None:
    return recipe.train.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _mlflow_client(local_store: bool) -> Any:
    """MlflowClient, imported now; the default SQLite store also needs SQLAlchemy and Alembic."""
    modules = []
    for name in ("mlflow.tracking", *(("sqlalchemy", "alembic") if local_store else ())):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise TrackingUnavailable(f"train.tracking: mlflow needs {name.split('.')[0]}, which does not import "
                                      f"({exc}): {INSTALL}") from exc
    return modules[0].MlflowClient


class MlflowTracker(Tracker):
    """One MLflow run per run folder, continued when the run folder is resumed."""

    def __init__(self, recipe: Recipe, out: Path, resuming: bool) -> None:
        given = _given_uri(recipe)
        local = given is None
        client_cls = _mlflow_client(local_store=local)
        from mlflow.exceptions import MlflowException
        from mlflow.utils import validation

        self._limits = (getattr(validation, "MAX_PARAM_VAL_LENGTH", 500),
                        getattr(validation, "MAX_PARAMS_TAGS_PER_BATCH", 100),
                        getattr(validation, "MAX_METRICS_PER_BATCH", 1000))
        out = Path(out).resolve()
        store = out.parent / STORE_DIR
        if local:
            store.mkdir(parents=True, exist_ok=True)
            from mlflow.utils.file_utils import path_to_local_sqlite_uri

            given = path_to_local_sqlite_uri(str(store / "mlflow.db"))
        self.uri = given
        self.client = client_cls(self.uri)
        run = None
        saved = _read_json(out / RUN_FILE)
        if resuming and saved.get("tracking_uri") == redact_uri(self.uri) and saved.get("run_id"):
            try:
                run = self.client.get_run(saved["run_id"])
            except MlflowException:  # deleted from the store: start afresh
                run = None
            if run is not None and run.info.lifecycle_stage != "active":
                run = None
        if run is None:
            experiment = self._experiment(recipe.train.tracking_experiment
                                          or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
                                          store / "artifacts" if local else None)
            run = self.client.create_run(experiment, run_name=out.name,
                                         tags={"vggnet.run_folder": str(out)})
            write_json(out / RUN_FILE, {"tracking_uri": redact_uri(self.uri), "run_id": run.info.run_id,
                                        "experiment_id": experiment})
            action = "started"
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            action = "continued"
        self.run_id = run.info.run_id
        self._log_params(recipe, run.data.params)
        print(f"mlflow: {action} run {self.run_id} in {redact_uri(self.uri)}", flush=True)

    def _experiment(self, name: str, artifacts: Path | None) -> str:
        """The experiment's id, created when missing; in the default store its artifacts go beside the database
        (MLflow would put them in ./mlruns of the working directory)."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if artifacts is not None:
            location = (artifacts / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment")).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another run created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, recipe: Recipe | Mapping[str, Any], existing: dict[str, str]) -> None:
        """Parameters cannot change once logged: a resumed run adds only keys it lacks (recipe.yaml, logged at the
        end, has the values the run ended with)."""
        from mlflow.entities import Param

        limit, per_batch, _ = self._limits
        flat = flatten(recipe.to_dict() if isinstance(recipe, Recipe) else dict(recipe))
        if isinstance(flat.get("train.tracking_uri"), str):
            flat["train.tracking_uri"] = redact_uri(flat["train.tracking_uri"])
        params = [Param(key, param_value(value, limit)) for key, value in flat.items() if key not in existing]
        for i in range(0, len(params), per_batch):
            self.client.log_batch(self.run_id, params=params[i:i + per_batch])
        changed = [key for key, value in flat.items()
                   if key in existing and existing[key] != param_value(value, limit)]
        if changed:
            print(f"mlflow: parameters keep the values the run started with: {', '.join(changed)} "
                  "differ now (recipe.yaml is logged at the end)", flush=True)

    def log_epoch(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(record["epoch"])
        stamp = int(1000 * record.get("time", time.time()))
        metrics = [Metric(key, float(value), stamp, step) for key, value in record.items()
                   if key not in _NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool)]
        per_batch = self._limits[2]
        for i in range(0, len(metrics), per_batch):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + per_batch])

    def finish(self, out: Path) -> None:
        import tempfile

        for name in ARTIFACTS:
            path = Path(out) / name
            if not path.is_file():
                continue
            if name == "recipe.yaml" and redact_uri(self.uri) != self.uri:  # the store gets no password
                recipe = parse_yaml(path.read_text(), str(path))
                if isinstance(recipe.get("train"), dict) and isinstance(recipe["train"].get("tracking_uri"), str):
                    recipe["train"]["tracking_uri"] = redact_uri(recipe["train"]["tracking_uri"])
                with tempfile.TemporaryDirectory() as tmp:
                    save_recipe(recipe, Path(tmp) / name)
                    self.client.log_artifact(self.run_id, str(Path(tmp) / name))
                continue
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, status: str) -> None:
        from mlflow.exceptions import MlflowException

        try:  # the training error is the one to report, not a store that is gone too
            self.client.set_terminated(self.run_id, status)
        except (MlflowException, OSError) as exc:
            log.exception("mlflow: could not mark run %s %s", self.run_id, status)
            print(f"mlflow: could not mark run {self.run_id} {status}: {exc}", flush=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
