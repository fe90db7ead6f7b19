"""Statistics of ``cggr race`` and the selection study: paired Student-t intervals and bootstrap standard errors.

Method (stated once, used everywhere): a race with ``n`` seeds gives each arm ``n`` final held-out losses, one
per seed, and seed ``s`` gives every arm the same initial weights and the same data order. The arms are compared
**paired**: for arm ``a`` against a baseline ``b`` the per-seed differences ``d_s = a_s - b_s`` are formed, and the
95% interval of their mean is the Student-t interval ``mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)`` (``sd`` with
``n - 1`` in the denominator). Pairing removes the seed's own effect (initialisation, data order), which dominates
single-seed gaps. Each arm's own mean gets the same (unpaired) t interval. A gap whose interval contains 0 is a
**tie**: the race cannot tell the two arms apart at that number of seeds. With one seed there is no interval
(``None`` bounds) and every gap is reported as a single draw.

The Student-t quantile is computed here (no scipy): the t distribution's CDF through the regularised incomplete
beta function (Lentz's continued fraction), inverted by bisection to ~1e-12.

The held-out loss of one model is a token-weighted mean over held-out blocks; :func:`bootstrap_se` gives its
standard error by resampling blocks (with replacement, seeded), i.e. the uncertainty due to *which* held-out
blocks were drawn, as opposed to the seed-to-seed variance above.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converged to ~1e-15."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 9)`` = 2.2622)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its Student-t confidence interval (``low``/``high`` ``None`` when ``n < 2``).

    Attributes:
        mean: Sample mean. sd: Sample standard deviation (n - 1), ``None`` when ``n < 2``.
        half_width: t quantile × sd / sqrt(n). confidence: e.g. 0.95.
    """

    mean: float
    low: float | None
    high: float | None
    n: int
    sd: float | None
    half_width: float | None
    confidence: float = CONFIDENCE

    @property
    def contains_zero(self) -> bool | None:
        """Whether the interval contains 0 (a tie); ``None`` without an interval (one value)."""
        if self.low is None or self.high is None:
            return None
        return self.low <= 0.0 <= self.high

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _floats(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name} must hold at least one value, got none")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} must be finite numbers, got {bad[0]!r} among {len(out)} values")
    return out


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval ``mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)`` of ``values`` (independent draws)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    xs = _floats(values, "values")
    n, mean = len(xs), math.fsum(xs) / len(xs)
    if n < 2:
        return Interval(mean, None, None, n, None, None, confidence)
    sd = statistics.stdev(xs)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, half, confidence)


def paired_interval(values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Paired t interval of ``mean(values[i] - baseline[i])`` (element i of both from the same seed)."""
    a, b = _floats(values, "values"), _floats(baseline, "baseline")
    if len(a) != len(b):
        raise ValueError(f"values and baseline must pair up, got {len(a)} and {len(b)} values")
    return mean_interval([x - y for x, y in zip(a, b)], confidence)


def bootstrap_se(values: Sequence[float], weights: Sequence[float] | None = None, *, resamples: int = 1000,
                 seed: int = 0) -> float:
    """Bootstrap standard error of the weighted mean ``sum(w·x) / sum(w)`` of ``values``.

    Resamples the ``n`` (value, weight) pairs with replacement ``resamples`` times (``numpy.random.default_rng(seed)``),
    and returns the standard deviation (n - 1) of the resampled weighted means. For the held-out loss, ``values``
    are per-block mean losses and ``weights`` their target-token counts, so the weighted mean is the token-weighted
    held-out loss. ``nan`` for fewer than 2 values.
    """
    xs = _floats(values, "values")
    ws = [1.0] * len(xs) if weights is None else _floats(weights, "weights")
    if len(ws) != len(xs):
        raise ValueError(f"weights must pair up with values, got {len(ws)} and {len(xs)}")
    if any(w < 0 for w in ws) or not sum(ws) > 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples!r}")
    n = len(xs)
    if n < 2:
        return float("nan")
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (resamples, n)
    w, wx = np.asarray(ws, dtype=np.float64), np.asarray(ws, dtype=np.float64) * np.asarray(xs, dtype=np.float64)
    totals = w[picks].sum(axis=1)
    keep = totals > 0
    means = wx[picks].sum(axis=1)[keep] / totals[keep]
    return float(np.std(means, ddof=1))


def _paired(values: Mapping[Any, float] | Sequence[float]) -> dict[Any, float]:
    if isinstance(values, Mapping):
        return {k: float(v) for k, v in values.items()}
    return {i: float(v) for i, v in enumerate(values)}


def paired_summary(values_by_arm: Mapping[str, Mapping[Any, float] | Sequence[float]], baseline: str,
                   confidence: float = CONFIDENCE) -> dict[str, dict[str, Any]]:
    """Per arm: the interval of its mean, and the paired interval of its difference to ``baseline``.

    Args:
        values_by_arm: arm -> its values keyed by seed (a mapping), or a sequence whose position is the seed
            index. Only seeds present in both the arm and the baseline enter the paired difference.
        baseline: The arm the others are compared with (e.g. ``'standard'`` or ``'random'``).

    Returns:
        arm -> ``{"mean": Interval, "diff": Interval | None, "seeds": [...], "tie": bool | None}``;
        ``diff`` is ``None`` for the baseline itself and for an arm sharing no seed with it; ``tie`` is whether the
        difference's interval contains 0 (``None`` when there is no interval: one shared seed).

    Raises:
        ValueError: ``baseline`` is not among the arms.
    """
    if baseline not in values_by_arm:
        raise ValueError(f"baseline must be one of the arms {sorted(values_by_arm)}, got {baseline!r}")
    base = _paired(values_by_arm[baseline])
    out: dict[str, dict[str, Any]] = {}
    for arm, raw in values_by_arm.items():
        mine = _paired(raw)
        seeds = [s for s in mine if s in base]
        diff = None
        if arm != baseline and seeds:
            diff = paired_interval([mine[s] for s in seeds], [base[s] for s in seeds], confidence)
        out[arm] = {"mean": mean_interval(list(mine.values()), confidence), "diff": diff, "seeds": seeds,
                    "tie": None if diff is None else diff.contains_zero}
    return out


__all__ = ["CONFIDENCE", "Interval", "bootstrap_se", "mean_interval", "paired_interval", "paired_summary",
           "t_cdf", "t_quantile"]
