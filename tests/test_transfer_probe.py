"""``vggnet probe`` on synthetic features: separable blobs must be solved, random labels must not be."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vggnet.cli import main
from vggnet.errors import UsageError
from vggnet.transfer.probe import DEFAULT_C_GRID, TEST_SPLITS, probe, probe_files
from vggnet.transfer.store import FeatureFile, FeatureFileError, load_features, save_features

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["cat", "dog", "fox"]


def feature_file(x, y, classes=CLASSES, split="train", layer="fc7", scales=(224,), stack=False, model="vgg16",
                 fingerprint="") -> FeatureFile:
    split = [split] * len(y) if isinstance(split, str) else split
    return FeatureFile(features=x, labels=y, classes=list(classes), paths=[f"img{i}.png" for i in range(len(y))],
                       split=split, layer=layer, scales=list(scales), stack=stack, model=model, source="test",
                       fingerprint=fingerprint)


def blobs(per_class: int, n_classes: int = 3, dim: int = 16, seed: int = 0, spread: float = 0.05):
    """Tight clusters around far-apart unit centres, L2-normalised like real descriptors."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:n_classes]
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def both_splits(per_class: int = 30, n_classes: int = 3, **kw) -> FeatureFile:
    x, y = blobs(2 * per_class, n_classes, **kw)
    split = np.where(np.arange(len(y)) % 2 == 0, "train", "val")
    return feature_file(x, y, CLASSES[:n_classes] if n_classes <= 3 else [f"c{i}" for i in range(n_classes)],
                        split=split)


def test_separable_blobs_are_solved_by_both_models():
    ff = both_splits()
    report = probe(ff.subset("train"), ff.subset("val"))
    assert (report["n_train"], report["n_test"], report["dim"]) == (90, 90, 16)
    assert report["features"] == ff.describe()
    assert set(report["results"]) == {"svm", "logreg"}
    for r in report["results"].values():
        assert r["accuracy"] == 100.0 and r["mAP"] == pytest.approx(100.0)
        assert r["per_class_accuracy"] == {c: 100.0 for c in CLASSES}
        assert set(r["average_precision"]) == set(CLASSES)
        assert np.trace(r["confusion"]) == 90 and np.sum(r["confusion"]) == 90
        assert r["cv_accuracy"] == 100.0 and r["C"] in DEFAULT_C_GRID


def test_random_labels_stay_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(180, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 3, 180)
    report = probe(feature_file(x[:90], y[:90]), feature_file(x[90:], y[90:], split="val"))
    for r in report["results"].values():
        assert r["accuracy"] < 70 and r["mAP"] < 70


def test_c_is_chosen_by_cross_validation():
    """Two interleaved diagonal stripes: separable by y - x, but a near-zero C leaves only the class-mean
    direction (the y axis), which is wrong for most points; CV must pick the larger C although listed second."""
    rng = np.random.default_rng(0)

    def stripes(n):
        t = rng.uniform(-5, 5, 2 * n)
        y = np.repeat([0, 1], n)
        return np.stack([t, t + np.where(y == 1, 1.0, -1.0) + rng.normal(0, 0.05, 2 * n)], axis=1), y

    (xa, ya), (xb, yb) = stripes(30), stripes(30)
    train, test = feature_file(xa, ya, CLASSES[:2]), feature_file(xb, yb, CLASSES[:2], split="val")
    report = probe(train, test, c_grid=[1e-6, 1.0])
    for r in report["results"].values():
        assert r["C"] == 1.0 and r["cv_accuracy"] == 100.0 and r["accuracy"] == 100.0
        assert "cross-validation" in r["c_chosen_by"]
    tiny = probe(train, test, c_grid=[1e-6])  # the same data with the bad C alone: proves the data discriminates
    assert all(r["accuracy"] < 90 for r in tiny["results"].values())


def test_binary_case_uses_the_one_column_margin():
    ff = both_splits(20, n_classes=2)
    report = probe(ff.subset("train"), ff.subset("val"), models=["svm"])
    r = report["results"]["svm"]
    assert r["accuracy"] == 100.0 and r["mAP"] == pytest.approx(100.0)
    assert set(r["average_precision"]) == {"cat", "dog"}


def test_one_image_class_falls_back_to_default_c():
    x, y = blobs(5)
    keep = np.r_[0, 5:15]  # cat keeps 1 training image
    report = probe(feature_file(x[keep], y[keep]), feature_file(x, y, split="val"), models=["logreg"])
    r = report["results"]["logreg"]
    assert r["C"] == 1.0 and r["cv_accuracy"] is None and r["c_chosen_by"].startswith("default")


