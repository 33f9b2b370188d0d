"""`vggnet registry` against a real MLflow registry (SQLite in tmp_path) and a planted prediction store.

Two tiny runs are made by hand (a real checkpoint, final.json, recipe.yaml) and registered; promotion is refused
without evidence, made on the monitor's 'better' verdict from planted paired reviews, recorded, and rolled back.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

pytest.importorskip("mlflow")
sqlalchemy = pytest.importorskip("sqlalchemy")

from serve_helpers import tiny_checkpoint  # noqa: E402
from vggnet.cli import main  # noqa: E402
from vggnet.registry import data_fingerprint, open_registry  # noqa: E402
from vggnet.store import connect, schema  # noqa: E402

RECIPE = "name: tiny\ndata:\n  dataset: digits\n  image_size: 32\noptim:\n  lr: {lr}\n"
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def make_run(root, name: str, seed: int, top1: float):
    run = root / name
    run.mkdir(parents=True)
    tiny_checkpoint(run / "best.safetensors", seed=seed)
    (run / "final.json").write_text(json.dumps({"epoch": 1, "val_top1": top1, "val_loss": 0.5, "time": 1.0}))
    (run / "recipe.yaml").write_text(RECIPE.format(lr=0.1 * (seed + 1)))
    return run


def vggnet(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def registry(tmp_path, monkeypatch, capsys):
    """Two registered versions of `digits` in the default store (runs/mlruns/mlflow.db under tmp_path)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    v1, v2 = make_run(runs, "v1", 0, 61.5), make_run(runs, "v2", 1, 92.25)
    assert vggnet(capsys, "registry", "register", str(v1), "--name", "digits")[0] == 0
    code, out, _ = vggnet(capsys, "registry", "register", "runs/v2", "--name", "digits", "--parent", "1",
                          "--challenger")
    assert code == 0 and "version 2 (challenger)" in out
    client = open_registry(f"sqlite:///{runs / 'mlruns' / 'mlflow.db'}")
    return client, v1, v2


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model("digits").aliases.items()}


def plant_store(tmp_path, only_new: int, only_old: int = 0) -> str:
    """v1 served, v2 in shadow on the same sampled, reviewed requests: the McNemar cells given (5 both right)."""
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    cells = [(True, True)] * 5 + [(True, False)] * only_old + [(False, True)] * only_new
    preds, labs = [], []
    for i, (old, new) in enumerate(cells):
        for version, right, role in (("1", old, "served"), ("2", new, "shadow")):
            preds.append({"request_id": f"r{i}", "item": 0, "created_at": T0, "model": "digits", "version": version,
                          "role": role, "route": "/v2", "predicted": "7" if right else "1", "confidence": 0.9,
                          "topk": [], "sampled": True})
        labs.append({"request_id": f"r{i}", "item": 0, "model": "digits", "label": "7", "source": "review",
                     "who": "ann", "created_at": T0})
    with connect(url).begin() as conn:
        conn.execute(sqlalchemy.insert(schema.predictions), preds)
        conn.execute(sqlalchemy.insert(schema.labels), labs)
    return url


def test_register_records_lineage_and_tags_and_first_becomes_champion(registry, capsys):
    client, v1, v2 = registry
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    tags = client.get_model_version("digits", "2").tags
    assert tags["metric.val_top1"] == "92.25" and "metric.time" not in tags
    assert tags["parent"] == "1" and client.get_model_version("digits", "1").tags["parent"] == ""
    assert tags["checkpoint"] == str(v2 / "best.safetensors")
    assert tags["checkpoint_sha256"] == hashlib.sha256((v2 / "best.safetensors").read_bytes()).hexdigest()
    recipe = (v2 / "recipe.yaml").read_text()
    assert tags["recipe_sha256"] == hashlib.sha256(recipe.encode()).hexdigest()
    # the data section is the same in both recipes (only the lr differs): the same data fingerprint
    assert tags["data_fingerprint"] == client.get_model_version("digits", "1").tags["data_fingerprint"]
    assert tags["data_fingerprint"] == data_fingerprint(recipe) != data_fingerprint(recipe.replace("32", "48"))
    assert client.get_model_version("digits", "2").source == (v2 / "best.safetensors").as_uri()

    code, out, _ = vggnet(capsys, "registry", "list", "digits")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["version", "aliases"]
    assert lines[1].split()[:2] == ["1", "champion"] and "61.5" in lines[1] and lines[1].endswith("-")
    assert lines[2].split()[:2] == ["2", "challenger"] and "92.25" in lines[2] and lines[2].endswith("1")
    assert str(v2 / "best.safetensors") in lines[2]


