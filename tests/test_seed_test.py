"""The default comparison, harness.stats.seed_user_test: seeds and users both in the null.

- agreement with independent computations (scipy's Welch statistic when there is no user-level
  term; a two-way ANOVA by sums of squares otherwise) and an unbiased variance of the difference;
- calibration: same model, different seeds, rejects at most alpha of the time, on simulated data and
  on data built from the committed paper_beauty store's per-user values, while the per-user test of
  the trained networks over-rejects on the same data (its rate is printed beside);
- P(A > B) over seeds, the prediction interval for one run, d_z for constant differences.
Counts are compared with binomial bounds at the 0.1% level, as in test_stats.py.
"""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from harness.stats import (
    cohens_dz,
    paired_test_over_seeds,
    prediction_interval,
    prob_a_beats_b,
    seed_by_user_variance,
    seed_user_test,
)

ALPHA = 0.05
STORE = Path(__file__).resolve().parents[1] / "reports" / "paper_beauty" / "store"  # the committed text-record store


def upper_bound(n, p=ALPHA, tail=0.001):
    """A rejection count above this has probability < tail if the true rate is p."""
    return stats.binom.isf(tail, n, p)


def ndcg_runs(difficulty, rng, n_seeds, seed_sd, shift=0.0):
    """Per-user NDCG@10 of n_seeds trainings: per-user difficulty (shared by all runs), a per-seed
    shift of the whole model (seed_sd, on the log-rank scale) and per-seed per-user noise."""
    runs = []
    for _ in range(n_seeds):
        log_rank = (
            2.0
            + 1.5 * difficulty
            + 0.8 * rng.standard_normal(difficulty.size)
            - shift
            - seed_sd * rng.standard_normal()
        )
        rank = 1 + np.floor(np.exp(log_rank))
        runs.append(np.where(rank <= 10, 1 / np.log2(rank + 1), 0.0))
    return np.array(runs)


# ----------------------------------------------------------------------------- independent checks


def test_without_user_spread_it_is_welch_on_seed_means_at_hsu_df():
    """Each seed's per-user vector = shared user effect + a seed constant: no seed-by-user noise, no
    interaction, so the test is Welch's statistic on the seed means, referred to t(min(nA, nB) - 1)."""
    rng = np.random.default_rng(3)
    user = rng.random(40)
    a_means, b_means = np.array([0.31, 0.35, 0.30]), np.array([0.27, 0.26])
    a = user + a_means[:, None]
    b = user + b_means[:, None]
    res = seed_user_test(a, b)
    welch = stats.ttest_ind(a_means, b_means, equal_var=False)
    assert res.var_users == pytest.approx(0.0, abs=1e-15)
    assert res.statistic == pytest.approx(welch.statistic, rel=1e-9)
    assert res.df == pytest.approx(1.0)  # min(3, 2) - 1
    assert res.p_value == pytest.approx(2 * stats.t.sf(abs(welch.statistic), 1), rel=1e-9)
    se = (a_means.mean() - b_means.mean()) / welch.statistic
    half = stats.t.ppf(0.975, 1) * se
    assert (res.ci_low, res.ci_high) == pytest.approx((res.mean_diff - half, res.mean_diff + half), rel=1e-9)
    assert res.mean_diff == pytest.approx(a_means.mean() - b_means.mean())
    assert res.p_a_beats_b == 1.0 and (res.n_seeds_a, res.n_seeds_b, res.n_users) == (3, 2, 40)


def _anova_by_sums_of_squares(y):
    """Seed-by-user residual mean square of a (seeds, users) table by the textbook identity
    SS_residual = SS_total - SS_seeds - SS_users, written with loops (independent of the module)."""
    n, u = len(y), len(y[0])
    grand = sum(sum(row) for row in y) / (n * u)
    seed_means = [sum(row) / u for row in y]
    user_means = [sum(y[s][j] for s in range(n)) / n for j in range(u)]
    ss_total = sum((y[s][j] - grand) ** 2 for s in range(n) for j in range(u))
    ss_seeds = u * sum((m - grand) ** 2 for m in seed_means)
    ss_users = n * sum((m - grand) ** 2 for m in user_means)
    return (ss_total - ss_seeds - ss_users) / ((n - 1) * (u - 1))


def test_against_an_independent_implementation_on_small_data():
    rng = np.random.default_rng(11)
    user = rng.normal(size=12)
    a = (user + 1.5 * rng.normal(size=12)) + rng.normal(0, 0.3, (3, 1)) + rng.normal(0, 0.5, (3, 12)) + 0.2
    b = user + rng.normal(0, 0.1, (4, 1)) + rng.normal(0, 0.5, (4, 12))
    res = seed_user_test(a, b, confidence=0.9)
    # by hand, from the definitions in seed_user_test's docstring
    ma, mb = [sum(r) / 12 for r in a.tolist()], [sum(r) / 12 for r in b.tolist()]
    var_a = sum((m - sum(ma) / 3) ** 2 for m in ma) / 2
    var_b = sum((m - sum(mb) / 4) ** 2 for m in mb) / 3
    d = [sum(a[:, j]) / 3 - sum(b[:, j]) / 4 for j in range(12)]
    var_d = sum((x - sum(d) / 12) ** 2 for x in d) / 11
    interaction = max(
        var_d - _anova_by_sums_of_squares(a.tolist()) / 3 - _anova_by_sums_of_squares(b.tolist()) / 4, 0.0
    )
    seed_part, user_part = var_a / 3 + var_b / 4, interaction / 12
    se = math.sqrt(seed_part + user_part)
    df = (seed_part + user_part) ** 2 / (seed_part**2 / 2 + user_part**2 / 11)
    diff = sum(ma) / 3 - sum(mb) / 4
    assert seed_by_user_variance(a) == pytest.approx(_anova_by_sums_of_squares(a.tolist()))
    assert res.mean_diff == pytest.approx(diff) and res.se == pytest.approx(se) and res.df == pytest.approx(df)
    assert res.p_value == pytest.approx(2 * stats.t.sf(abs(diff / se), df))
    half = stats.t.ppf(0.95, df) * se
    assert (res.ci_low, res.ci_high) == pytest.approx((diff - half, diff + half))
    assert res.var_users == pytest.approx(interaction) and res.var_users > 0
    one_sided = seed_user_test(a, b, alternative="greater")
    assert one_sided.p_value == pytest.approx(stats.t.sf(diff / se, df)) and one_sided.ci_high == math.inf


def test_variance_of_the_difference_is_unbiased():
    """Over repeated draws of seeds and users from the crossed model, the mean of se**2 matches the
    variance of the estimated difference (within Monte Carlo error): every source is counted once."""
    rng = np.random.default_rng(5)
    users, repeats, n_a, n_b = 200, 3000, 3, 2
    diffs, variances = [], []
    for _ in range(repeats):
        user = rng.normal(0, 1, users)
        interaction = rng.normal(0, 0.6, users)  # the models rank users differently
        a = user + interaction + rng.normal(0, 0.05, (n_a, 1)) + rng.normal(0, 0.8, (n_a, users))
        b = user + rng.normal(0, 0.02, (n_b, 1)) + rng.normal(0, 0.8, (n_b, users))
        res = seed_user_test(a, b)
        diffs.append(res.mean_diff)
        variances.append(res.se**2)
    ratio = np.mean(variances) / np.var(diffs, ddof=1)
    assert 0.93 < ratio < 1.07  # the sampling sd of this ratio is about 0.026


