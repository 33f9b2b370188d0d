"""Drift (issue 30, part 4): PSI against hand-computed values, the bounded window, and end to end on the digits:
a trained demo model, its reference written by `vggnet monitor reference`, served; held-out digits keep every
drift score below the alert threshold, noise and CIFAR photos push it far above. Plus the deploy/ files: the rules
parse with the structure Prometheus wants, and every metric they and the dashboard name is on a running /metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from serve_helpers import metric_samples
from vggnet import store
from vggnet.cli import main
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train
from vggnet.evaluate.sources import eval_images
from vggnet.infer import reference
from vggnet.serve import ModelRepository, ServeSettings, create_app
from vggnet.serve.drift import DriftMonitor

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
# the demo recipe shrunk (as tests/test_compress.py does), half the digits held out: the reference is measured on
# every other validation image, the other half is in-domain traffic that neither training nor the reference saw
FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "schedule.epochs=3",
        "data.val_fraction=0.5"]
N = 400  # predictions sent per kind of traffic (a multiple of drift_every: the last score covers them all)


# ---- the statistic ------------------------------------------------------------------------------------------------

def test_psi_against_hand_computed_values():
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5) = 0.4 ln 1.8 + 0.4 ln 5
    assert reference.psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5), abs=1e-12)
    assert reference.psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.878890, abs=1e-6)
    # a share moved from the third bin to the first: 0.25 ln 2 + 0 + 0.25 ln 2
    assert reference.psi([0.25, 0.25, 0.5], [0.5, 0.25, 0.25]) == pytest.approx(0.5 * math.log(2), abs=1e-12)
    assert reference.psi([0.1, 0.2, 0.7], [0.1, 0.2, 0.7]) == 0.0
    assert reference.psi([0.3, 0.7], [0.6, 0.4]) == pytest.approx(reference.psi([0.6, 0.4], [0.3, 0.7]))  # symmetric
    # Jeffreys' half count: an empty bin gets 0.5 / (n + 0.5 bins), never a zero share
    np.testing.assert_allclose(reference.smoothed([0, 1]), [0.25, 0.75])
    np.testing.assert_allclose(reference.smoothed([3, 0, 1], prior=0.0), [0.75, 0.0, 0.25])
    with pytest.raises(ValueError, match="same bins"):
        reference.psi([0.5, 0.5], [1.0])


def test_reference_bins_are_the_deciles_and_the_bin_rule_is_shared():
    rng = np.random.default_rng(0)
    values = {"class": rng.integers(0, 3, 1000), "confidence": rng.random(1000),
              "input_mean": rng.normal(0, 1, 1000), "input_std": rng.normal(1, 0.1, 1000)}
    ref = reference.build_reference(values, ["a", "b", "c"], "test")
    assert ref["signals"]["class"]["counts"] == np.bincount(values["class"], minlength=3).tolist()
    for name in ("confidence", "input_mean", "input_std"):
        sig = ref["signals"][name]
        assert len(sig["edges"]) == 9 and sum(sig["counts"]) == 1000
        assert all(c == 100 for c in sig["counts"])  # every decile bin holds a tenth of the reference
    tied = reference.build_reference({**values, "confidence": np.ones(1000)}, ["a", "b", "c"], "test")
    assert tied["signals"]["confidence"]["edges"] == [1.0]  # ties at the quantiles: fewer bins, never empty edges
    assert tied["signals"]["confidence"]["counts"] == [0, 1000]


def _monitor(window: int, every: int = 1, min_window: int = 1) -> DriftMonitor:
    sig = {"kind": "binned", "edges": [0.0], "counts": [50, 50]}
    ref = {"signals": {"class": {"kind": "categorical", "labels": ["a", "b"], "counts": [50, 50]},
                       "confidence": sig, "input_mean": sig, "input_std": sig}}
    return DriftMonitor(ref, window=window, every=every, min_window=min_window)


def test_the_window_slides_with_bounded_memory_and_scores_what_it_holds():
    m = _monitor(window=4)
    for value in (-1, -1, -1, -1, 1, 1, 1):  # four in bin 0, then three in bin 1 push three of them out
        m.observe(0 if value < 0 else 1, value, value, value)
    assert m.held == 4 and m._ring.shape == (4, 4)
    counts = m._counts[1].tolist()
    assert counts == [1, 3]  # the last four: one -1, three +1
    expected = reference.psi(reference.smoothed([50, 50]), reference.smoothed([1, 3]))
    assert m.scores == pytest.approx(dict.fromkeys(reference.SIGNALS, expected))
    assert not m.observe(7, 0.5, 0.0, 0.0)  # a class the reference does not know: ignored, not an IndexError


def test_scores_wait_for_min_window_then_every_k():
    m = _monitor(window=100, every=10, min_window=30)
    recomputed = [m.observe(0, 1.0, 1.0, 1.0) for _ in range(60)]
    assert [i + 1 for i, r in enumerate(recomputed) if r] == [30, 40, 50, 60]


# ---- end to end on the digits -------------------------------------------------------------------------------------

def _png(image) -> bytes:
    """PNG bytes (lossless: the server sees exactly these pixels) of a uint8 H×W×3 array or 3×H×W tensor."""
    buf = io.BytesIO()
    pixels = image if isinstance(image, np.ndarray) else image.permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _cifar(n: int) -> list[bytes]:
    """The archive's first ``n`` JPEGs (in archive order: airplanes), read without listing all 50,000."""
    out = []
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                out.append(tar.extractfile(member).read())
                if len(out) == n:
                    return out
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained demo run (3 epochs, about 97 % top-1) with drift.json and ood.json from every other validation
    image (``--limit``), and the held-out other half as PNG bytes."""
    out = tmp_path_factory.mktemp("drift") / "run"
    train(load_recipe("demo", FAST), out, progress=False)
    val, _, _ = eval_images(out, None, "val")
    assert main(["monitor", "reference", "--ckpt", str(out), "--limit", str(len(val) // 2)]) == 0
    used = {hashlib.sha256(t.numpy().tobytes()).digest() for t in eval_images(out, None, "val",
                                                                                limit=len(val) // 2)[0]}
    held_out = [_png(t) for t in val if hashlib.sha256(t.numpy().tobytes()).digest() not in used]
    assert len(held_out) >= N
    return out, held_out[:N]


def _served(ckpt: Path, images: list[bytes], **settings) -> tuple[dict[str, float], list]:
    app = create_app(ModelRepository.from_checkpoints([ckpt], ["digits"]),
                     ServeSettings(load_in_background=False, access_log=False, prediction_log=False, **settings))
    with TestClient(app) as c:
        for data in images:
            media = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
            assert c.post("/predict", content=data, headers={"Content-Type": media}).status_code == 200
        samples = metric_samples(c.get("/metrics").text)
    scores = {s.labels["signal"]: s.value for s in samples if s.name == "vggnet_drift_score"}
    return scores, samples


def test_digits_stay_below_the_alert_and_foreign_images_go_far_above(run, tmp_path):
    folder, held_out = run
    ckpt = folder / "best.safetensors"
    ref = json.loads((folder / "drift.json").read_text())
    assert ref["statistic"] == "psi" and ref["accuracy"] > 0.85 and set(ref["signals"]) == set(reference.SIGNALS)
    assert json.loads((folder / "ood.json").read_text())["signal"] == "max_softmax"
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    rng = np.random.default_rng(0)
    kinds = {"held-out digits": held_out,
             "uniform noise": [_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                               for _ in range(N)],
             "CIFAR-10 photos": _cifar(N)}
    measured = {}
    for kind, images in kinds.items():
        scores, samples = _served(ckpt, images, **({"store": url} if kind == "held-out digits" else {}))
        window = [s.value for s in samples if s.name == "vggnet_drift_window"]
        flagged = sum(s.value for s in samples if s.name == "vggnet_ood_predictions_total")
        assert window == [N] and set(scores) == set(reference.SIGNALS), kind
        measured[kind] = {**{k: round(v, 3) for k, v in scores.items()}, "ood_flagged": int(flagged)}
    # measured (3 epochs, seed fixed): digits <= 0.05 per signal; noise and CIFAR 2.2 to 5.9
    assert max(v for k, v in measured["held-out digits"].items() if k != "ood_flagged") < reference.WARN, measured
    for kind in ("uniform noise", "CIFAR-10 photos"):
        assert max(v for k, v in measured[kind].items() if k != "ood_flagged") > reference.ALERT, measured
    engine = store.connect(url)
    rows = store.read_predictions(engine)
    engine.dispose()
    assert len(rows) == N and all(r["ood_score"] == pytest.approx(r["confidence"]) for r in rows)


def test_a_version_without_drift_json_exports_no_score_and_a_stale_one_is_refused(run, tmp_path):
    folder, held_out = run
    bare = tmp_path / "bare" / "best.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((folder / "best.safetensors").read_bytes())
    scores, samples = _served(bare, held_out[:120], drift_min_window=10)
    assert scores == {} and not any(s.name == "vggnet_drift_window" for s in samples)
    stale = json.loads((folder / "drift.json").read_text())
    stale["signals"]["class"]["labels"] = ["a", "b"]
    stale["signals"]["class"]["counts"] = [1, 1]
    (bare.parent / "drift.json").write_text(json.dumps(stale))
    assert _served(bare, held_out[:20], drift_min_window=10)[0] == {}


def test_reference_of_a_checkpoint_without_its_run_says_what_to_pass(run, tmp_path, capsys):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run[0] / "best.safetensors").read_bytes())
    assert main(["monitor", "reference", "--ckpt", str(lone)]) == 2
    assert "--data PATH" in capsys.readouterr().err
    assert not (tmp_path / "drift.json").exists() and not (tmp_path / "ood.json").exists()


# ---- deploy/: alert rules and dashboard against what the server exports --------------------------------------------

RULES = ROOT / "deploy" / "prometheus-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\bvggnet_[a-z0-9_]+")


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def test_rules_parse_with_the_structure_prometheus_expects():
    doc = yaml.safe_load(RULES.read_text())
    [group] = doc["groups"]
    assert group["name"] and group["rules"]
    names = [r["alert"] for r in group["rules"]]
    assert len(set(names)) == len(names)
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert isinstance(rule["expr"], str) and METRIC.search(rule["expr"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]) and rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    drift = [r for r in group["rules"] if "vggnet_drift_score" in r["expr"]]
    thresholds = {float(re.search(r">\s*([0-9.]+)\s*$", r["expr"]).group(1)) for r in drift}
    assert thresholds == {reference.WARN, reference.ALERT}  # the rules alert at the thresholds the code states
    exprs = " ".join(r["expr"] for r in group["rules"])
    for wanted in ("vggnet_http_request_duration_seconds_bucket", "vggnet_http_requests_total",
                   "vggnet_store_rows", "vggnet_ood_predictions_total"):
        assert wanted in exprs


def test_the_dashboard_has_the_panels_and_a_pointer_to_the_live_accuracy_report():
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for wanted in ("p95", "requests per second", "errors", "class distribution", "drift", "out-of-domain"):
        assert wanted in titles, wanted
    [text] = [p for p in dash["panels"] if p["type"] == "text"]
    assert "vggnet monitor report" in text["options"]["content"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_every_metric_the_rules_and_dashboard_name_is_exported(run, tmp_path):
    folder, held_out = run
    url = f"sqlite:///{tmp_path / 'm.db'}"
    _, samples = _served(folder / "best.safetensors", held_out[:110] + _cifar(40), store=url)
    exported = {s.name for s in samples}
    named = {m for expr in [r["expr"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]]
             + _dashboard_exprs() for m in METRIC.findall(expr)}
    assert len(named) >= 9
    assert named <= exported, sorted(named - exported)


def test_vggnet_train_writes_the_references_when_the_run_ends(tmp_path, capsys):
    """Issue #30: the reference is written at training time; --no-reference leaves it to `vggnet monitor reference`."""
    fast = ["--epochs", "1", "--set", "model.width=0.125", "train.threads=1", "train.tracking=none"]
    assert main(["train", "--recipe", "demo", "--out", str(tmp_path / "a"), *fast]) == 0
    out = capsys.readouterr().out
    assert "wrote drift.json and ood.json beside the checkpoint" in out and "(359 images)" in out
    ref = json.loads((tmp_path / "a" / "drift.json").read_text())
    assert ref["statistic"] == "psi" and set(ref["signals"]) == set(reference.SIGNALS)
    assert json.loads((tmp_path / "a" / "ood.json").read_text())["images"] == 359
    assert main(["train", "--recipe", "demo", "--out", str(tmp_path / "b"), *fast, "--no-reference"]) == 0
    assert not (tmp_path / "b" / "drift.json").exists() and not (tmp_path / "b" / "ood.json").exists()
