"""Linear models on saved features: the paper's Appendix B protocol.

Simonyan & Zisserman transfer their nets by training a linear SVM on L2-normalised 4096-D descriptors, with
the SVM's C picked by cross-validation on the training images only; the test images are touched once, at
the end, so the reported accuracy is not tuned on them. A logistic regression is offered beside the SVM
because its calibrated scores are the usual probe baseline. VOC results are given as mAP, so both models
report it (one-vs-rest average precision) alongside accuracy.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vggnet.atomic import write_bytes
from vggnet.errors import UsageError

from .store import SPLITS, FeatureFile, FeatureFileError, load_features

MODELS = ("svm", "logreg")
MODEL_NAMES = {"svm": "linear SVM", "logreg": "logistic regression"}
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))  # unit-length features often want a large C
TEST_SPLITS = ("all", *SPLITS)  # rows of a --test file to score; "all" by default

__all__ = ["DEFAULT_C_GRID", "MODELS", "TEST_SPLITS", "markdown_table", "probe", "probe_files", "write_report"]


def _check_compatible(train: FeatureFile, test: FeatureFile) -> None:
    """Features from different layers, scales or networks live in different spaces: a model fitted on one
    and scored on the other gives a number that means nothing, so refuse rather than report it."""
    held = f"train holds {train.describe()}; test holds {test.describe()}"
    if len(train.labels) == 0 or len(test.labels) == 0:
        which = "train" if len(train.labels) == 0 else "test"
        raise FeatureFileError(f"the {which} features are empty ({held})")
    for what, a, b in (("layers", train.layer, test.layer), ("dims", train.dim, test.dim),
                       ("scales", train.scales, test.scales), ("stack settings", train.stack, test.stack),
                       ("models", train.model, test.model)):
        if a != b:
            raise FeatureFileError(f"train and test features come from different {what} ({a!r} vs {b!r}): "
                                   f"{held}; extract both with the same settings")
    if train.fingerprint and test.fingerprint and train.fingerprint != test.fingerprint:
        raise FeatureFileError(f"train and test features come from different weights (fingerprints "
                               f"{train.fingerprint} vs {test.fingerprint}; files {train.source} and {test.source}): "
                               f"{held}; extract both with the same network")
    if train.classes != test.classes:
        raise FeatureFileError(f"train and test have different class lists ({train.classes} vs {test.classes}); "
                               f"labels would not mean the same thing")
    present = np.unique(train.labels)
    if len(present) < 2:
        raise FeatureFileError(f"the training features hold {len(present)} class; a classifier needs at least 2")


def _estimator(name: str, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if name == "svm":
        return LinearSVC(max_iter=20000, random_state=seed)
    return LogisticRegression(max_iter=5000, random_state=seed)


def _scores(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """One column per class of the file's list, so AP lines up with class names even when the training rows
    lack a class (its column is then below every real score: the model cannot rank it first)."""
    raw = model.predict_proba(x) if hasattr(model, "predict_proba") else model.decision_function(x)
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1:  # binary: one margin, positive for classes_[1]
        raw = np.stack([-raw, raw], axis=1)
    out = np.full((len(x), n_classes), raw.min() - 1.0)
    out[:, model.classes_] = raw
    return out


def _fit_one(name: str, train: FeatureFile, test: FeatureFile, c_grid: Sequence[float], folds: int,
             seed: int) -> dict[str, Any]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import average_precision_score, confusion_matrix
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    start = time.perf_counter()
    n_classes = len(train.classes)
    smallest = int(np.bincount(train.labels)[np.unique(train.labels)].min())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if smallest < 2:  # a class with one image cannot be in both a fold's train and test part
            model = _estimator(name, seed).set_params(C=1.0).fit(train.features, train.labels)
            c, cv_acc, chosen_by = 1.0, None, "default (a class has < 2 training images)"
        else:
            k = min(folds, smallest)
            cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            search = GridSearchCV(_estimator(name, seed), {"C": list(c_grid)}, cv=cv, scoring="accuracy")
            search.fit(train.features, train.labels)
            model = search.best_estimator_
            c, cv_acc = float(search.best_params_["C"]), 100.0 * float(search.best_score_)
            chosen_by = f"{k}-fold cross-validation on the training features"
    notes = sorted({str(w.message).splitlines()[0] for w in caught if issubclass(w.category, ConvergenceWarning)})
    for w in caught:  # only convergence notes go into the report; anything else is shown as usual
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    pred = model.predict(test.features)
    scores = _scores(model, test.features, n_classes)
    y = test.labels
    per_class, ap = {}, {}
    for i, cls in enumerate(train.classes):
        mask = y == i
        per_class[cls] = 100.0 * float(np.mean(pred[mask] == i)) if mask.any() else None
        ap[cls] = 100.0 * float(average_precision_score(mask, scores[:, i])) if mask.any() else None
    defined = [v for v in ap.values() if v is not None]  # AP needs a positive test image to exist
    return {
        "model": MODEL_NAMES[name], "C": c, "c_chosen_by": chosen_by, "c_grid": [float(v) for v in c_grid],
        "cv_accuracy": cv_acc, "accuracy": 100.0 * float(np.mean(pred == y)), "per_class_accuracy": per_class,
        "mAP": float(np.mean(defined)), "average_precision": ap,
        "confusion": confusion_matrix(y, pred, labels=range(n_classes)).tolist(),
        "warnings": notes, "seconds": time.perf_counter() - start,
    }


def probe(train: FeatureFile, test: FeatureFile, *, models: Sequence[str] = MODELS,
          c_grid: Sequence[float] | None = None, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Fit each linear model on ``train`` (C by cross-validation there) and score it once on ``test``.

    Returns ``{"n_train", "n_test", "classes", "features", "dim", "results": {name: metrics}}``, percentages
    throughout; a class without test images has ``None`` accuracy and AP and is left out of the mAP.
    """
    models = list(models)
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown:
        raise UsageError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    grid = list(DEFAULT_C_GRID if c_grid is None else c_grid)
    if not grid or any(not np.isfinite(c) or c <= 0 for c in grid):
        raise UsageError(f"the C grid must be positive numbers, got {grid}")
    if folds < 2:
        raise UsageError(f"cross-validation needs at least 2 folds, got {folds}")
    _check_compatible(train, test)
    return {
        "n_train": len(train.labels), "n_test": len(test.labels), "classes": list(train.classes),
        "features": train.describe(), "dim": train.dim, "folds": folds, "seed": seed,
        "results": {name: _fit_one(name, train, test, grid, folds, seed) for name in models},
    }


