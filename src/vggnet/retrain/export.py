"""Step 1: the reviewed samples out of the prediction store, as an ImageFolder of the crops the network saw.

One sample per input (deduplicated by the SHA-256 the server stored for the request's image: the same image sent
twice, or reviewed twice, trains once), labelled with what a person said, never with what the model answered: the
latest reviewer label wins (a reviewer may correct an earlier one); a client's own report (``source = 'user'``) only
with ``include_user`` and only where no reviewer labelled the image, since reports are biased towards answers a
user disliked. "None of these" (a null label) and classes the model does not know are left out and counted; so is
an image whose crop was not kept (``--keep-inputs`` off, full, or purged), each listed in the manifest.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from vggnet.atomic import atomic_dir, write_json
from vggnet.errors import UsageError
from vggnet.store import KEEP_INPUTS, read_setting, safe_url
from vggnet.store.schema import labels, predictions
from vggnet.store.writer import utc

__all__ = ["MANIFEST", "ReviewedSample", "export_reviewed", "find_inputs", "reviewed_samples"]

MANIFEST = "manifest.json"
#: a kept crop's path relative to the --keep-inputs folder (serve.keep): nothing else is ever opened
KEPT_PATH = re.compile(r"^([0-9a-f]{2})/\1[0-9a-f]{62}\.png$")
LISTED = 200  # rows listed by name in the manifest per reason at most (all are counted)


@dataclass
class ReviewedSample:
    """One distinct input with the label a person gave it, and where its kept crop is."""

    sha256: str
    label: str | None
    source: str
    who: str
    labelled_at: datetime
    requests: list[tuple[str, int]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # input_path values, relative to the inputs folder
    answered: Counter = field(default_factory=Counter)  # what the served versions answered (reported, never used)


def find_inputs(engine: Engine, given: Path | None) -> Path:
    """The folder of the server's kept crops: ``given``, else the one the server recorded in the store."""
    if given is not None:
        if not Path(given).is_dir():
            raise UsageError(f"--inputs {given}: no such folder (the server's --keep-inputs folder)")
        return Path(given).resolve()
    recorded = read_setting(engine, KEEP_INPUTS)
    if recorded is None:
        raise UsageError(f"the store {safe_url(engine.url)} records no kept-inputs folder (no server with "
                         "--keep-inputs has used it): pass --inputs DIR, the server's --keep-inputs folder")
    if not Path(recorded).is_dir():
        raise UsageError(f"the server keeps its inputs in {recorded} (recorded in the store), which is not a folder "
                         "on this machine: mount it there or pass --inputs DIR")
    return Path(recorded)


