"""Paired comparison of two nets evaluated on the same images: per-image results, McNemar's test, verdicts.

Both nets of a comparison are scored on the same validation images, so what separates them is only the
images on which exactly one of them is right (the discordant pairs): ``b`` images only the net the paper
expects to be better gets right, ``c`` images only the other one gets right. The difference of the two
top-1 errors is exactly ``(b - c) / n``. Under "no difference" each discordant image is equally likely
to go either way, so ``b ~ Binomial(b + c, 1/2)``: McNemar's test, computed exactly (``math.comb``, no
scipy) with the mid-p correction. The exact conditional test is conservative (its real false-alarm rate is
well under the nominal level when discordant pairs are few); the mid-p version keeps the exactness for
small counts and is close to nominal (Fagerland, Lydersen & Laake 2013). It is deterministic, needs no
resampling seed, and is the usual test for two classifiers on one test set (Dietterich 1998); a paired
bootstrap would give nearly the same answer at random.

Three outcomes for a conclusion "``worse`` has a higher error than ``better``", at ``ALPHA`` (two-sided):

- **holds**: the difference goes the paper's way and is significant;
- **contradicted**: it goes the other way and is significant;
- **inconclusive**: not significant either way.

A "no gain" conclusion ("``worse`` is no better than ``better``", e.g. LRN does not help) cannot be
shown by a non-significant test, which only says the images were too few to see a gain. It is
**contradicted** when ``worse`` is significantly better (the same two-sided test) and **holds** when a
gain of ``MARGIN`` points or more is ruled out: the one-sided 95 % lower confidence bound of the
difference (Agresti-Min interval for paired proportions: 0.5 added to each cell) lies above
``-MARGIN``. ``MARGIN`` is 1 point of top-1 error, about one configuration step of the paper's Table 3
(A → B 0.9, C → D 1.1 points at S = 256). The paper's own smallest gains (0.2 points, Table 5) are
beyond what 5,000 images can resolve between two separately trained nets (they disagree on some 15 %
of the images, which puts the bound about 0.9 points below the difference), so a tighter margin would
make the conclusion unprovable here; the bound is printed so that a reader can apply another.
Otherwise the conclusion is **inconclusive**.

Each conclusion is tested on its own; there is no correction for testing seven.

Per-image results are kept in the results file as ``top1_correct``: the boolean vector packed into bits
(``numpy.packbits``, big-endian bit order) and written as base64, 1 bit per image (5,000 images: 836
characters); its length is the row's ``n``.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["ALPHA", "MARGIN", "Paired", "compare", "mcnemar_midp", "no_gain_bound", "pack_bits", "unpack_bits",
           "verdict"]

ALPHA = 0.05  # two-sided significance level of every verdict
MARGIN = 1.0  # top-1 points: a gain this large must be ruled out for a "no gain" conclusion to hold

HOLDS, INCONCLUSIVE, CONTRADICTED = "holds", "inconclusive", "contradicted"


def pack_bits(correct: np.ndarray) -> str:
    """A boolean vector as base64 of its packed bits (big-endian bit order); its length is kept elsewhere."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``n`` booleans."""
    raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype=np.uint8)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"{len(raw)} packed bytes cannot hold exactly {n} images")
    return np.unpackbits(raw, count=n).astype(bool)


def mcnemar_midp(b: int, c: int) -> float:
    """Two-sided mid-p value of McNemar's exact test on ``b`` and ``c`` discordant pairs (1.0 when b == c)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b} and {c}")
    m, k = b + c, min(b, c)
    below = sum(math.comb(m, i) for i in range(k))  # P(X < k) * 2^m, X ~ Binomial(m, 1/2)
    tail = (2 * below + math.comb(m, k)) / 2 ** (m + 1)  # P(X < k) + P(X = k) / 2; exact big-int division
    return min(1.0, 2 * tail)


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