def _rows_text(split: str, part: FeatureFile, whole: FeatureFile) -> str:
    """How many rows of which split, out of the file's: so a restricted test (500 of 5,000) cannot pass unseen."""
    total = len(whole.labels)
    return f"all {total} rows" if split == "all" else f"{len(part.labels)} {split} rows of {total}"


def _same_file_rows(ff: FeatureFile, path: str | os.PathLike, named_test: bool,
                    test_split: str | None) -> tuple[str, str]:
    """One file both fits and tests: its train rows fit, its val rows test, and nothing else is allowed,
    because any other choice would score the model on images it was fitted on."""
    if test_split not in (None, "val"):
        raise UsageError(f"--test-split {test_split} would test on the images --train fits on ({path} is both); "
                         f"{'pass a separate --test file' if named_test else 'pass --test FILE'}, or leave "
                         f"--test-split at val")
    for name in ("train", "val"):
        if not (ff.split == name).any():
            if named_test:
                raise FeatureFileError(f"{path} has no {name} rows, so --train and --test would be the same "
                                       f"images; pass a separate --test file")
            raise FeatureFileError(f"{path} has no {name} rows; pass --test with a second features file, or "
                                   f"extract with both splits (train and val)")
    return "train", "val"


def probe_files(train_path: str | os.PathLike, test_path: str | os.PathLike | None = None,
                test_split: str | None = None, **kwargs: Any) -> tuple[dict[str, Any], FeatureFile, FeatureFile]:
    """:func:`probe` on files from ``vggnet features``.

    Alone, the file's train rows fit and its val rows test. With ``test_path`` the train file's train rows
    (all when it marks none) fit, and every row of the test file is tested: a test file is usually the
    features of a test folder, whose default 10 % val split means nothing here. ``test_split`` ("val" or
    "train") restricts the test file to the rows ``vggnet features`` marked so; "all" is the default.
    """
    if test_split is not None and test_split not in TEST_SPLITS:
        raise UsageError(f"test split must be one of {', '.join(TEST_SPLITS)}, got {test_split!r}")
    train_ff = load_features(train_path)
    if test_path is None or Path(train_path).resolve() == Path(test_path).resolve():
        test_ff = train_ff
        train_split, test_split = _same_file_rows(train_ff, train_path, test_path is not None, test_split)
    else:
        test_ff = load_features(test_path)
        train_split = "train" if (train_ff.split == "train").any() else "all"
        test_split = test_split or "all"
        if test_split != "all" and not (test_ff.split == test_split).any():
            held = ", ".join(f"{int((test_ff.split == s).sum())} {s}" for s in SPLITS)
            raise FeatureFileError(f"{test_path} has no {test_split} rows (it holds {held}); "
                                   f"--test-split all tests every row")
    train = train_ff if train_split == "all" else train_ff.subset(train_split)
    test = test_ff if test_split == "all" else test_ff.subset(test_split)
    report = probe(train, test, **kwargs)
    rows = {"train_file": str(train_path), "train_split": train_split,
            "train_rows": _rows_text(train_split, train, train_ff), "test_file": str(test_path or train_path),
            "test_split": test_split, "test_rows": _rows_text(test_split, test, test_ff),
            "shared_paths": len(set(train.paths) & set(test.paths))}
    return {**rows, **report}, train, test


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _source(report: dict[str, Any], part: str) -> str:
    if part + "_file" in report:
        return f"{report[part + '_file']}, {report[part + '_rows']}"
    return f"{report['n_' + part]} images"