def _label_rows(engine: Engine, model: str, sources: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(labels, the predictions they label) of ``model``; only rows that carry a label are read."""
    lab, pred = labels.c, predictions.c
    labelled = sa.exists().where((lab.request_id == pred.request_id) & (lab.item == pred.item)
                                 & (lab.model == pred.model) & lab.source.in_(list(sources)))
    label_query = (sa.select(lab.pk, lab.request_id, lab.item, lab.label, lab.source, lab.who, lab.created_at)
                   .where((lab.model == model) & lab.source.in_(list(sources))).order_by(lab.created_at, lab.pk))
    pred_query = (sa.select(pred.request_id, pred.item, pred.input_sha256, pred.input_path, pred.role,
                            pred.version, pred.predicted)
                  .where((pred.model == model) & labelled).order_by(pred.created_at, pred.pk))
    with engine.connect() as connection:
        return ([dict(r._mapping) for r in connection.execute(label_query)],
                [dict(r._mapping) for r in connection.execute(pred_query)])


def reviewed_samples(engine: Engine, model: str, include_user: bool = False) -> tuple[list[ReviewedSample], int]:
    """One :class:`ReviewedSample` per distinct input that a person labelled, oldest label first; and the number
    of labels whose prediction the store no longer holds (purged)."""
    sources = ("review", "user") if include_user else ("review",)
    label_rows, pred_rows = _label_rows(engine, model, sources)
    by_key: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in pred_rows:
        by_key[(row["request_id"], row["item"])].append(row)
    best: dict[str, tuple[tuple, dict]] = {}
    requests: dict[str, set] = defaultdict(set)
    orphans = 0
    for row in label_rows:
        key = (row["request_id"], row["item"])
        rows = by_key.get(key)
        if not rows:
            orphans += 1
            continue
        digest = next((r["input_sha256"] for r in rows if r["input_sha256"]), None) or f"request:{key[0]}:{key[1]}"
        requests[digest].add(key)
        # a reviewer's label beats any client report; among equals, the latest (then the last written) wins
        rank = (row["source"] == "review", row["created_at"], row["pk"])
        if digest not in best or rank > best[digest][0]:
            best[digest] = (rank, row)
    samples = []
    for digest, (_, row) in best.items():
        keys = sorted(requests[digest])
        rows = [r for k in keys for r in by_key[k]]
        sample = ReviewedSample(digest, row["label"], row["source"], row["who"], utc(row["created_at"]), keys,
                                sorted({r["input_path"] for r in rows if r["input_path"]}),
                                Counter(r["predicted"] for r in rows if r["role"] == "served"))
        samples.append(sample)
    samples.sort(key=lambda s: (s.labelled_at, s.sha256))
    return samples, orphans


def _kept_file(inputs: Path, sample: ReviewedSample) -> tuple[Path | None, str]:
    """The sample's kept crop, or None and why not."""
    if not sample.kept:
        return None, "not kept (the server kept no crop for it)"
    for relative in sample.kept:
        if KEPT_PATH.match(relative) and (inputs / relative).is_file():
            return inputs / relative, ""
    return None, f"kept file missing: {sample.kept[0]}"


def _readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - any decoder error: the file is left out and counted
        return False


def _note(listed: list[dict], sample: ReviewedSample, why: str) -> None:
    if len(listed) < LISTED:
        request_id, item = sample.requests[0]
        listed.append({"sha256": sample.sha256, "request_id": request_id, "item": item, "label": sample.label,
                       "why": why})


def export_reviewed(engine: Engine, model: str, classes: Sequence[str], inputs: Path, out: Path,
                    include_user: bool = False) -> dict[str, Any]:
    """Write ``out/<class>/<sha256>.png`` for every usable reviewed sample and ``out/manifest.json`` (what went in,
    what was left out and why); the folder appears whole or not at all. Returns the manifest."""
    samples, orphans = reviewed_samples(engine, model, include_user)
    known = set(classes)
    kept, not_kept, none_of_these = [], [], []
    unknown: Counter = Counter()
    answered_wrong = 0
    with atomic_dir(out) as tmp:
        for sample in samples:
            if sample.label is None:
                _note(none_of_these, sample, "none of these (no class of the model)")
                continue
            if sample.label not in known:
                unknown[sample.label] += 1
                continue
            file, why = _kept_file(inputs, sample)
            if file is None or not _readable(file):
                _note(not_kept, sample, why or f"unreadable kept file: {file}")
                continue
            target = Path(sample.label) / f"{sample.sha256}.png"
            (tmp / sample.label).mkdir(exist_ok=True)
            shutil.copyfile(file, tmp / target)
            wrong = sum(n for answer, n in sample.answered.items() if answer != sample.label)
            answered_wrong += wrong > 0
            kept.append({"sha256": sample.sha256, "label": sample.label, "file": target.as_posix(),
                         "source": sample.source, "who": sample.who, "labelled_at": sample.labelled_at.isoformat(),
                         "requests": len(sample.requests), "answered": dict(sample.answered)})
        dropped_none = sum(1 for s in samples if s.label is None)
        dropped_missing = sum(1 for s in samples if s.label in known) - len(kept)
        manifest = {
            "store": safe_url(engine.url), "model": model, "inputs": str(inputs), "sources": sorted(
                ("review", "user") if include_user else ("review",)), "classes": list(classes),
            "counts": {"labelled_inputs": len(samples), "exported": len(kept), "none_of_these": dropped_none,
                       "unknown_class": sum(unknown.values()), "not_kept": dropped_missing,
                       "labels_without_prediction": orphans, "answered_wrong": answered_wrong},
            "unknown_classes": dict(sorted(unknown.items())),
            "not_kept": not_kept, "none_of_these": none_of_these,
            "samples": kept,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest
