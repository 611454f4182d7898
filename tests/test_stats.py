"""Tests for harness.stats: agreement with scipy, hand-worked examples, calibration.

Every random draw uses a fixed seed. Calibration checks (CI coverage, A/A
rejection rates) count events over repeats and compare the count with a
binomial tolerance at the 0.1% level, so a correct implementation fails them
about once in a thousand seeds, and a miscalibrated one fails them reliably.
"""

import itertools
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

# until pyproject.toml sets pytest's pythonpath, make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.stats import (  # noqa: E402
    PairedResult,
    benjamini_hochberg,
    cohens_dz,
    holm,
    mean_interval,
    mean_std_over_seeds,
    paired_test,
    paired_test_over_seeds,
    seed_aggregate,
    significance_marker,
)


def ndcg_like(difficulty, rng, shift=0.0):
    """Per-user NDCG@10 under leave-one-out: the target's rank depends on a
    per-user difficulty (shared by all runs) plus per-run (seed) noise; about
    half the users miss the top 10 and score exactly 0."""
    log_rank = 2.0 + 1.5 * difficulty + 0.8 * rng.standard_normal(difficulty.size) - shift
    rank = 1 + np.floor(np.exp(log_rank))
    return np.where(rank <= 10, 1 / np.log2(rank + 1), 0.0)


def binomial_bounds(n, p, tail=0.001):
    """Counts outside [lo, hi] have probability < tail on each side."""
    return stats.binom.ppf(tail, n, p), stats.binom.isf(tail, n, p)


# --------------------------------------------------------------------------- agreement with scipy


@pytest.fixture
def ndcg_pair():
    rng = np.random.default_rng(1)
    difficulty = rng.standard_normal(400)
    return ndcg_like(difficulty, rng, shift=0.3), ndcg_like(difficulty, rng)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_ttest_equals_scipy(ndcg_pair, alternative):
    a, b = ndcg_pair
    res = paired_test(a, b, "ttest", alternative=alternative, confidence=0.9)
    ref = stats.ttest_rel(a, b, alternative=alternative)
    ci = ref.confidence_interval(0.9)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert res.n == 400 and res.mean_diff == pytest.approx(np.mean(a - b))


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize("zero_method", ["wilcox", "pratt"])
def test_wilcoxon_equals_scipy(ndcg_pair, alternative, zero_method):
    a, b = ndcg_pair
    assert (a == b).sum() > 50  # many users both models miss: zeros and ties
    res = paired_test(a, b, "wilcoxon", alternative=alternative, zero_method=zero_method, n_resamples=999)
    ref = stats.wilcoxon(a, b, alternative=alternative, zero_method=zero_method)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)


def test_ttest_by_hand():
    # d = [1, 2, 3]: mean 2, sd 1, t = 2 / (1/sqrt(3)) = 2 sqrt(3), df = 2.
    # For df = 2, P(|T| > t) = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12/14).
    # t_{0.975, 2} = 0.95 / sqrt(2 * 0.975 * 0.025) = 4.3027; CI = 2 -+ 4.3027 / sqrt(3).
    res = paired_test([3, 4, 5], [2, 2, 2], "ttest")
    assert res.statistic == pytest.approx(2 * math.sqrt(3))
    assert res.p_value == pytest.approx(1 - math.sqrt(12 / 14))
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert (res.ci_low, res.ci_high) == pytest.approx((2 - half, 2 + half))
    assert res.effect_size == pytest.approx(2.0) and res.effect_size_name == "cohens_dz"


def test_wilcoxon_by_hand():
    # d = [1, 2, 3, 4, -5]: ranks of |d| are 1..5, W+ = 10, W- = 5, statistic min = 5.
    # Exact null: W+ is the sum of a random subset of {1..5} (32 equally likely).
    # Subsets with sum <= 5: {}, 1, 2, 3, 4, 5, 12, 13, 14, 23 -> 10, so p = 2 * 10/32.
    res = paired_test([1, 2, 3, 4, -5], [0, 0, 0, 0, 0], "wilcoxon", n_resamples=99)
    assert res.statistic == 5
    assert res.p_value == pytest.approx(20 / 32)


def test_cohens_dz_by_hand():
    # d = [0.1, 0.3, -0.1, 0.5]: mean 0.2, deviations -0.1, 0.1, -0.3, 0.3,
    # squares sum 0.2, var = 0.2 / 3, d_z = 0.2 / sqrt(0.0667) = 0.7746.
    assert cohens_dz(np.array([0.1, 0.3, -0.1, 0.5])) == pytest.approx(0.2 / math.sqrt(0.2 / 3))
    assert cohens_dz(np.zeros(4)) == 0.0
    assert cohens_dz(np.full(4, -0.5)) == -math.inf


# --------------------------------------------------------------------------- permutation test


def test_permutation_exact_by_hand():
    # d = [1, 2, 3, 4, 5, -6], observed sum 9. Flipping signs gives sum 21 - 2 S,
    # S = sum of the |d| made negative, so sum >= 9 iff S <= 6. Subsets of {1..6}
    # with sum <= 6: {} 1 2 3 12 4 13 5 14 23 6 15 24 123 -> 14 of 64.
    # By symmetry P(sum <= -9) = 14/64 too, so two-sided p = 28/64.
    d = np.array([1, 2, 3, 4, 5, -6], dtype=float)
    base = np.linspace(0.2, 0.7, 6)
    res = paired_test(base + d, base, "permutation")
    assert res.statistic == pytest.approx(1.5)
    assert res.p_value == pytest.approx(28 / 64)
    assert paired_test(base + d, base, "permutation", alternative="greater").p_value == pytest.approx(14 / 64)
    # all six positive: only the identity reaches the observed sum
    assert paired_test(base + 1, base, "permutation", alternative="greater").p_value == pytest.approx(1 / 64)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_exact_matches_enumeration(alternative):
    rng = np.random.default_rng(7)
    a, b = rng.random(6), rng.random(6)
    d = a - b
    null = np.array([np.mean(np.array(s) * d) for s in itertools.product([1, -1], repeat=6)])
    obs = d.mean()
    tol = 1e-12
    p = {"greater": np.mean(null >= obs - tol), "less": np.mean(null <= obs + tol)}
    p["two-sided"] = min(1.0, 2 * min(p["greater"], p["less"]))
    assert paired_test(a, b, "permutation", alternative=alternative).p_value == pytest.approx(p[alternative])


def test_permutation_close_to_ttest_for_large_n():
    rng = np.random.default_rng(3)
    for shift in (0.0, 0.03, 0.06):
        d = rng.normal(shift, 1.0, 2000)
        p_perm = paired_test(d, np.zeros_like(d), "permutation", n_resamples=10_000).p_value
        p_t = paired_test(d, np.zeros_like(d), "ttest").p_value
        assert abs(p_perm - p_t) < 0.01 + 4 * math.sqrt(p_t * (1 - p_t) / 10_000)


def test_permutation_monte_carlo_matches_scipy_permutation_test():
    # n = 40 is too large to enumerate, so paired_test samples sign flips with
    # monte_carlo_test; scipy's own paired permutation test must agree within MC error.
    rng = np.random.default_rng(5)
    a = rng.random(40)
    b = a - rng.normal(0.05, 0.2, 40)
    res = paired_test(a, b, "permutation", n_resamples=5000, seed=1)
    ref = stats.permutation_test(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=5000,
        rng=2,
    )
    assert res.statistic == pytest.approx(ref.statistic)
    assert 0.01 < ref.pvalue < 0.5  # a p-value where MC error is informative
    assert abs(res.p_value - ref.pvalue) < 4 * math.sqrt(2 * ref.pvalue * (1 - ref.pvalue) / 5000)


def test_permutation_handles_22k_users():
    # the sampled sign-flip path (not scipy's per-user loop) must cope with a Beauty-sized test set
    rng = np.random.default_rng(0)
    a = rng.random(22_000)
    b = np.clip(a + rng.normal(0, 0.1, a.size), 0, 1)
    res = paired_test(a, b, "permutation", n_resamples=10_000)
    assert res.n == 22_000 and 0 < res.p_value <= 1


def test_bootstrap_p_value_inverts_its_interval():
    rng = np.random.default_rng(11)
    d = rng.normal(0.1, 1.0, 300)
    res = paired_test(d, np.zeros(300), "bootstrap", n_resamples=4000)
    assert res.ci_method == "bootstrap-percentile"
    # 0 is outside the (1 - alpha) percentile interval iff p < alpha (up to one resample)
    for alpha in (0.01, 0.05, 0.2):
        r = paired_test(d, np.zeros(300), "bootstrap", n_resamples=4000, confidence=1 - alpha)
        if abs(res.p_value - alpha) > 2 / 4000:
            assert (res.p_value < alpha) == (r.ci_low > 0 or r.ci_high < 0)
    assert res.p_value == pytest.approx(paired_test(d, np.zeros(300), "ttest").p_value, abs=0.02)


def test_identical_vectors_give_p_one_without_warnings():
    a = np.array([0.0, 0.5, 0.0, 1.0, 0.3])
    for test in ("ttest", "wilcoxon", "permutation", "bootstrap"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = paired_test(a, a.copy(), test)
        assert (res.p_value, res.statistic, res.ci_low, res.ci_high) == (1.0, 0.0, 0.0, 0.0)
        assert res.ci_method == "degenerate" and res.effect_size == 0.0


# --------------------------------------------------------------------------- calibration


def test_t_interval_covers_true_difference_95_percent():
    rng = np.random.default_rng(2024)
    true_diff, repeats = 0.3, 400
    covered = 0
    for _ in range(repeats):
        base = rng.random(25)
        a = base + true_diff + rng.normal(0, 1, 25)
        res = paired_test(a, base, "ttest")
        covered += res.ci_low <= true_diff <= res.ci_high
    lo, hi = binomial_bounds(repeats, 0.95)
    assert lo <= covered <= hi


def test_bootstrap_interval_covers_true_difference():
    rng = np.random.default_rng(99)
    true_diff, repeats = -0.2, 200
    covered = 0
    for i in range(repeats):
        d = true_diff + rng.exponential(1.0, 150) - 1.0  # skewed differences
        res = paired_test(d, np.zeros(150), "permutation", n_resamples=2000, seed=i)
        covered += res.ci_low <= true_diff <= res.ci_high
    lo, hi = binomial_bounds(repeats, 0.95)
    assert lo <= covered <= hi


@pytest.mark.parametrize("test", ["ttest", "wilcoxon"])
def test_a_a_rejection_rate_is_alpha(test):
    """Same model, different seeds: H0 holds, so p <= 0.05 in ~5% of repeats."""
    rng = np.random.default_rng(42)
    repeats, alpha = 200, 0.05
    rejections = 0
    for _ in range(repeats):
        difficulty = rng.standard_normal(300)
        runs_a = [ndcg_like(difficulty, rng) for _ in range(3)]
        runs_b = [ndcg_like(difficulty, rng) for _ in range(3)]
        res = paired_test_over_seeds(runs_a, runs_b, test=test, n_resamples=200)
        rejections += res.p_value <= alpha
    lo, hi = binomial_bounds(repeats, alpha)
    assert lo <= rejections <= hi


def test_pooling_seeds_and_users_over_rejects_but_seed_averaging_does_not():
    """Model B is better for some users and worse for others (mean 0 over users):
    pooling seeds x users counts each user 5 times and rejects far too often;
    averaging over seeds first keeps the user as the unit and stays calibrated."""
    rng = np.random.default_rng(8)
    repeats, alpha, seeds = 200, 0.05, 5
    pooled = averaged = 0
    for _ in range(repeats):
        user = rng.standard_normal(200)
        taste = rng.standard_normal(200)  # per-user advantage of B, mean 0
        runs_a = [user + 0.5 * rng.standard_normal(200) for _ in range(seeds)]
        runs_b = [user + taste + 0.5 * rng.standard_normal(200) for _ in range(seeds)]
        averaged += paired_test_over_seeds(runs_a, runs_b).p_value <= alpha
        pooled += paired_test(np.concatenate(runs_a), np.concatenate(runs_b)).p_value <= alpha
    lo, hi = binomial_bounds(repeats, alpha)
    assert lo <= averaged <= hi
    assert pooled > hi


# --------------------------------------------------------------------------- seeds


def test_seed_aggregate_and_over_seeds_keep_user_as_unit():
    a_runs = [np.array([0.1, 0.2, 0.3]), np.array([0.3, 0.2, 0.1])]
    b_runs = [np.array([0.0, 0.1, 0.2]), np.array([0.2, 0.1, 0.0]), np.array([0.1, 0.1, 0.1])]
    np.testing.assert_allclose(seed_aggregate(a_runs), [0.2, 0.2, 0.2])
    np.testing.assert_allclose(seed_aggregate(b_runs), [0.1, 0.1, 0.1])
    res = paired_test_over_seeds(a_runs, b_runs, test="wilcoxon", n_resamples=99)
    assert res.n == 3 and res.mean_diff == pytest.approx(0.1)
    assert res == paired_test(seed_aggregate(a_runs), seed_aggregate(b_runs), test="wilcoxon", n_resamples=99)


def test_mean_std_over_seeds():
    # 0.30, 0.32, 0.34: mean 0.32, squared deviations 0.0004 + 0 + 0.0004, / (3 - 1) -> std 0.02
    summary = mean_std_over_seeds([0.30, 0.32, 0.34])
    assert summary.mean == pytest.approx(0.32) and summary.std == pytest.approx(0.02) and summary.n == 3
    one = mean_std_over_seeds([0.3])
    assert one.mean == 0.3 and math.isnan(one.std) and one.n == 1


# --------------------------------------------------------------------------- multiple comparisons


def test_holm_worked_examples():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04;
    # running max -> 0.02, 0.03, 0.06, 0.06; back in input order:
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # NaN excluded, m = 3: 0.01*3 = 0.03, 0.2*2 = 0.4, 0.6*1 = 0.6
    np.testing.assert_allclose(holm([0.2, np.nan, 0.01, 0.6]), [0.4, np.nan, 0.03, 0.6])
    # 0.4*2 = 0.8, then 0.5*1 = 0.5 is raised to 0.8 by the running max
    np.testing.assert_allclose(holm([0.5, 0.4]), [0.8, 0.8])
    # 0.6*2 = 1.2 clipped to 1; 0.7 raised to 1
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])
    assert holm([]).size == 0 and np.isnan(holm([np.nan])).all()


def test_bh_worked_examples():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4/1, 4/2, 4/3, 4/4 -> 0.02, 0.02, 0.04, 0.04;
    # running min from the top changes nothing; back in input order:
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    # 0.01*4 = 0.04, 0.02*2 = 0.04, 0.025*4/3 = 0.0333, 0.5*1 = 0.5; running min from the
    # top pulls ranks 1 and 2 down to 0.0333
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.02, 0.025, 0.5]), [0.1 / 3] * 3 + [0.5])
    # NaN excluded, m = 2: 0.01*2 = 0.02, 0.03*1 = 0.03
    np.testing.assert_allclose(benjamini_hochberg([np.nan, 0.03, 0.01]), [np.nan, 0.03, 0.02])
    np.testing.assert_allclose(benjamini_hochberg([0.9, 0.8]), [0.9, 0.9])


@pytest.mark.parametrize("m", [1, 5, 50])
def test_bh_equals_scipy_false_discovery_control(m):
    rng = np.random.default_rng(m)
    p = np.round(rng.random(m) ** 3, 3)  # small p-values and ties
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"))


def _holm_rejects(p, alpha):
    """Holm's procedure itself: step down while p_(k) <= alpha / (m - k + 1)."""
    order, m = np.argsort(p), len(p)
    reject = np.zeros(m, dtype=bool)
    for k, i in enumerate(order):
        if p[i] > alpha / (m - k):
            break
        reject[i] = True
    return reject


