"""cggr.cli.stats against textbook references: t-table quantiles, Student's sleep data, coverage, bootstrap SE."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from cggr.cli.stats import bootstrap_se, mean_interval, paired_interval, paired_summary, t_cdf, t_quantile

# two-sided 95% (p = 0.975) and other quantiles as printed in a Student-t table (3 decimals)
T_TABLE = [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 5, 2.571),
           (0.975, 9, 2.262), (0.975, 10, 2.228), (0.975, 30, 2.042), (0.975, 120, 1.980), (0.95, 5, 2.015),
           (0.995, 10, 3.169), (0.9, 20, 1.325)]


@pytest.mark.parametrize(("p", "df", "table"), T_TABLE)
def test_t_quantile_matches_a_printed_t_table(p, df, table):
    q = t_quantile(p, df)
    assert abs(q - table) <= 0.0005 + 1e-9
    assert t_quantile(1 - p, df) == pytest.approx(-q, abs=1e-10)
    assert t_cdf(q, df) == pytest.approx(p, abs=1e-10)


def test_t_cdf_closed_forms():
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t) / pi; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-7.3, -1.0, -0.2, 0.0, 0.4, 1.7, 25.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # large df tends to the normal: Phi(1.96) = 0.9750021
    assert t_cdf(1.959964, 1e7) == pytest.approx(0.975, abs=1e-6)


def test_paired_interval_on_students_sleep_data():
    """Cushny & Peebles' sleep data (Student 1908; R's ``sleep``): the paired t interval of drug 2 - drug 1.

    R: ``t.test(extra ~ group, data = sleep, paired = TRUE)`` gives mean difference -1.58, t = -4.0621, df = 9,
    95% CI [-2.4598858, -0.7001142] (group 1 - group 2); here drug 2 - drug 1, so the signs flip.
    """
    drug1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    drug2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    iv = paired_interval(drug2, drug1)
    assert iv.n == 10 and iv.mean == pytest.approx(1.58, abs=1e-12)
    assert iv.low == pytest.approx(0.7001142, abs=1e-6) and iv.high == pytest.approx(2.4598858, abs=1e-6)
    assert iv.mean / (iv.sd / math.sqrt(10)) == pytest.approx(4.0621, abs=1e-4)
    assert iv.contains_zero is False
    # one drug's own interval is wider than the paired one: pairing removes the subjects' own variation
    assert mean_interval(drug2).half_width > 1.5 * iv.half_width


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    """Monte Carlo (fixed seed): 4000 samples of n = 4 normal draws; coverage 0.95 within 0.015 (> 4 binomial SE)."""
    rng = random.Random(1234)
    hits = 0
    trials = 4000
    for _ in range(trials):
        iv = mean_interval([rng.gauss(3.0, 2.0) for _ in range(4)])
        hits += iv.low <= 3.0 <= iv.high
    assert abs(hits / trials - 0.95) < 0.015
    # a normal quantile (1.96) instead of t_{0.975, 3} = 3.182 would cover only ~0.86 at n = 4
    assert hits / trials > 0.92


def test_one_value_gives_no_interval_and_bad_input_is_refused():
    iv = mean_interval([2.5])
    assert (iv.mean, iv.low, iv.high, iv.contains_zero) == (2.5, None, None, None)
    with pytest.raises(ValueError, match="values must hold at least one value"):
        mean_interval([])
    with pytest.raises(ValueError, match="values must be finite numbers, got nan"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="must pair up, got 2 and 3"):
        paired_interval([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="p must be in"):
        t_quantile(1.0, 3)


def test_bootstrap_se_matches_the_analytic_standard_error():
    rng = np.random.default_rng(7)
    xs = rng.normal(5.0, 1.5, size=500)
    analytic = xs.std(ddof=1) / math.sqrt(len(xs))
    se = bootstrap_se(xs.tolist(), resamples=2000, seed=3)
    assert se == pytest.approx(analytic, rel=0.08)
    assert bootstrap_se(xs.tolist(), resamples=2000, seed=3) == se  # seeded: reproducible
    # token weights: the ratio estimator's linearised SE sqrt(sum w^2 (x - m)^2) / sum w
    ws = rng.integers(1, 50, size=500).astype(float)
    m = float((ws * xs).sum() / ws.sum())
    linear = math.sqrt(float((ws**2 * (xs - m) ** 2).sum())) / float(ws.sum())
    assert bootstrap_se(xs.tolist(), ws.tolist(), resamples=2000, seed=4) == pytest.approx(linear, rel=0.1)
    assert math.isnan(bootstrap_se([1.0]))


def test_paired_summary_pairs_by_seed_and_calls_ties():
    values = {
        "standard": {0: 5.0, 1: 5.4, 2: 4.8},
        "cggr": {0: 4.9, 1: 5.3, 2: 4.7},  # exactly 0.1 better at every seed: a clear win despite the seed spread
        "random": {0: 5.2, 1: 5.1, 2: 4.9},  # +0.2, -0.3, +0.1: a tie
        "late": {2: 4.0},  # shares one seed: a difference, no interval
    }
    out = paired_summary(values, "standard")
    assert out["standard"]["diff"] is None and out["standard"]["tie"] is None
    assert out["cggr"]["diff"].mean == pytest.approx(-0.1)
    assert out["cggr"]["diff"].half_width == pytest.approx(0, abs=1e-9)
    assert out["cggr"]["tie"] is False
    assert out["random"]["tie"] is True and out["random"]["seeds"] == [0, 1, 2]
    ref = statistics.stdev([0.2, -0.3, 0.1]) / math.sqrt(3) * 4.302653
    assert out["random"]["diff"].half_width == pytest.approx(ref, rel=1e-6)
    assert out["late"]["diff"].mean == pytest.approx(-0.8) and out["late"]["tie"] is None
    assert paired_summary({"a": [1.0, 2.0], "b": [1.5, 2.5]}, "a")["b"]["diff"].mean == pytest.approx(0.5)
    with pytest.raises(ValueError, match="baseline must be one of the arms"):
        paired_summary(values, "nope")