def test_refuses_one_seed_and_bad_input():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_user_test(np.zeros((1, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="same users"):
        seed_user_test(np.zeros((2, 5)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="finite"):
        seed_user_test(np.full((2, 5), np.nan), np.zeros((2, 5)))
    same = seed_user_test(np.ones((2, 5)), np.ones((3, 5)))
    assert same.p_value == 1.0 and same.ci_low == same.ci_high == 0.0


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "n_a, n_b, sd_a, sd_b, users",
    [
        (2, 2, 0.1, 0.1, 400),
        (3, 3, 0.1, 0.1, 400),
        (3, 3, 0.03, 0.03, 2000),
        (2, 3, 0.3, 0.05, 400),  # the hard case for Welch's df: few seeds on the noisy side
        (3, 2, 0.3, 0.05, 400),
    ],
)
def test_same_model_different_seeds_rejects_at_most_alpha(n_a, n_b, sd_a, sd_b, users):
    """Two groups of seeds of one model (the two groups may differ in seed spread, as two models
    would): the default test rejects at most alpha of the time; the per-user test, which leaves
    seed variation out of its null, rejects far more often on the same data."""
    rng = np.random.default_rng([n_a, n_b, users])
    repeats = 400
    default = per_user = 0
    for _ in range(repeats):
        difficulty = rng.standard_normal(users)
        a = ndcg_runs(difficulty, rng, n_a, sd_a)
        b = ndcg_runs(difficulty, rng, n_b, sd_b)
        default += seed_user_test(a, b).p_value <= ALPHA
        per_user += paired_test_over_seeds(list(a), list(b)).p_value <= ALPHA
    print(
        f"\nsimulated {n_a} vs {n_b} seeds (seed sd {sd_a}/{sd_b}, {users} users): false-positive rate "
        f"default {default / repeats:.3f}, per-user {per_user / repeats:.3f}"
    )
    assert default <= upper_bound(repeats)
    assert per_user > upper_bound(repeats)  # the data have seed effects the per-user test ignores


def test_it_finds_a_real_difference_with_three_seeds():
    rng = np.random.default_rng(9)
    repeats, found = 100, 0
    for _ in range(repeats):
        difficulty = rng.standard_normal(3000)
        a = ndcg_runs(difficulty, rng, 3, 0.02, shift=0.12)
        b = ndcg_runs(difficulty, rng, 3, 0.02)
        found += seed_user_test(a, b).p_value <= ALPHA
    assert found >= 50  # power about 0.8 here; a test that never rejects would pass calibration


# ----------------------------------------------------------------------------- committed store


def _committed_seed_runs():
    """Per-user metric tables (seeds, users) of every paper_beauty model with 2+ seeds, by metric."""
    from harness.report import results as rs
    from harness.store.reader import Store

    store = Store(str(STORE))
    runs, _, _ = rs.select_result_runs(store.runs(store.experiments()), "auto")
    groups, _ = rs.group_runs(runs)
    per_user = rs.PerUser(store)
    tables = {}
    for row in groups[0].rows:
        if len(row.runs) < 2:
            continue
        for metric in rs.DEFAULT_METRICS:
            _, vectors, problem = per_user.vectors(row, metric)
            assert not problem
            tables[(row.model, metric)] = np.array(vectors)
    return tables


@pytest.fixture(scope="module")
def committed():
    assert (STORE / "experiments.json").is_file(), "reports/paper_beauty/store is committed with the code"
    return _committed_seed_runs()


def test_committed_store_seed_vs_seed(committed):
    """The issue's check on real runs: two seeds of the same model. With one seed a side the default
    test refuses (not testable, no star); the per-user test calls many such pairs different."""
    per_user, refused, total = 0, 0, 0
    for table in committed.values():
        for i, j in itertools.combinations(range(len(table)), 2):
            total += 1
            per_user += paired_test_over_seeds([table[i]], [table[j]]).p_value <= ALPHA
            with pytest.raises(ValueError, match="at least 2 seeds"):
                seed_user_test(table[[i]], table[[j]])
            refused += 1
    print(
        f"\npaper_beauty seed vs seed ({total} comparisons): default not testable in {refused}, "
        f"per-user test p <= 0.05 in {per_user}"
    )
    assert refused == total
    assert per_user > 2 * ALPHA * total  # 11 of 81 here (the comparisons share seeds and metrics)


def test_committed_store_anchored_null_rejects_at_most_alpha(committed):
    """Same model, 3 vs 3 seeds, built from the committed runs (each model has only 3 seeds, one
    short of two groups of 2+): a new seed takes each user's value from one of the model's real seeds
    at random (real per-user values and seed-by-user noise) plus a whole-seed shift whose variance is
    the largest seed effect the store shows for that metric (max over models of var(seed means) minus
    the seed-by-user part). The default test stays at most alpha; the per-user test is printed."""
    rng = np.random.default_rng(2020)
    metrics = sorted({m for _, m in committed})
    seed_effect = {}
    for metric in metrics:
        effects = [
            np.var(t.mean(axis=1), ddof=1) - seed_by_user_variance(t) / t.shape[1]
            for (_, m), t in committed.items()
            if m == metric
        ]
        seed_effect[metric] = math.sqrt(max(max(effects), 0.0))
    repeats, default, per_user, total = 12, 0, 0, 0
    for (_model, metric), table in sorted(committed.items()):
        n_seeds, users = table.shape
        for _ in range(repeats):
            picks = rng.integers(0, n_seeds, (2 * n_seeds, users))
            fresh = table[picks, np.arange(users)] + seed_effect[metric] * rng.standard_normal((2 * n_seeds, 1))
            a, b = fresh[:n_seeds], fresh[n_seeds:]
            default += seed_user_test(a, b).p_value <= ALPHA
            per_user += paired_test_over_seeds(list(a), list(b)).p_value <= ALPHA
            total += 1
    print(
        f"\npaper_beauty-anchored null, 3 vs 3 seeds ({total} comparisons): false-positive rate default "
        f"{default / total:.3f}, per-user {per_user / total:.3f}"
    )
    assert default <= upper_bound(total)
    assert per_user > upper_bound(total)


# ----------------------------------------------------------------------------- small pieces


def test_probability_a_beats_b_over_seed_pairs():
    # pairs: (0.3 > 0.2, 0.3 = 0.3, 0.1 < 0.2, 0.1 < 0.3) -> (1 + 0.5 + 0 + 0) / 4
    assert prob_a_beats_b([0.3, 0.1], [0.2, 0.3]) == pytest.approx(0.375)
    assert prob_a_beats_b([0.5], [0.4]) == 1.0


def test_prediction_interval_for_one_run_by_hand():
    # 0.30, 0.32, 0.34: mean 0.32, sd 0.02; half width t(0.975, 2) * 0.02 * sqrt(1 + 1/3)
    low, high = prediction_interval([0.30, 0.32, 0.34])
    half = 4.302652729911275 * 0.02 * math.sqrt(4 / 3)
    assert (low, high) == pytest.approx((0.32 - half, 0.32 + half))
    assert all(math.isnan(v) for v in prediction_interval([0.3]))


def test_cohens_dz_for_constant_and_near_constant_differences():
    assert cohens_dz(np.full(10, 0.1)) == math.inf
    assert cohens_dz(np.full(10, -0.1)) == -math.inf
    assert cohens_dz(np.zeros(10)) == 0.0
    # 0.1 - 0.07 is not exactly 0.03 in binary: differences equal up to rounding are constant
    near = np.array([0.1 - 0.07, 0.03, 0.13 - 0.1, 0.03] * 50)
    assert np.std(near, ddof=1) > 0 and cohens_dz(near) == math.inf
    assert cohens_dz(np.array([0.1, 0.2, 0.3])) == pytest.approx(2.0)  # a real spread is kept
