"""Live accuracy per model version, from the prediction store, and the A/B verdict of each challenger.

Only the uniform random review sample measures accuracy: a prediction counts as *reviewed* when its request is in
the sample (any of its prediction rows has ``sampled`` set: the sample draws requests, so a shadow row on a sampled
request is in it too) and a person labelled it from the review queue (``source = 'review'``; the latest label per
request and item wins). Reviews of requests outside the sample (a reviewer opened one from a complaint) and the
clients' own reports (``source = 'user'``) are a biased sample: they are counted apart and never enter an accuracy.
A null label ("none of these") is wrong for every version.

Per model the *champion* is the version that answered the most requests (role ``served``: a version running as
``shadow`` answers none); each other version is a *challenger*, judged against it. When both predicted mostly the
same reviewed requests (shadow mode) the test is paired, McNemar's exact mid-p on the requests exactly one of them
got right; otherwise (a weighted split: each version its own requests) it is the pooled two-proportion z test on
each version's own reviewed sample. Significant at ``alpha`` (two-sided): 'better' or 'worse'; else 'not yet known',
with about how many more reviews at the rates seen so far would decide it (:mod:`vggnet.stats`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, select, union
from sqlalchemy.engine import Connection, Engine

from vggnet.stats import (
    mcnemar_midp,
    paired_reviews_needed,
    two_proportion_reviews_needed,
    two_proportion_z,
    wilson_interval,
)
from vggnet.store.schema import labels, predictions

__all__ = ["BETTER", "UNKNOWN", "WORSE", "markdown_report", "report_json", "verdict_text", "version_report"]

BETTER, WORSE, UNKNOWN = "better", "worse", "not yet known"
MCNEMAR, TWO_PROPORTION = "mcnemar-midp", "two-proportion-z"

Key = tuple[str, int]  # (request_id, item): one image of one request


@dataclass
class _Version:
    """What the store says about one version of one model: counts, and per reviewed image whether it was right."""

    model: str
    version: str
    served: int = 0
    shadow: int = 0
    predicted: dict[Key, str] = field(default_factory=dict)  # the sampled or labelled images it predicted
    reviewed: dict[Key, bool] = field(default_factory=dict)  # in the random sample, with a review label
    outside: int = 0  # review labels on images outside the random sample (not in the accuracy)
    user: dict[Key, bool] = field(default_factory=dict)  # clients' own reports (not in the accuracy)


def _counts(conn: Connection, model: str | None) -> dict[tuple[str, str], _Version]:
    """Every version of every (or the one) model, with its served and shadow prediction counts."""
    p = predictions.c
    query = select(p.model, p.version, p.role, func.count()).group_by(p.model, p.version, p.role)
    if model is not None:
        query = query.where(p.model == model)
    versions: dict[tuple[str, str], _Version] = {}
    for m, v, role, n in conn.execute(query):
        entry = versions.setdefault((m, v), _Version(m, v))
        if role == "shadow":
            entry.shadow += n
        else:
            entry.served += n
    return versions


def _interesting(conn: Connection, model: str | None) -> list[Any]:
    """Prediction rows of the images in the random sample or with any label: the few a report reads."""
    p, lab = predictions.c, labels.c
    keys = union(select(p.model, p.request_id, p.item).where(p.sampled.is_(True)),
                 select(lab.model, lab.request_id, lab.item)).subquery()
    query = select(p.model, p.version, p.request_id, p.item, p.predicted, p.sampled).join(
        keys, and_(keys.c.model == p.model, keys.c.request_id == p.request_id, keys.c.item == p.item))
    if model is not None:
        query = query.where(p.model == model)
    return list(conn.execute(query))


def _latest_labels(conn: Connection, model: str | None) -> dict[tuple[str, str, str, int], str | None]:
    """(source, model, request_id, item) → the latest label (by time, then by insertion) of that source."""
    lab = labels.c
    query = select(lab.source, lab.model, lab.request_id, lab.item, lab.label).order_by(lab.created_at, lab.pk)
    if model is not None:
        query = query.where(lab.model == model)
    return {(s, m, r, i): label for s, m, r, i, label in conn.execute(query)}  # later rows overwrite earlier


def _load(engine: Engine, model: str | None) -> dict[tuple[str, str], _Version]:
    """Read the store once (counts, sampled or labelled rows, labels) into one :class:`_Version` per version."""
    with engine.connect() as conn:
        versions = _counts(conn, model)
        rows = _interesting(conn, model)
        latest = _latest_labels(conn, model)
    sampled = {(r.model, r.request_id, r.item) for r in rows if r.sampled}
    for r in rows:
        entry = versions.setdefault((r.model, r.version), _Version(r.model, r.version))  # a row written since
        key, full = (r.request_id, r.item), (r.model, r.request_id, r.item)
        entry.predicted[key] = r.predicted
        if ("review",) + full in latest:
            label = latest[("review",) + full]
            if full in sampled:
                entry.reviewed[key] = label is not None and label == r.predicted
            else:
                entry.outside += 1
        if ("user",) + full in latest:
            label = latest[("user",) + full]
            entry.user[key] = label is not None and label == r.predicted
    return versions


def _champion(versions: list[_Version]) -> _Version:
    """The version that answered most requests (a shadow answers none); ties: more rows, then the later name."""
    return max(versions, key=lambda v: (v.served, v.served + v.shadow, v.version))


def _compare(champion: _Version, challenger: _Version, alpha: float) -> dict[str, Any]:
    """The challenger's verdict against the champion: paired when they share most reviewed images, else unpaired."""
    a, b = champion.reviewed, challenger.reviewed
    out: dict[str, Any] = {"against": champion.version, "alpha": alpha, "test": None, "p": None,
                           "more_reviews": None}
    if not a or not b:
        missing = champion.version if not a else challenger.version
        return {**out, "verdict": UNKNOWN, "reason": f"no reviews of version {missing} in the random sample yet"}
    shared = a.keys() & b.keys()
    if shared and 2 * len(shared) >= min(len(a), len(b)):
        only_new = sum(b[k] and not a[k] for k in shared)  # only the challenger right
        only_old = sum(a[k] and not b[k] for k in shared)  # only the champion right
        p = mcnemar_midp(only_new, only_old)
        out.update(test=MCNEMAR, n=len(shared), b=only_new, c=only_old, p=p)
        ahead = only_new > only_old
        more = paired_reviews_needed(only_new, only_old, len(shared), alpha)
    else:
        ka, kb = sum(a.values()), sum(b.values())
        z, p = two_proportion_z(ka, len(a), kb, len(b))
        out.update(test=TWO_PROPORTION, champion_correct=ka, champion_n=len(a), challenger_correct=kb,
                   challenger_n=len(b), z=z, p=p)
        ahead = z > 0
        more = two_proportion_reviews_needed(ka, len(a), kb, len(b), alpha)
    if p < alpha:
        return {**out, "verdict": BETTER if ahead else WORSE}
    return {**out, "verdict": UNKNOWN, "more_reviews": more}


