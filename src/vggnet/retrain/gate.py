"""Step 6: the gate. A retrained model replaces nothing unless two paired tests on the same images say so.

On the champion's validation split it may not be worse by ``margin`` points or more: a one-sided non-inferiority
test on the paired difference (Tango's score test, :func:`vggnet.stats.paired_noninferiority`), which must reject
"worse by the margin" at ``alpha``; so a small validation split cannot pass by saying little. On the held-out
reviewed samples it must win: McNemar's mid-p (:func:`vggnet.stats.mcnemar_midp`, two-sided, as the monitor's
verdicts) below ``alpha`` with more images it alone gets right than images only the champion gets right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vggnet.stats import mcnemar_midp, paired_noninferiority, wilson_interval

__all__ = ["ORIGINAL", "REVIEWED", "decide", "gate_table", "paired_counts"]

ORIGINAL, REVIEWED = "original_val", "reviewed_holdout"
TITLES = {ORIGINAL: "original validation split", REVIEWED: "held-out reviewed samples"}


def paired_counts(labels: Sequence[int], champion: Sequence[int | None], candidate: Sequence[int | None],
                  alpha: float) -> dict[str, Any]:
    """n, each model's correct count and accuracy (%, Wilson interval), and the discordant pairs: ``b`` only the
    candidate right, ``c`` only the champion right. Images either model could not read are left out of both."""
    pairs = [(old == y, new == y) for y, old, new in zip(labels, champion, candidate, strict=True)
             if old is not None and new is not None]
    n = len(pairs)
    old_right, new_right = sum(o for o, _ in pairs), sum(w for _, w in pairs)
    b = sum(1 for o, w in pairs if w and not o)
    c = sum(1 for o, w in pairs if o and not w)

    def accuracy(k: int) -> dict[str, Any]:
        low, high = wilson_interval(k, n, alpha)
        return {"correct": k, "accuracy": 100.0 * k / n if n else None, "interval": [100.0 * low, 100.0 * high]}

    return {"n": n, "unreadable": len(labels) - n, "champion": accuracy(old_right), "candidate": accuracy(new_right),
            "difference": 100.0 * (new_right - old_right) / n if n else None, "b": b, "c": c}


def _noninferior(counts: dict[str, Any], margin: float, alpha: float) -> dict[str, Any]:
    n, b, c = counts["n"], counts["b"], counts["c"]
    test = {"test": "tango-noninferiority", "margin": margin, "alpha": alpha}
    if n == 0:
        return {**test, "z": None, "p": None, "passed": False, "reason": "no validation images to test on"}
    z, p = paired_noninferiority(b, c, n, margin / 100.0)
    passed = p < alpha
    points = f"{margin:g} point{'' if margin == 1 else 's'}"
    verdict = f"not worse than the champion by {points}" if passed else \
        f"may be worse than the champion by {points} or more"
    return {**test, "z": z, "p": p, "passed": passed,
            "reason": f"{verdict} on {n} original validation images ({counts['difference']:+.2f} points, b={b}, "
                      f"c={c}, p={p:.3g} {'<' if passed else '>='} {alpha:g})"}


def _wins(counts: dict[str, Any], alpha: float) -> dict[str, Any]:
    n, b, c = counts["n"], counts["b"], counts["c"]
    test = {"test": "mcnemar-midp", "alpha": alpha}
    if n == 0:
        return {**test, "p": None, "passed": False, "reason": "no held-out reviewed samples to test on"}
    p = mcnemar_midp(b, c)
    passed = b > c and p < alpha
    if passed:
        why = f"better on {n} held-out reviewed samples (b={b} > c={c}, mid-p={p:.3g} < {alpha:g})"
    elif b <= c:
        why = f"not better on {n} held-out reviewed samples (only it right on b={b}, only the champion on c={c})"
    else:
        why = f"not significantly better on {n} held-out reviewed samples (b={b}, c={c}, mid-p={p:.3g} >= {alpha:g})"
    return {**test, "p": p, "passed": passed, "reason": why}


def decide(answers: dict[str, Any], margin: float, alpha: float) -> dict[str, Any]:
    """The gate on :func:`vggnet.retrain.evaluate.paired_answers`' output: both tests, counts, and the verdict
    with its reason (``passed: ...`` / ``failed: ...``)."""
    sets = answers["sets"]
    results: dict[str, Any] = {}
    for name in (ORIGINAL, REVIEWED):
        s = sets[name]
        counts = paired_counts(s["labels"], s["champion"], s["candidate"], alpha)
        test = _noninferior(counts, margin, alpha) if name == ORIGINAL else _wins(counts, alpha)
        results[name] = {**counts, "view": s["view"], **test}
    passed = all(r["passed"] for r in results.values())
    failed = [r["reason"] for r in results.values() if not r["passed"]]
    reason = ("passed: " + "; ".join(r["reason"] for r in results.values())) if passed else \
        ("failed: " + "; ".join(failed))
    return {"passed": passed, "reason": reason, "margin": margin, "alpha": alpha, **results}


def _p(p: float | None) -> str:
    return "-" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _acc(a: dict[str, Any]) -> str:
    return "-" if a["accuracy"] is None else f"{a['accuracy']:.1f}%"


def gate_table(gate: dict[str, Any]) -> str:
    """The gate as a short text table, one row per test, and the verdict."""
    head = ("test on", "n", "champion", "candidate", "b", "c", "test", "p", "result")
    rows = [head]
    for name in (ORIGINAL, REVIEWED):
        r = gate[name]
        what = f"no worse by {gate['margin']:g} pt" if name == ORIGINAL else "better (McNemar)"
        rows.append((TITLES[name], str(r["n"]), _acc(r["champion"]), _acc(r["candidate"]), str(r["b"]), str(r["c"]),
                     what, _p(r["p"]), "pass" if r["passed"] else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i in (0, 6) else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]
    return "\n".join([*lines, f"gate {gate['reason']}"])