def test_file_without_labels_is_refused(tmp_path):
    path = tmp_path / "nolabels.npz"
    np.savez(path, features=np.zeros((4, 8), np.float32))
    with pytest.raises(FeatureFileError, match="labels"):
        probe_files(path)


@pytest.mark.parametrize(("change", "match"), [
    ({"layer": "pool5"}, "different layers"),
    ({"dim": 8}, "different dims"),
    ({"classes": ["cat", "dog", "owl"]}, "different class lists"),
    ({"scales": (256, 384)}, "different scales"),
    ({"model": "vgg19"}, "different models"),
])
def test_incompatible_files_are_refused(change, match):
    x, y = blobs(10)
    train = feature_file(x, y)
    x2 = x[:, : change.pop("dim")] if "dim" in change else x
    test = feature_file(x2, y, split="val", **change)
    with pytest.raises(FeatureFileError, match=match) as info:
        probe(train, test)
    assert "train holds" in str(info.value) or "class lists" in str(info.value)


def test_features_of_different_weights_are_refused(tmp_path):
    """Same architecture, layer and scales, but two networks (say ImageNet VGG-16 and a fine-tuned one)."""
    x, y = blobs(10)
    train = feature_file(x, y, fingerprint="aaaa")
    with pytest.raises(FeatureFileError, match="different weights"):
        probe(train, feature_file(x, y, split="val", fingerprint="bbbb"))
    assert probe(train, feature_file(x, y, split="val", fingerprint="aaaa"), models=["svm"])["n_test"] == 30
    save_features(train, tmp_path / "f.npz")  # and the fingerprint survives the file
    assert load_features(tmp_path / "f.npz").fingerprint == "aaaa"


def test_single_class_and_empty_are_refused():
    x, y = blobs(10)
    with pytest.raises(FeatureFileError, match="at least 2"):
        probe(feature_file(x[:10], y[:10]), feature_file(x, y, split="val"))
    with pytest.raises(FeatureFileError, match="empty"):
        probe(feature_file(x, y), feature_file(x[:0], y[:0], split="val"))


def test_single_file_needs_a_val_split(tmp_path):
    x, y = blobs(10)
    path = save_features(feature_file(x, y), tmp_path / "train_only.npz")
    with pytest.raises(FeatureFileError, match="--test"):
        probe_files(path)
    with pytest.raises(FeatureFileError, match="same images"):
        probe_files(path, path)


def test_train_and_test_files_take_their_own_splits(tmp_path):
    ff = both_splits(10)
    both = save_features(ff, tmp_path / "both.npz")
    report, train, test = probe_files(both, both, models=["svm"])  # --train f --test f: train rows vs val rows
    assert (set(train.split), set(test.split)) == ({"train"}, {"val"})
    other = save_features(feature_file(*blobs(4, seed=3), split="train"), tmp_path / "other.npz")
    report, train, test = probe_files(both, other, models=["svm"])  # no val rows: the whole test file
    assert (report["n_train"], report["n_test"]) == (30, 12)


def test_a_test_file_is_tested_whole_unless_restricted(tmp_path):
    """Issue #34: --test FILE scores every row of FILE, whatever split it carries; test_split picks some."""
    train = save_features(both_splits(10), tmp_path / "train.npz")
    x, y = blobs(8, seed=3)
    split = np.where(np.arange(len(y)) % 4 == 0, "val", "train")  # 6 val rows of 24, like a default split
    test = save_features(feature_file(x, y, split=split), tmp_path / "test.npz")
    report, _, tested = probe_files(train, test, models=["svm"])
    assert (report["n_train"], report["n_test"], len(tested.labels)) == (30, 24, 24)
    assert (report["train_split"], report["test_split"]) == ("train", "all")
    assert (report["train_rows"], report["test_rows"]) == ("30 train rows of 60", "all 24 rows")
    assert np.sum(report["results"]["svm"]["confusion"]) == 24
    for name, n in (("val", 6), ("train", 18), ("all", 24)):
        report, _, tested = probe_files(train, test, name, models=["svm"])
        expected = {"train", "val"} if name == "all" else {name}
        assert (report["n_test"], report["test_split"], set(tested.split)) == (n, name, expected)
        assert np.sum(report["results"]["svm"]["confusion"]) == n