def _bh_rejects(p, alpha):
    """BH's procedure itself: reject the k* smallest, k* = max{k: p_(k) <= k alpha / m}."""
    m = len(p)
    passing = [k for k in range(1, m + 1) if np.sort(p)[k - 1] <= k * alpha / m]
    return p <= np.sort(p)[max(passing) - 1] if passing else np.zeros(m, dtype=bool)


def test_adjusted_p_values_reproduce_the_procedures_decisions():
    """adj_i <= alpha iff the procedure rejects H_i at alpha, for every alpha."""
    rng = np.random.default_rng(17)
    for _ in range(50):
        p = rng.random(8) ** 4
        for alpha in rng.random(20) * 0.3:
            np.testing.assert_array_equal(holm(p) <= alpha, _holm_rejects(p, alpha))
            np.testing.assert_array_equal(benjamini_hochberg(p) <= alpha, _bh_rejects(p, alpha))


def test_adjustment_is_monotone_and_dominates_raw():
    p = np.random.default_rng(4).random(30) ** 2
    for adjust in (holm, benjamini_hochberg):
        adj = adjust(p)
        order = np.argsort(p)
        assert (np.diff(adj[order]) >= 0).all() and (adj >= p).all() and (adj <= 1).all()


# --------------------------------------------------------------------------- stars and intervals
# The tables themselves (each model against a reference, all pairs) are the report's:
# harness/report/results.py, tested in tests/test_report.py.


def test_mean_interval_is_the_t_interval_of_the_mean():
    values = [0.30, 0.32, 0.34]
    low, high = mean_interval(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert (low, high) == pytest.approx((0.32 - half, 0.32 + half))
    assert all(np.isnan(v) for v in mean_interval([0.3]))


def test_significance_marker():
    assert significance_marker(0.01, 0.05) == "*"
    assert significance_marker(0.05, 0.05) == "*"  # reject at p <= alpha
    assert significance_marker(0.0501, 0.05) == ""
    assert significance_marker(float("nan"), 0.05) == ""
    assert significance_marker(0.004, 0.01, marker="†") == "†"


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "a, b, message",
    [
        ([0.1, 0.2, 0.3], [0.1, 0.2], "same users"),
        ([0.1], [0.2], "at least 2 users"),
        ([0.1, np.nan], [0.2, 0.3], "finite"),
        ([0.1, 0.2], [np.inf, 0.3], "finite"),
        ([[0.1, 0.2]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_paired_test_rejects_bad_vectors(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_test(a, b)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"test": "ztest"}, "test must be one of"),
        ({"alternative": "bigger"}, "alternative must be one of"),
        ({"confidence": 95}, "confidence"),
        ({"n_resamples": 0}, "n_resamples"),
    ],
)
def test_paired_test_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        paired_test([0.1, 0.2, 0.3], [0.2, 0.2, 0.1], **options)


def test_other_validation_errors():
    with pytest.raises(ValueError, match="lie in"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match="lie in"):
        benjamini_hochberg([-0.1])
    with pytest.raises(ValueError, match="same users"):
        seed_aggregate([np.zeros(5), np.zeros(4)])
    with pytest.raises(ValueError, match="at least one"):
        seed_aggregate([])
    with pytest.raises(ValueError, match="at least one"):
        mean_std_over_seeds([])
    with pytest.raises(ValueError, match="finite"):
        mean_std_over_seeds([0.3, np.nan])


def test_result_types():
    res = paired_test([0.1, 0.2, 0.4], [0.0, 0.2, 0.1])
    assert isinstance(res, PairedResult) and isinstance(res.p_value, float) and isinstance(res.statistic, float)