def test_promote_without_evidence_or_reason_refuses_and_changes_nothing(registry, capsys, tmp_path):
    client, _, _ = registry
    for argv, says in ((["registry", "promote", "digits"], "no evidence"),
                       (["registry", "promote", "digits", "--force"], "--reason"),
                       (["registry", "promote", "digits", "--store", plant_store(tmp_path, only_new=1)],
                        "not yet known")):
        code, out, err = vggnet(capsys, *argv)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert aliases(client) == {"champion": "1", "challenger": "2"}
    assert "promotion" not in client.get_model_version("digits", "2").tags


def test_promote_on_evidence_then_rollback(registry, capsys, tmp_path):
    client, _, _ = registry
    store = plant_store(tmp_path, only_new=12)
    code, out, err = vggnet(capsys, "registry", "promote", "digits", "--store", store, "--who", "ann")
    assert code == 0, err
    assert "champion is now version 2 (was 1; better than 1, mcnemar-midp" in out
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}  # challenger removed
    event = json.loads(client.get_model_version("digits", "2").tags["promotion"])
    assert event["who"] == "ann" and event["previous"] == "1" and not event["forced"]
    assert event["evidence"]["verdict"] == "better" and event["evidence"]["test"] == "mcnemar-midp"
    assert event["evidence"]["p"] < 0.05 and event["evidence"]["b"] == 12 and event["evidence"]["c"] == 0
    assert abs((datetime.fromisoformat(event["when"]) - datetime.now(UTC)).total_seconds()) < 120
    model_events = {k: v for k, v in client.get_registered_model("digits").tags.items() if k.startswith("event.")}
    assert list(model_events.values()) == [json.dumps(event, sort_keys=True)]

    code, out, _ = vggnet(capsys, "registry", "rollback", "digits", "--who", "bob")
    assert code == 0 and "rolled back to version 1 (was 2)" in out
    assert aliases(client) == {"champion": "1"}
    back = json.loads(client.get_model_version("digits", "1").tags["rollback"])
    assert back["who"] == "bob" and back["previous"] == "2" and back["version"] == "1"

    code, _, err = vggnet(capsys, "registry", "rollback", "digits")
    assert code == 2 and "nothing to roll back to" in err and aliases(client) == {"champion": "1"}


def test_forced_promotion_records_the_reason(registry, capsys):
    client, _, _ = registry
    code, out, _ = vggnet(capsys, "registry", "promote", "digits", "--version", "2", "--force", "--reason",
                          "hotfix", "--who", "cat")
    assert code == 0 and "forced: hotfix" in out
    event = json.loads(client.get_model_version("digits", "2").tags["promotion"])
    assert event["forced"] and event["reason"] == "hotfix" and event["evidence"] is None and event["who"] == "cat"
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}


def test_missing_things_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = vggnet(capsys, "registry", "list", "digits")
    assert code == 2 and "no model registry at" in err  # a default store that does not exist is not created
    assert not (tmp_path / "runs").exists()
    (tmp_path / "empty").mkdir()
    uri = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = vggnet(capsys, "registry", "register", str(tmp_path / "empty"), "--name", "m", "--tracking-uri",
                          uri)
    assert code == 2 and "no best.safetensors or last.safetensors" in err