def _row(v: _Version, champion: bool, alpha: float) -> dict[str, Any]:
    """One version's figures as a plain, JSON-ready dict (the verdict is added by the caller)."""
    correct, n = sum(v.reviewed.values()), len(v.reviewed)
    low, high = wilson_interval(correct, n, alpha)
    return {
        "model": v.model, "version": v.version, "champion": champion, "requests": v.served, "shadow": v.shadow,
        "reviewed": n, "correct": correct, "accuracy": correct / n if n else None,
        "interval": [low, high] if n else None, "level": 1 - alpha, "reviewed_outside_sample": v.outside,
        "user_reports": len(v.user), "user_reports_right": sum(v.user.values()), "verdict": None,
    }


def version_report(engine: Engine, model: str | None = None, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per model and version: requests, reviewed, accuracy with its Wilson interval, user reports, verdict.

    Rows come per model (by name), the champion first, then its challengers by version name; each challenger's
    ``verdict`` is a dict (verdict, test, p, and for 'not yet known' ``more_reviews``), the champion's None.
    An empty list: the store has no predictions (for ``model``).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    by_model: dict[str, list[_Version]] = defaultdict(list)
    for v in _load(engine, model).values():
        by_model[v.model].append(v)
    rows = []
    for name in sorted(by_model):
        champion = _champion(by_model[name])
        rows.append(_row(champion, True, alpha))
        for v in sorted(by_model[name], key=lambda v: v.version):
            if v is not champion:
                rows.append({**_row(v, False, alpha), "verdict": _compare(champion, v, alpha)})
    return rows


def _p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def verdict_text(row: dict[str, Any]) -> str:
    """One line: the challenger's verdict against the champion, the test, its evidence and p (and what it needs)."""
    v = row["verdict"]
    head = f"{row['model']} {row['version']} vs {v['against']}: {v['verdict']}"
    if v["test"] is None:
        return f"{head} ({v['reason']})"
    if v["test"] == MCNEMAR:
        evidence = (f"McNemar mid-p on {v['n']:,} paired reviews: {v['b']} only {row['version']} right, "
                    f"{v['c']} only {v['against']} right")
    else:
        evidence = (f"two-proportion z on separate samples: {v['challenger_correct']}/{v['challenger_n']} vs "
                    f"{v['champion_correct']}/{v['champion_n']}")
    text = f"{head} ({evidence}; p {_p_text(v['p'])}, alpha {v['alpha']:g})"
    if v["verdict"] != UNKNOWN:
        return text
    if v["more_reviews"] is None:
        return f"{text}; no difference seen: more reviews at these rates would not decide it"
    kind = "paired " if v["test"] == MCNEMAR else ""
    return f"{text}; about {v['more_reviews']:,} more {kind}reviews at these rates would decide it"


def _accuracy_cell(row: dict[str, Any]) -> str:
    if row["accuracy"] is None:
        return "–"
    low, high = row["interval"]
    return f"{100 * row['accuracy']:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"


def markdown_report(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one line per version, then one verdict line per challenger."""
    level = f"{100 * rows[0]['level']:g} %" if rows else "95 %"
    lines = [f"| model | version | role | requests | shadow | reviewed | accuracy ({level} Wilson) | user reports "
             "(say right) |", "|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        role = "champion" if r["champion"] else "challenger"
        lines.append(f"| {r['model']} | {r['version']} | {role} | {r['requests']:,} | {r['shadow']:,} | "
                     f"{r['reviewed']:,} | {_accuracy_cell(r)} | {r['user_reports']:,} ({r['user_reports_right']:,}) |")
    verdicts = [f"- {verdict_text(r)}" for r in rows if r["verdict"] is not None]
    return "\n".join(lines + ([""] + verdicts if verdicts else [])) + "\n"


def report_json(rows: list[dict[str, Any]]) -> str:
    """The rows as JSON text (the same fields as :func:`version_report`)."""
    return json.dumps(rows, indent=2)
