"""train.tracking: mlflow on the embedded digits, read back with MLflow's own client; a missing MLflow; resume."""

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when MLflow is imported: no usage pings from tests
from mlflow.tracking import MlflowClient  # noqa: E402

from vggnet.engine.recipe import load_recipe  # noqa: E402
from vggnet.engine.tracking import RUN_FILE, TrackingUnavailable, flatten, param_value  # noqa: E402
from vggnet.engine.trainer import train  # noqa: E402

# MLflow 3.17's SQL store uses a loader strategy SQLAlchemy 2.1 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "train.tracking=mlflow"]


def recipe(*overrides):
    return load_recipe("demo", [*FAST, *overrides])


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made once: creating them (Alembic migrations) takes seconds."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def runs(tmp_path, empty_store, monkeypatch) -> Path:
    """A runs/ folder whose mlruns/ (the default store beside a run) starts as a copy of the empty store."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(empty_store, tmp_path / "mlruns" / "mlflow.db")
    return tmp_path


def client_for(runs: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{runs / 'mlruns' / 'mlflow.db'}")


def test_params_metrics_and_artifacts_read_back(runs):
    out = runs / "digits"
    train(recipe("schedule.epochs=2"), out)
    saved = json.loads((out / RUN_FILE).read_text())
    client = client_for(runs)
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "digits"
    assert client.get_experiment(run.info.experiment_id).name == "vggnet"

    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    expected = {key: param_value(value) for key, value in flatten(resolved).items()}
    assert run.data.params == expected
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["model.name"] == "vgg11_bn"
    assert run.data.params["train.tracking"] == "mlflow" and run.data.params["model.channels"] == "null"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_top1", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([r[key] for r in records]), key
    assert "epoch" not in run.data.metrics and "time" not in run.data.metrics

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "confusion.png", "best.safetensors", "recipe.yaml"} <= names
    assert run.info.artifact_uri.startswith((runs / "mlruns" / "artifacts").as_uri())  # beside the database
    copy = client.download_artifacts(run.info.run_id, "best.safetensors", str(runs / "dl"))
    assert Path(copy).read_bytes() == (out / "best.safetensors").read_bytes()
    assert not (out / "tb").exists()  # MLflow instead of TensorBoard


def test_resume_continues_the_same_mlflow_run(runs):
    out = runs / "resumed"
    train(recipe("schedule.epochs=2", "train.stop_after_epoch=1"), out)
    first = json.loads((out / RUN_FILE).read_text())["run_id"]
    train(recipe("schedule.epochs=2"), out)
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == first
    client = client_for(runs)
    assert len(client.search_runs([client.get_experiment_by_name("vggnet").experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(first, "val_top1")] == [1, 2]
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.stop_after_epoch"] == "1"  # parameters are fixed at the run's start


@pytest.mark.parametrize("package", ["mlflow", "sqlalchemy"])  # the default SQLite store needs SQLAlchemy too
def test_missing_mlflow_fails_before_training(tmp_path, monkeypatch, package):
    for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import mlflow...` now raises ImportError
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    with pytest.raises(TrackingUnavailable, match=rf"needs {package}, .*pip install 'vggnet\[tracking\]'"):
        train(recipe("schedule.epochs=1"), out)
    assert not out.exists()  # nothing trained, no run folder


def test_unknown_tracking_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tensorboard, mlflow, none"):
        train(recipe("train.tracking=wandb"), tmp_path / "run")


def test_param_values_are_cut_to_mlflow_limit():
    assert param_value("x" * 7000) == "x" * 5997 + "..."
    assert param_value([0.5, 0.5]) == "[0.5, 0.5]" and param_value(True) == "true" and param_value("sgd") == "sgd"
    assert flatten({"a": {"b": 1, "c": {}}, "d": None}) == {"a.b": 1, "a.c": {}, "d": None}


def test_a_run_that_raises_is_marked_failed(runs):
    out = runs / "diverged"
    with pytest.raises(FloatingPointError):  # lr 1e30: the loss is no longer finite after the first step
        train(recipe("schedule.epochs=2", "optim.lr=1e30", "schedule.name=constant"), out)
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert client_for(runs).get_run(run_id).info.status == "FAILED"


def test_ctrl_c_marks_the_run_killed(runs, monkeypatch):
    from vggnet.engine import trainer

    def interrupt(record):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "format_epoch_line", interrupt)  # as if Ctrl-C came during the first epoch's log
    out = runs / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(recipe("schedule.epochs=2"), out)
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert client_for(runs).get_run(run_id).info.status == "KILLED"


@pytest.mark.parametrize(("uri", "shown"), [
    ("https://alice:s3cret@mlflow.example.com:5000/", "https://alice:***@mlflow.example.com:5000/"),
    ("https://mlflow.example.com/?access_token=abc&x=1", "https://mlflow.example.com/?access_token=***&x=1"),
    ("http://mlflow.example.com", "http://mlflow.example.com"),
    ("sqlite:////tmp/mlruns/mlflow.db", "sqlite:////tmp/mlruns/mlflow.db"),
])
def test_tracking_uri_passwords_are_redacted(uri, shown):
    from vggnet.engine.tracking import redact_uri

    assert redact_uri(uri) == shown


def test_no_password_reaches_the_params_or_the_recipe_artifact(tmp_path):
    """The tracker's own calls, recorded by a stand-in client: a password in train.tracking_uri is neither a
    parameter value nor in the recipe.yaml it uploads (the run folder's own copy is the user's file)."""
    from vggnet.engine.recipe import save_recipe
    from vggnet.engine.tracking import MlflowTracker

    uri = "https://alice:s3cret@mlflow.example.com/?token=t0k3n"
    resolved = recipe(f"train.tracking_uri={uri}")
    save_recipe(resolved, tmp_path / "recipe.yaml")

    class Client:
        def __init__(self):
            self.params, self.uploaded = [], []

        def log_batch(self, run_id, params=(), metrics=()):
            self.params += [p.value for p in params]

        def log_artifact(self, run_id, path):
            self.uploaded.append(Path(path).read_text())

        def set_terminated(self, run_id, status):
            pass

    tracker = MlflowTracker.__new__(MlflowTracker)  # no store: only what it would send
    tracker.uri, tracker.run_id, tracker.client, tracker._limits = uri, "r", Client(), (6000, 100, 1000)
    tracker._log_params(resolved, {})
    tracker.finish(tmp_path)
    sent = " ".join(tracker.client.params + tracker.client.uploaded)
    assert tracker.client.uploaded and "mlflow.example.com" in sent
    assert "s3cret" not in sent and "t0k3n" not in sent


def test_a_token_in_the_tracking_uri_reaches_no_store_file_or_log(runs, empty_store, monkeypatch, capsys, caplog):
    """A real SQLite store reached through a URI that carries a token (SQLite ignores URI parameters it does not
    know): the parameters, the uploaded recipe.yaml, mlflow.json and the run's output and log show `***`, never
    the token. The run folder's own recipe.yaml is the user's file and keeps it."""
    monkeypatch.chdir(runs)  # MLflow puts the artifacts of a store it is given under ./mlruns
    db = runs / "secret.db"
    shutil.copyfile(empty_store, db)
    uri = f"sqlite:///file:{db}?uri=true&token=t0k3n"
    out = runs / "secret"
    with caplog.at_level(logging.DEBUG, logger="vggnet"):
        train(recipe("schedule.epochs=1", f"train.tracking_uri={uri}"), out)
    printed = capsys.readouterr()
    saved = json.loads((out / RUN_FILE).read_text())
    client = MlflowClient(uri)
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics  # the store really was written through this URI
    uploaded = Path(client.download_artifacts(run.info.run_id, "recipe.yaml", str(runs / "dl"))).read_text()
    read_back = {"parameters": json.dumps(run.data.params), "uploaded recipe.yaml": uploaded,
                 RUN_FILE: (out / RUN_FILE).read_text(), "output": printed.out + printed.err, "log": caplog.text}
    for where, text in read_back.items():
        assert "t0k3n" not in text, where
    assert run.data.params["train.tracking_uri"].endswith("?uri=true&token=***")
    assert yaml.safe_load(uploaded)["train"]["tracking_uri"].endswith("?uri=true&token=***")
    assert saved["tracking_uri"].endswith("?uri=true&token=***")
    assert f"mlflow: started run {run.info.run_id} in " in printed.out and "token=***" in printed.out
    assert "t0k3n" in (out / "recipe.yaml").read_text()
