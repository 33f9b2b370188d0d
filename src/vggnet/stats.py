"""Small tests on proportions, shared by the reproduce verdicts and the live monitor (a leaf: stdlib and scipy).

Why these four: a Wilson interval stays inside [0, 1] and keeps near its nominal coverage for the few hundred
reviews a live version gets (the plain Wald interval does not); McNemar's exact mid-p test compares two
classifiers on the same items (Dietterich 1998) and, unlike the plain exact test, is close to its nominal level
when discordant pairs are few (Fagerland, Lydersen & Laake 2013); the pooled two-proportion z test is the
textbook one for two independent samples (a weighted A/B split, each version with its own reviewed requests).

``mcnemar_midp`` is exact (``math.comb``, big integers, no seed) and imports nothing beyond the stdlib, so the
reproduce report's verdicts do not pay for scipy; only the projection of how many more reviews would decide a
paired comparison uses ``scipy.stats`` (imported when called), where exact big-integer sums grow too slow.
"""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["mcnemar_midp", "paired_noninferiority", "paired_reviews_needed", "two_proportion_reviews_needed",
           "two_proportion_z", "wilson_interval"]

#: the largest number of reviews a projection searches; beyond it the answer is "not in any useful time"
MAX_PROJECTION = 10**9


def _z(alpha: float) -> float:
    """The two-sided normal critical value for level ``alpha`` (1.96 for 0.05)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return NormalDist().inv_cdf(1 - alpha / 2)


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval (two-sided, level ``1 - alpha``) for ``successes`` of ``n``; (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z, p = _z(alpha), successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_midp(b: int, c: int) -> float:
    """Two-sided mid-p value of McNemar's exact test on ``b`` and ``c`` discordant pairs (1.0 when b == c)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b} and {c}")
    m, k = b + c, min(b, c)
    below = sum(math.comb(m, i) for i in range(k))  # P(X < k) * 2^m, X ~ Binomial(m, 1/2)
    tail = (2 * below + math.comb(m, k)) / 2 ** (m + 1)  # P(X < k) + P(X = k) / 2; exact big-int division
    return min(1.0, 2 * tail)


def paired_noninferiority(b: int, c: int, n: int, margin: float) -> tuple[float, float]:
    """(z, one-sided p) of Tango's score test that a new classifier is not worse than an old one by ``margin``
    or more, both scored on the same ``n`` items: ``b`` the new one gets right and the old one wrong, ``c`` the
    reverse; ``margin`` is a proportion (0.01 = one point of accuracy).

    H0: p_new - p_old <= -margin against H1: p_new - p_old > -margin; a small p shows non-inferiority. Why
    Tango's (Stat Med 1998; 17:891-908) rather than a Wald z: its variance is taken under H0, at the restricted
    maximum-likelihood estimate of the discordance, so it stays defined and close to its nominal level when
    few pairs disagree, even none (identical predictions), where a Wald variance is zero.
    """
    if n < 1 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 <= b + c <= n and n >= 1, got b={b}, c={c}, n={n}")
    if not 0 < margin < 1:
        raise ValueError(f"margin must lie in (0, 1), got {margin}")
    theta = -float(margin)  # the difference p_new - p_old on the boundary of H0
    # restricted MLE of q = P(old right, new wrong) given P(new right, old wrong) = q + theta: the positive root
    # of 2n q^2 + B q + C = 0 (the score equation of the profile likelihood)
    a = 2.0 * n
    bb = -(b + c) + theta * (2 * n - b + c)
    cc = -c * theta * (1 - theta)
    q = (-bb + math.sqrt(bb * bb - 4 * a * cc)) / (2 * a)
    variance = n * (2 * q + theta * (1 - theta))  # Var(b - c) under H0: n [(p_b + p_c) - theta^2]
    z = (b - c - n * theta) / math.sqrt(variance)
    return z, NormalDist().cdf(-z)


def _midp_float(b: int, c: int) -> float:
    """:func:`mcnemar_midp` in floating point (scipy's binomial), for the large counts a projection tries."""
    from scipy.stats import binom

    m, k = b + c, min(b, c)
    return min(1.0, 2 * (float(binom.cdf(k - 1, m, 0.5)) + float(binom.pmf(k, m, 0.5)) / 2))


def paired_reviews_needed(b: int, c: int, n: int, alpha: float = 0.05) -> int | None:
    """About how many more paired reviews would make McNemar's mid-p fall below ``alpha``; None: never.

    The projection keeps the observed discordance rates ``b / n`` and ``c / n`` fixed: with ``N`` paired reviews
    in all it expects ``round(b N / n)`` and ``round(c N / n)`` discordant pairs, and returns the smallest
    ``N - n`` whose mid-p is below ``alpha`` (a doubling, then a bisection, search; rounding makes it "about").
    0 when the test already decides; None when b == c (no difference seen: more of the same never decides) or
    when it would take more than :data:`MAX_PROJECTION` reviews.
    """
    if n < 1 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 <= b + c <= n and n >= 1, got b={b}, c={c}, n={n}")
    _z(alpha)  # checks alpha

    def decided(total: int) -> bool:
        return _midp_float(round(b * total / n), round(c * total / n)) < alpha

    if b == c:
        return None
    if mcnemar_midp(b, c) < alpha:
        return 0
    low, high = n, 2 * n  # low never decides; find a high that does
    while not decided(high):
        low, high = high, 2 * high
        if high > MAX_PROJECTION:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if decided(mid) else (mid, high)
    return high - n


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p) of the pooled z test that ``k1 / n1`` and ``k2 / n2`` differ; z > 0: the second higher.

    (0, 1) when either sample is empty or every item in both agrees (all right or all wrong): nothing to test.
    """
    if n1 < 0 or n2 < 0 or not 0 <= k1 <= n1 or not 0 <= k2 <= n2:
        raise ValueError(f"need 0 <= k <= n, got {k1} of {n1} and {k2} of {n2}")
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (k2 / n2 - k1 / n1) / se
    return z, min(1.0, 2 * NormalDist().cdf(-abs(z)))


def two_proportion_reviews_needed(k1: int, n1: int, k2: int, n2: int, alpha: float = 0.05) -> int | None:
    """About how many more reviews, split as now between the two samples, would make the z test decide.

    With both proportions and the split kept, z grows as the square root of the total, so ``s`` times the reviews
    give ``z sqrt(s)``: the answer is ``(s - 1)(n1 + n2)`` for ``s = (z_crit / z)²``, 0 when already decided, None
    when the proportions are equal (or a sample is empty) or beyond :data:`MAX_PROJECTION`.
    """
    z, p = two_proportion_z(k1, n1, k2, n2)
    crit = _z(alpha)
    if p < alpha:
        return 0
    if z == 0:
        return None
    more = math.ceil(((crit / z) ** 2 - 1) * (n1 + n2))
    return more if more <= MAX_PROJECTION else None