def _count_header(report: dict[str, Any], part: str) -> str:
    """``n test (val rows)``: the table itself says which rows were counted, wherever it is pasted."""
    split = report.get(part + "_split")
    return f"n {part}" if split is None else f"n {part} ({split} rows)"


def markdown_table(report: dict[str, Any]) -> str:
    lines = [f"| model | C | CV acc (%) | test acc (%) | mAP (%) | {_count_header(report, 'train')} "
             f"| {_count_header(report, 'test')} |", "|---|---|---|---|---|---|---|"]
    for r in report["results"].values():
        lines.append(f"| {r['model']} | {r['C']:g} | {_fmt(r['cv_accuracy'])} | {_fmt(r['accuracy'])} "
                     f"| {_fmt(r['mAP'])} | {report['n_train']} | {report['n_test']} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``probe.json``, ``probe.md`` and ``confusion_<model>.png``, each atomically. Everything is
    rendered in memory first, so a failed plot leaves the previous report (or none), not half."""
    from vggnet.plots import plot_confusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "probe.json": (json.dumps(report, indent=2) + "\n").encode(),
        "probe.md": (f"# vggnet probe\n\nfeatures: {report['features']}  \ntrain: {_source(report, 'train')}  \n"
                     f"test: {_source(report, 'test')}\n\n{markdown_table(report)}\n").encode(),
    }
    for name, r in report["results"].items():
        png = io.BytesIO()
        plot_confusion(r["confusion"], report["classes"], png,
                       title=f"{r['model']} (C={r['C']:g}): test acc {_fmt(r['accuracy'])}%")
        files[f"confusion_{name}.png"] = png.getvalue()
    written = [write_bytes(out / name, data) for name, data in sorted(files.items())]
    for name in set(MODELS) - set(report["results"]):  # a stale plot would pass for this run's
        (out / f"confusion_{name}.png").unlink(missing_ok=True)
    return written