def test_test_split_errors(tmp_path):
    both = save_features(both_splits(10), tmp_path / "both.npz")
    train_only = save_features(feature_file(*blobs(4, seed=3)), tmp_path / "train_only.npz")
    val_only = save_features(feature_file(*blobs(4, seed=3), split="val"), tmp_path / "val_only.npz")
    with pytest.raises(FeatureFileError, match=r"no val rows \(it holds 12 train, 0 val\).*--test-split all"):
        probe_files(both, train_only, "val")
    with pytest.raises(UsageError, match="test split must be one of all, train, val"):
        probe_files(both, train_only, "test")
    for test_path in (None, both):  # one file: anything but its val rows would test on the fitted images
        for name in ("all", "train"):
            with pytest.raises(UsageError, match=f"--test-split {name} would test on the images --train fits"):
                probe_files(both, test_path, name)
        assert probe_files(both, test_path, "val", models=["svm"])[0]["n_test"] == 30
    with pytest.raises(FeatureFileError, match="no train rows, so --train and --test would be the same images"):
        probe_files(val_only, val_only)
    assert TEST_SPLITS == ("all", "train", "val")


def test_cli_warns_when_tested_images_were_trained_on(tmp_path, capsys):
    """A --test file holding both splits of the folder --train came from: its train rows are training images."""
    ff = both_splits(10)
    train, copy = save_features(ff, tmp_path / "a.npz"), save_features(ff, tmp_path / "b.npz")
    assert main(["probe", "--train", str(train), "--test", str(copy), "--model", "svm"]) == 0
    captured = capsys.readouterr()
    assert "all 60 rows" in captured.out and "| 60 |" in captured.out
    assert "warning: 30 tested images are also training images" in captured.err
    assert main(["probe", "--train", str(train), "--test", str(copy), "--model", "svm", "--test-split", "val"]) == 0
    captured = capsys.readouterr()
    assert "30 val rows of 60" in captured.out and "also training images" not in captured.err


def test_cli_error_exits_2_with_message(tmp_path, capsys):
    x, y = blobs(10)
    a = save_features(feature_file(x, y), tmp_path / "a.npz")
    b = save_features(feature_file(x, y, split="val", layer="pool5"), tmp_path / "b.npz")
    assert main(["probe", "--train", str(a), "--test", str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vggnet probe: error:") and "different layers" in err and "fc7" in err


def test_cli_end_to_end(tmp_path, capsys):
    feats = save_features(both_splits(), tmp_path / "feats.npz")
    out_dir = tmp_path / "probe"
    assert main(["probe", "--train", str(feats), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "fc7" in out.splitlines()[0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["confusion_logreg.png", "confusion_svm.png",
                                                          "probe.json", "probe.md"]
    for name in ("confusion_svm.png", "confusion_logreg.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_SIGNATURE
    report = json.loads((out_dir / "probe.json").read_text())
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0][0].strip() == "model"
    table = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}
    assert set(table) == {"linear SVM", "logistic regression"}
    for r in report["results"].values():
        assert table[r["model"]] == [f"{r['C']:g}", f"{r['cv_accuracy']:.2f}", f"{r['accuracy']:.2f}",
                                     f"{r['mAP']:.2f}", "90", "90"]
    assert "| linear SVM |" in (out_dir / "probe.md").read_text()

    assert main(["probe", "--train", str(feats), "--model", "svm", "--folds", "3", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert list(parsed["results"]) == ["svm"] and parsed["results"]["svm"]["accuracy"] == 100.0


def test_cli_help_explains_the_protocol(capsys):
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = capsys.readouterr().out
    for phrase in ("vggnet features", "cross-validation", "mAP", "--train runs/demo/feats.npz", "--test-split",
                   "EVERY row of the test file"):
        assert phrase in text


def test_cli_test_split_choices_match_the_library():
    from vggnet.cli import probe as cli_probe

    assert cli_probe.TEST_SPLITS == TEST_SPLITS


def test_write_report_writes_nothing_when_a_plot_fails(tmp_path, monkeypatch):
    import vggnet.plots
    from vggnet.transfer.probe import write_report

    ff = both_splits(10)
    report = probe(ff.subset("train"), ff.subset("val"), models=["svm"])

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vggnet.plots, "plot_confusion", broken)
    with pytest.raises(RuntimeError):
        write_report(report, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
