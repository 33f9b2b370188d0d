"""`vggnet retrain` (issue 31, part 3): the reviewed samples out of a real prediction store (SQLite; PostgreSQL with
VGGNET_TEST_POSTGRES), the stratified holdout, the gate on planted answers, resume, and the CLI end to end on the
digits against a real MLflow registry (SQLite): a weak champion, its mistakes reviewed with their true labels, a
retrained version that passes and becomes challenger; the same with mislabelled reviews fails and aliases nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("mlflow")
sa = pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient  # noqa: E402

import vggnet.retrain.evaluate as retrain_evaluate  # noqa: E402
from serve_helpers import jpeg_bytes, tiny_checkpoint  # noqa: E402
from test_store import _fresh_pg_database  # noqa: E402
from vggnet import store  # noqa: E402
from vggnet.cli import main  # noqa: E402
from vggnet.data import digits_tensors  # noqa: E402
from vggnet.engine.recipe import load_recipe  # noqa: E402
from vggnet.engine.trainer import train  # noqa: E402
from vggnet.errors import UsageError  # noqa: E402
from vggnet.registry import open_registry  # noqa: E402
from vggnet.retrain import decide  # noqa: E402
from vggnet.retrain.export import export_reviewed, find_inputs  # noqa: E402
from vggnet.retrain.split import holdout_split  # noqa: E402
from vggnet.serve import ModelRepository, ServeSettings, create_app  # noqa: E402
from vggnet.stats import paired_noninferiority  # noqa: E402
from vggnet.store.schema import labels, predictions  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)
FAST = ["train.threads=2", "train.deterministic=true", "train.precision=fp32", "train.channels_last=false",
        "train.tracking=none", "optim.batch_size=32"]
ORIGINAL_PER_CLASS, TRAFFIC_PER_CLASS = 20, 30


def png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def keep(folder: Path, data: bytes) -> tuple[str, str]:
    """Keep ``data`` as the server does (serve.keep: ab/<sha256>.png); (sha256, input_path)."""
    sha = hashlib.sha256(data).hexdigest()
    (folder / sha[:2]).mkdir(parents=True, exist_ok=True)
    (folder / sha[:2] / f"{sha}.png").write_bytes(data)
    return sha, f"{sha[:2]}/{sha}.png"


def prediction(request_id: str, sha: str | None, path: str | None, predicted: str, model: str = "digits",
               version: str = "1", role: str = "served") -> dict:
    return {"request_id": request_id, "item": 0, "created_at": T0, "model": model, "version": version, "role": role,
            "route": "/v2", "predicted": predicted, "confidence": 0.5, "topk": [], "sampled": True,
            "input_sha256": sha, "input_path": path}


def label(request_id: str, value: str | None, minutes: int, source: str = "review", model: str = "digits") -> dict:
    return {"request_id": request_id, "item": 0, "model": model, "label": value, "source": source, "who": "ann",
            "created_at": T0 + timedelta(minutes=minutes)}


def plant(url: str, preds: list[dict], labs: list[dict], kept: Path | None = None) -> None:
    engine = store.connect(url)
    with engine.begin() as connection:
        connection.execute(sa.insert(predictions), preds)
        connection.execute(sa.insert(labels), labs)
    if kept is not None:
        store.record_setting(engine, store.KEEP_INPUTS, str(kept))
    engine.dispose()


# --- export -------------------------------------------------------------------------------------------------------

def plant_reviews(url: str, kept: Path) -> dict[str, str]:
    """One image per case; returns name -> sha256."""
    images = {name: jpeg_bytes(colour=(10 * i, 100, 200)) for i, name in enumerate("ABCDEFGH")}
    shas, paths = {}, {}
    for name, data in images.items():
        shas[name], paths[name] = keep(kept, data)
    paths["E"] = None  # never kept
    (kept / paths["F"]).unlink()  # kept once, gone now (purged, or the folder lost)
    preds = [prediction("a1", shas["A"], paths["A"], "7"), prediction("a2", shas["A"], paths["A"], "7"),
             prediction("a1", shas["A"], paths["A"], "9", version="2", role="shadow"),
             prediction("b", shas["B"], paths["B"], "3"), prediction("c", shas["C"], paths["C"], "1"),
             prediction("d", shas["D"], paths["D"], "1"), prediction("e", shas["E"], None, "1"),
             prediction("f", shas["F"], paths["F"], "1"), prediction("g", shas["G"], paths["G"], "4"),
             prediction("h", shas["H"], paths["H"], "6", model="other")]
    labs = [label("a1", "1", 1), label("a2", "2", 5),  # the same image reviewed twice: the later label wins
            label("a1", "1", 3, source="user"),  # a client's report never beats a reviewer
            label("b", "3", 1, source="user"),  # only a client's report: used with include_user only
            label("c", None, 1),  # "none of these"
            label("d", "cat", 1),  # not one of the model's classes
            label("e", "5", 1), label("f", "5", 1),  # reviewed, but the crop is not there
            label("g", "4", 1), label("g", "5", 9, source="user"),
            label("h", "6", 1, model="other")]  # another model's review
    plant(url, preds, labs, kept)
    return shas


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with _fresh_pg_database() as url:
            yield url


def test_export_uses_reviewer_labels_dedupes_and_leaves_out_what_it_must(store_url, tmp_path):
    kept = tmp_path / "kept"
    shas = plant_reviews(store_url, kept)
    classes = [str(i) for i in range(10)]
    engine = store.connect(store_url, create=False)
    try:
        assert find_inputs(engine, None) == kept  # recorded by the server in the store
        manifest = export_reviewed(engine, "digits", classes, kept, tmp_path / "reviewed")
        with_users = export_reviewed(engine, "digits", classes, kept, tmp_path / "with-users", include_user=True)
    finally:
        engine.dispose()
    got = {s["sha256"]: s for s in manifest["samples"]}
    assert set(got) == {shas["A"], shas["G"]}
    assert got[shas["A"]]["label"] == "2" and got[shas["A"]]["requests"] == 2  # latest review, deduplicated
    assert got[shas["A"]]["answered"] == {"7": 2}  # what the model said: reported, never the label
    assert got[shas["G"]]["label"] == "4" and got[shas["G"]]["source"] == "review"
    assert manifest["counts"] == {"labelled_inputs": 6, "exported": 2, "none_of_these": 1, "unknown_class": 1,
                                  "not_kept": 2, "labels_without_prediction": 0, "answered_wrong": 1}
    assert manifest["unknown_classes"] == {"cat": 1}
    assert {(r["request_id"], r["why"].split(" (")[0].split(":")[0]) for r in manifest["not_kept"]} == \
        {("e", "not kept"), ("f", "kept file missing")}
    assert [r["request_id"] for r in manifest["none_of_these"]] == ["c"]
    for sample in manifest["samples"]:
        exported = tmp_path / "reviewed" / sample["file"]
        assert sample["file"] == f"{sample['label']}/{sample['sha256']}.png"
        assert exported.read_bytes() == (kept / sample["sha256"][:2] / f"{sample['sha256']}.png").read_bytes()
    assert sorted(p.name for p in (tmp_path / "reviewed").iterdir()) == ["2", "4", "manifest.json"]
    users = {s["sha256"]: s for s in with_users["samples"]}
    assert users[shas["B"]]["label"] == "3" and users[shas["B"]]["source"] == "user"
    assert users[shas["A"]]["label"] == "2" and users[shas["G"]]["label"] == "4"  # reviewers still win


def test_the_server_records_its_kept_inputs_folder_and_export_finds_the_crop(tmp_path):
    url, kept = f"sqlite:///{tmp_path / 'serve.db'}", tmp_path / "kept"
    ckpt = tiny_checkpoint(tmp_path / "best.safetensors")  # classes a, b, c
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["m"]),
                     ServeSettings(load_in_background=False, access_log=False, store=url, review_sample=1.0,
                                   keep_inputs=str(kept)))
    with TestClient(app) as c:
        assert c.post("/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"}).status_code == 200
    engine = store.connect(url, create=False)
    try:
        assert store.read_setting(engine, store.KEEP_INPUTS) == str(kept.resolve())
        [row] = store.read_predictions(engine)
        store.add_label(engine, request_id=row["request_id"], model="m", label="b", source="review", who="ann")
        manifest = export_reviewed(engine, "m", ["a", "b", "c"], find_inputs(engine, None), tmp_path / "out")
    finally:
        engine.dispose()
    [sample] = manifest["samples"]
    assert sample["label"] == "b" and sample["sha256"] == row["input_sha256"]
    assert (tmp_path / "out" / sample["file"]).read_bytes() == (kept / row["input_path"]).read_bytes()


def test_find_inputs_without_a_record_or_folder_says_what_to_pass(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = store.connect(url)
    try:
        with pytest.raises(UsageError, match="pass --inputs DIR"):
            find_inputs(engine, None)
        store.record_setting(engine, store.KEEP_INPUTS, str(tmp_path / "elsewhere"))
        with pytest.raises(UsageError, match="not a folder on this machine"):
            find_inputs(engine, None)
    finally:
        engine.dispose()


# --- split and gate -----------------------------------------------------------------------------------------------

def test_holdout_is_stratified_seeded_and_independent_of_order():
    samples = [{"sha256": f"{i:064x}", "label": label_} for label_, n in (("a", 10), ("b", 20), ("c", 3))
               for i in range(n * 1000, n * 1000 + n)]
    split = holdout_split(samples, 0.3, seed=0)
    assert split["by_class"]["holdout"] == {"a": 3, "b": 6, "c": 1}
    assert split["by_class"]["train"] == {"a": 7, "b": 14, "c": 2}
    assert not set(split["train"]) & set(split["holdout"])
    assert len(split["train"]) + len(split["holdout"]) == len(samples)
    assert holdout_split(list(reversed(samples)), 0.3, seed=0) == split
    assert holdout_split(samples, 0.3, seed=1)["holdout"] != split["holdout"]


def answers(val: tuple[int, int, int, int], reviewed: tuple[int, int, int, int]) -> dict:
    """Planted answers: per set (both right, only champion right, only candidate right, both wrong)."""
    def one(cells):
        both, old, new, neither = cells
        n = both + old + new + neither
        truth = [0] * n
        champion = [0] * both + [0] * old + [1] * new + [1] * neither
        candidate = [0] * both + [1] * old + [0] * new + [1] * neither
        return {"labels": truth, "champion": champion, "candidate": candidate, "view": "single@32"}
    return {"sets": {"original_val": one(val), "reviewed_holdout": one(reviewed)}}


def test_the_gate_passes_a_better_model_and_fails_a_worse_one_on_each_test():
    better = decide(answers((360, 0, 0, 40), (10, 1, 25, 24)), margin=1.0, alpha=0.05)
    assert better["passed"] and better["reason"].startswith("passed: ")
    v, r = better["original_val"], better["reviewed_holdout"]
    assert (v["n"], v["b"], v["c"], v["champion"]["correct"], v["candidate"]["correct"]) == (400, 0, 0, 360, 360)
    assert v["test"] == "tango-noninferiority" and v["p"] < 0.05
    assert (r["n"], r["b"], r["c"]) == (60, 25, 1) and r["test"] == "mcnemar-midp" and r["p"] < 1e-5

    worse_on_val = decide(answers((340, 20, 0, 40), (10, 1, 25, 24)), margin=1.0, alpha=0.05)
    assert not worse_on_val["passed"] and worse_on_val["reviewed_holdout"]["passed"]
    reason = worse_on_val["reason"]
    assert reason.startswith("failed: may be worse than the champion by 1 point or more on 400 original validation")
    assert "held-out" not in reason

    not_better = decide(answers((360, 0, 0, 40), (10, 5, 5, 40)), margin=1.0, alpha=0.05)
    assert not not_better["passed"] and not_better["original_val"]["passed"]
    assert not_better["reason"] == "failed: not better on 60 held-out reviewed samples (only it right on b=5, " \
        "only the champion on c=5)"
    barely = decide(answers((360, 0, 0, 40), (10, 2, 5, 43)), margin=1.0, alpha=0.05)
    assert not barely["passed"] and "not significantly better" in barely["reason"]
    significantly_worse = decide(answers((360, 0, 0, 40), (10, 25, 1, 24)), margin=1.0, alpha=0.05)
    assert significantly_worse["reviewed_holdout"]["p"] < 0.05 and not significantly_worse["passed"]

    # a small validation split cannot show non-inferiority by saying little: identical answers on 200 images do
    # not rule out a one-point loss, on 400 they do
    assert not decide(answers((180, 0, 0, 20), (10, 1, 25, 24)), 1.0, 0.05)["original_val"]["passed"]


def test_tango_score_matches_the_restricted_maximum_likelihood():
    from scipy.optimize import minimize_scalar

    for b, c, n, margin in ((0, 0, 300, 0.01), (10, 5, 200, 0.01), (3, 12, 100, 0.05), (7, 2, 60, 0.1)):
        t = -margin

        def nll(q, b=b, c=c, n=n, t=t):
            import math
            return -((b * math.log(q + t) if b else 0) + (c * math.log(q) if c else 0)
                     + (n - b - c) * math.log(1 - 2 * q - t))

        q = minimize_scalar(nll, bounds=(-t + 1e-12, (1 - t) / 2 - 1e-12), method="bounded",
                            options={"xatol": 1e-13}).x
        z, p = paired_noninferiority(b, c, n, margin)
        assert z == pytest.approx((b - c - n * t) / (n * (2 * q + t * (1 - t))) ** 0.5, rel=1e-6)
        assert 0 < p < 1
    assert paired_noninferiority(0, 0, 300, 0.01)[1] < 0.05 < paired_noninferiority(0, 0, 200, 0.01)[1]


# --- the CLI end to end on the digits -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def champion_run(tmp_path_factory):
    """A weak champion: 3 epochs on 10 digits per class, validated on 10 others per class; and the traffic."""
    root = tmp_path_factory.mktemp("retrain")
    x, y = digits_tensors("all", size=32, channels=3)
    data, traffic = root / "digits", []
    for c in range(10):
        members = (y == c).nonzero().flatten().tolist()
        (data / str(c)).mkdir(parents=True)
        for i in members[:ORIGINAL_PER_CLASS]:
            (data / str(c) / f"{i:04d}.png").write_bytes(png(x[i]))
        traffic += [(i, c, png(x[i])) for i in members[ORIGINAL_PER_CLASS:ORIGINAL_PER_CLASS + TRAFFIC_PER_CLASS]]
    run = root / "v1"
    train(load_recipe("demo", [*FAST, "model.width=0.125", "data.dataset=folder", f"data.path={data}",
                               "data.val_fraction=0.5", "schedule.epochs=3"]), run, progress=False)
    return run, data, traffic


@pytest.fixture
def world(champion_run, tmp_path, monkeypatch):
    """A fresh registry with the champion as version 1, and a store with the traffic reviewed (true labels)."""
    run, data, traffic = champion_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    assert main(["registry", "register", str(run), "--name", "digits", "--tracking-uri", uri]) == 0
    return {"uri": uri, "data": data, "traffic": traffic, "url": f"sqlite:///{tmp_path / 'store.db'}",
            "kept": tmp_path / "kept", "out": tmp_path / "retrain"}


def review_traffic(world: dict, shift: int = 0) -> None:
    """Every traffic image served by version 1 and reviewed; ``shift``: the reviewer's label is off by that much."""
    preds, labs = [], []
    for k, (i, c, data) in enumerate(world["traffic"]):
        sha, path = keep(world["kept"], data)
        preds.append(prediction(f"r{i}", sha, path, str((c + 5) % 10)))  # the model's answer: never a label
        labs.append(label(f"r{i}", str((c + shift) % 10), k))
    plant(world["url"], preds, labs, world["kept"])


