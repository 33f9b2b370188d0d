"""Paired comparison of two nets on the same images: per-image results, McNemar's test, verdicts.

Only the images exactly one net gets right separate two nets scored on one set: ``b`` (only the net the paper
expects to be better is right) and ``c`` (only the other); the top-1 difference is ``(b - c) / n``. McNemar's
exact test with the mid-p correction (:func:`vggnet.stats.mcnemar_midp`, shared with the live monitor:
``math.comb``, no scipy, no resampling seed) is the usual test for two classifiers on one test set (Dietterich
1998) and, unlike the plain exact test, is close to its nominal level when discordant pairs are few (Fagerland,
Lydersen & Laake 2013).

"``worse`` errs more than ``better``" **holds** when the difference goes the paper's way and is significant at
``ALPHA`` (two-sided), is **contradicted** when it is significant the other way, else **inconclusive**. A "no
gain" conclusion cannot be shown by a non-significant test, so it holds only when the one-sided 95 % lower
bound of the difference (Agresti-Min) rules out a gain of ``MARGIN`` points (1 point: about one configuration
step of the paper's Table 3; the paper's 0.2-point gains are beyond what 5,000 images resolve). Each conclusion
is tested on its own, without a correction for testing seven.

Per-image results are stored as ``top1_correct``: the boolean vector packed into bits (big-endian) as base64.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from vggnet.errors import UsageError
from vggnet.stats import mcnemar_midp

__all__ = ["ALPHA", "MARGIN", "Paired", "compare", "mcnemar_midp", "no_gain_bound", "pack_bits", "unpack_bits",
           "verdict"]

ALPHA = 0.05  # two-sided significance level of every verdict
MARGIN = 1.0  # top-1 points: a gain this large must be ruled out for a "no gain" conclusion to hold

HOLDS, INCONCLUSIVE, CONTRADICTED = "holds", "inconclusive", "contradicted"


def pack_bits(correct: np.ndarray) -> str:
    """A boolean vector as base64 of its packed bits (big-endian bit order); its length is kept elsewhere."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``n`` booleans; a results file edited by hand is the user's to fix."""
    try:
        raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype=np.uint8)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise UsageError(f"per-image results are not base64 of packed bits ({exc})") from exc
    if len(raw) != (n + 7) // 8:
        raise UsageError(f"{len(raw)} packed bytes cannot hold exactly {n} images")
    return np.unpackbits(raw, count=n).astype(bool)


def no_gain_bound(b: int, c: int, n: int, level: float = 0.95) -> float:
    """One-sided lower confidence bound (points) of ``(b - c) / n``: Agresti-Min, 0.5 added to each cell."""
    if n < 1:
        raise ValueError("need at least one image")
    nt, bt, ct = n + 2, b + 0.5, c + 0.5
    diff = (bt - ct) / nt
    var = max((bt + ct) - (bt - ct) ** 2 / nt, 0.0) / nt**2
    return 100 * (diff - NormalDist().inv_cdf(level) * math.sqrt(var))


@dataclass(frozen=True)
class Paired:
    """One paired comparison: ``n`` images, ``b`` only the expected-better net right, ``c`` only the other."""

    n: int
    b: int
    c: int

    @property
    def diff(self) -> float:
        """Error of the expected-worse net minus that of the expected-better one, in points (> 0: paper's way)."""
        return 100 * (self.b - self.c) / self.n

    @property
    def p(self) -> float:
        return mcnemar_midp(self.b, self.c)

    @property
    def lower(self) -> float:
        return no_gain_bound(self.b, self.c, self.n)

    def text(self, expect_no_gain: bool = False) -> str:
        out = f"Δ {self.diff:+.2f}, b/c {self.b}/{self.c}, p {_p(self.p)}"
        return out + (f", Δ ≥ {self.lower:+.2f} (95 %)" if expect_no_gain else "")


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def compare(worse: dict[str, Any] | None, better: dict[str, Any] | None) -> Paired | str:
    """Pair two result rows; a string (why not) when either lacks per-image results or the images differ."""
    if not worse or not better or worse.get("top1_err") is None or better.get("top1_err") is None:
        return "not measured"
    if "top1_correct" not in worse or "top1_correct" not in better:
        return "no per-image results"
    if worse["n"] != better["n"]:
        return "not the same images"
    w, bt = unpack_bits(worse["top1_correct"], worse["n"]), unpack_bits(better["top1_correct"], better["n"])
    return Paired(n=int(worse["n"]), b=int(np.sum(bt & ~w)), c=int(np.sum(w & ~bt)))


def verdict(pair: Paired | str, expect_no_gain: bool = False, alpha: float = ALPHA, margin: float = MARGIN) -> str:
    """holds / inconclusive / contradicted (module docstring); "not measured" or "inconclusive (why)" else."""
    if isinstance(pair, str):
        return pair if pair == "not measured" else f"{INCONCLUSIVE} ({pair})"
    significant = pair.p < alpha
    if expect_no_gain:
        if significant and pair.b < pair.c:
            return CONTRADICTED
        return HOLDS if pair.lower > -margin else INCONCLUSIVE
    if significant:
        return HOLDS if pair.b > pair.c else CONTRADICTED
    return INCONCLUSIVE