def retrain(world: dict, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["retrain", "--from", "digits@champion", "--store", world["url"], "--data", str(world["data"]),
                 "--out", str(world["out"]), "--tracking-uri", world["uri"], "--epochs", "3", "--no-progress",
                 "--set", *FAST, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model("digits").aliases.items()}


def test_cli_a_retrained_model_that_passes_becomes_challenger_with_lineage(world, capsys):
    review_traffic(world)
    code, out, err = retrain(world, capsys)
    assert code == 0, out + err
    client = open_registry(world["uri"])
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    v2 = client.get_model_version("digits", "2")
    assert v2.tags["parent"] == "1" and v2.tags["gate"].startswith("passed: ")
    assert v2.tags["retrained_from"] == "digits@champion"
    assert v2.tags["checkpoint"] == str(world["out"] / "train" / "best.safetensors")
    gate = json.loads((world["out"] / "gate.json").read_text())
    assert gate["passed"] and gate["reason"] == v2.tags["gate"]
    val, held = gate["original_val"], gate["reviewed_holdout"]
    assert val["n"] == 100 and held["n"] == 90  # 10 validation images per class; 30 % of 300 reviewed held out
    assert held["candidate"]["accuracy"] > held["champion"]["accuracy"] and held["p"] < 0.05
    assert gate["reviewed"]["exported"] == 300 and gate["data"]["reviewed_train"] == 210
    # the validation images are the champion's own, never trained on
    tree = world["out"] / "data"
    val_files = {p.resolve() for p in (tree / "val").rglob("*.png")}
    train_files = {p.resolve() for p in (tree / "train").rglob("*.png")}
    assert len(val_files) == 100 and not val_files & train_files
    assert len(list((tree / "train").rglob("reviewed-*.png"))) == 3 * 210  # --reviewed-weight 3: repetition
    assert "gate passed: " in out and "registered digits version 2 as challenger, parent version 1" in out
    assert json.loads((world["out"] / "registered.json").read_text())["version"] == "2"


def test_cli_mislabelled_reviews_fail_the_gate_register_the_reason_and_alias_nothing(world, capsys):
    review_traffic(world, shift=1)
    code, out, err = retrain(world, capsys)
    assert code == 3, out + err
    client = open_registry(world["uri"])
    assert aliases(client) == {"champion": "1"}
    v2 = client.get_model_version("digits", "2")
    assert v2.tags["parent"] == "1" and v2.tags["gate"].startswith("failed: ")
    assert "original validation images" in v2.tags["gate"]
    gate = json.loads((world["out"] / "gate.json").read_text())
    assert not gate["passed"] and not gate["original_val"]["passed"]
    assert "registered digits version 2 without an alias (the gate failed)" in out


def test_cli_resumes_after_an_interruption_and_registers_once(world, capsys, monkeypatch):
    review_traffic(world)
    real = retrain_evaluate.paired_answers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrain_evaluate, "paired_answers", interrupted)
    code, out, err = retrain(world, capsys)
    assert code == 130 and "interrupted" in err
    checkpoint = world["out"] / "train" / "best.safetensors"
    trained_at = checkpoint.stat().st_mtime_ns
    assert not (world["out"] / "gate.json").exists()
    # reviews arriving meanwhile do not change a run that has exported already
    plant(world["url"], [prediction("late", "f" * 64, None, "1")], [label("late", "1", 999)])

    monkeypatch.setattr(retrain_evaluate, "paired_answers", real)
    code, out, err = retrain(world, capsys)
    assert code == 0, out + err
    assert "1 export: done before" in out and "4 train: done before" in out and "(resuming)" in out
    assert checkpoint.stat().st_mtime_ns == trained_at  # not trained again
    assert json.loads((world["out"] / "gate.json").read_text())["reviewed"]["labelled_inputs"] == 300

    (world["out"] / "registered.json").unlink()  # even without its record, the same run registers once
    code, out, _ = retrain(world, capsys)
    assert code == 0 and "registered digits version 2 as challenger" in out
    code, out, _ = retrain(world, capsys)
    assert code == 0 and "already registered digits version 2" in out
    client = open_registry(world["uri"])
    assert sorted(int(mv.version) for mv in client.search_model_versions("name='digits'")) == [1, 2]

    code, _, err = retrain(world, capsys, "optim.lr=0.5")  # other settings: refused, one line
    assert code == 2 and "was started with other settings" in err and len(err.strip().splitlines()) == 1


def test_cli_with_too_few_reviews_trains_and_registers_nothing(world, capsys):
    world["traffic"] = world["traffic"][:5]
    review_traffic(world)
    code, out, _ = retrain(world, capsys)
    assert code == 4 and "not enough reviewed samples" in out
    assert not (world["out"] / "train").exists()
    assert aliases(open_registry(world["uri"])) == {"champion": "1"}
