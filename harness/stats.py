"""Significance tests for comparing recommenders on per-user metric vectors.

Two sources of variance (docs/design.md#statistics): test users and training seeds.

- The default comparison of two models with 2+ seeds each, `seed_user_test`, has a
  null that includes both: the variance of the difference adds the seed-to-seed
  variance of each model's per-seed means to the user-level variance, with
  Satterthwaite degrees of freedom. It answers "does model A beat model B".
- The per-user paired tests (`paired_test`, `paired_test_over_seeds`) treat the
  trained networks as fixed: per-user vectors, same users, same order, each user's
  value averaged over a model's seeds first, never pooled with users into one
  sample. They answer the narrower "do these trained networks differ on these
  users", and are the only tests possible for a model with one seed.

The per-user tests come from scipy.stats; this module adds input checks, the
effect size, confidence and prediction intervals, the seed test and the
multiple-comparison corrections (Holm, Benjamini-Hochberg) that the report needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats

TESTS = ("ttest", "wilcoxon", "permutation", "bootstrap")
ALTERNATIVES = ("two-sided", "greater", "less")
EFFECT_SIZE_NAME = "cohens_dz"


@dataclass(frozen=True)
class PairedResult:
    """One paired comparison of model a against model b on the same users.

    `mean_diff`, the CI and the effect size are about d = a - b per user.
    `statistic` is the test's own: t for "ttest"; scipy's Wilcoxon signed-rank
    statistic for "wilcoxon" (min(W+, W-) two-sided, W+ one-sided); mean(d) for
    "permutation" and "bootstrap". `ci_method` says how the CI was obtained
    ("t", "bootstrap-percentile", or "degenerate" when every d is 0).
    One-sided alternatives give one-sided CIs (an infinite bound).
    """

    test: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    statistic: float
    p_value: float
    ci_low: float
    ci_high: float
    effect_size: float
    effect_size_name: str
    alternative: str = "two-sided"
    confidence: float = 0.95
    ci_method: str = "t"


class SeedSummary(NamedTuple):
    """Mean and sample standard deviation (ddof=1) of a metric over seeds."""

    mean: float
    std: float
    n: int


# --------------------------------------------------------------------------- checks


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
    return value


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"a and b must be 1-D per-user vectors; got shapes {a.shape} and {b.shape}.")
    if a.size != b.size:
        raise ValueError(f"a and b must hold one value per user for the same users; got lengths {a.size} and {b.size}.")
    if a.size < 2:
        raise ValueError(f"a paired test needs at least 2 users; got {a.size}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a and b must be finite (no NaN or inf per-user values).")
    return a, b


def _one_sided(low: float, high: float, alternative: str) -> tuple[float, float]:
    return (-math.inf if alternative == "less" else low, math.inf if alternative == "greater" else high)


def _batch(n: int) -> int:
    """Resamples per batch so one (batch, n) float array stays around 8 MB."""
    return max(1, 2**20 // n)


# --------------------------------------------------------------------------- paired tests


def cohens_dz(d: np.ndarray) -> float:
    """Cohen's d_z = mean(d) / sd(d, ddof=1) for paired differences d.

    The paired effect size: the mean difference in units of the spread of the
    per-user differences (not of the raw scores), so it matches what the paired
    tests see. 0 when all d are 0; +-inf when all d are equal and non-zero, also
    when they differ only by rounding (spread below float resolution).
    """
    d = np.asarray(d, dtype=float)
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    # a spread within rounding error of the values (a few ulps, growing like sqrt(n) in
    # the sums) is no spread: dividing by it would give ~1e15 instead of inf
    resolution = 4 * np.finfo(float).eps * float(np.max(np.abs(d))) * math.sqrt(d.size)
    if sd <= resolution:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


def _mean(x, axis):
    return np.mean(x, axis=axis)


def _sign_flip_test(d, alternative, n_resamples, rng):
    """Paired permutation test of mean(d): under H0 each user's d is +d or -d
    with probability 1/2, independently (swapping a user's two scores flips d).

    When all 2**n sign vectors fit in n_resamples, scipy.stats.permutation_test
    (permutation_type="samples") enumerates them: an exact p-value. Otherwise the
    same null is sampled with scipy.stats.monte_carlo_test, whose p-value rule is
    permutation_test's ((k+1)/(B+1), same tie tolerance, two-sided = 2*min of the
    one-sided ones). The reason: permutation_test's random "samples" path loops
    over users in Python (about 30 s for 22k users x 10k resamples), while drawing
    the signs as one array takes about 2 s.
    """
    if d.size <= math.log2(n_resamples):  # 2**n sign vectors fit
        res = stats.permutation_test(
            (d,),
            _mean,
            permutation_type="samples",
            vectorized=True,
            n_resamples=n_resamples,
            alternative=alternative,
        )
    else:

        def flipped(size):
            return d * (1 - 2 * rng.integers(0, 2, size, dtype=np.int8))

        res = stats.monte_carlo_test(
            d,
            flipped,
            _mean,
            vectorized=True,
            n_resamples=n_resamples,
            batch=_batch(d.size),
            alternative=alternative,
        )
    return float(res.statistic), float(res.pvalue)


def _bootstrap(d, alternative, n_resamples, confidence, rng):
    """Percentile bootstrap of mean(d) over users (scipy.stats.bootstrap).

    Percentile rather than BCa: for means over hundreds or thousands of users the
    two agree within Monte Carlo error, BCa's jackknife costs O(n^2) (seconds at
    22k users), and the percentile interval is what the bootstrap p-value inverts.
    """
    return stats.bootstrap(
        (d,),
        _mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        alternative=alternative,
        method="percentile",
        vectorized=True,
        batch=_batch(d.size),
        rng=rng,
    )


def _bootstrap_p(means: np.ndarray, alternative: str) -> float:
    """p-value by inverting the percentile interval: the smallest alpha whose
    (1 - alpha) interval excludes 0. 'greater' (H1: mean d > 0) counts bootstrap
    means <= 0, 'less' those >= 0, two-sided doubles the smaller. The +1 keeps
    the p-value above 0, as for permutation p-values."""
    B = means.size
    p_greater = (np.count_nonzero(means <= 0) + 1) / (B + 1)
    p_less = (np.count_nonzero(means >= 0) + 1) / (B + 1)
    if alternative == "greater":
        return float(p_greater)
    if alternative == "less":
        return float(p_less)
    return float(min(1.0, 2 * min(p_greater, p_less)))


def paired_test(
    a,
    b,
    test: str = "ttest",
    alternative: str = "two-sided",
    n_resamples: int = 10_000,
    seed: int | None = 0,
    confidence: float = 0.95,
    zero_method: str = "wilcox",
) -> PairedResult:
    """Paired test of per-user metrics a vs b (same users, same order).

    - "ttest": scipy.stats.ttest_rel, t-interval for mean(a - b). The default:
      with thousands of users the mean difference is close to normal even for
      skewed metrics such as NDCG, and the test is about the mean, which is the
      number the table reports.
    - "wilcoxon": scipy.stats.wilcoxon signed-rank test (of symmetry of d about
      0, not of the mean). zero_method="wilcox" (default) drops users with
      d == 0, typically users both models miss entirely, so the result does not
      change when such users are added; "pratt" and "zsplit" are passed through.
    - "permutation": paired sign-flip test of mean(d), exact for small n (see
      `_sign_flip_test`).
    - "bootstrap": percentile bootstrap of mean(d); p-value by inverting the
      interval. Slightly liberal for small n (below ~30 users prefer the others).

    The CI is of mean(a - b): the t-interval for "ttest", a percentile bootstrap
    interval (scipy.stats.bootstrap, n_resamples, seed) for the others. The
    effect size is Cohen's d_z (see `cohens_dz`). `seed` drives all resampling.
    If every user's difference is 0 the models are indistinguishable on these
    users: p = 1, statistic = 0, CI = [0, 0], without calling scipy.
    """
    _choice("test", test, TESTS)
    _choice("alternative", alternative, ALTERNATIVES)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1; got {confidence}.")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be a positive integer; got {n_resamples}.")
    a, b = _paired(a, b)
    d = a - b
    rng = np.random.default_rng(seed)
    ci_method = "bootstrap-percentile"

    if not d.any():
        statistic, p = 0.0, 1.0
        ci, ci_method = _one_sided(0.0, 0.0, alternative), "degenerate"
    elif test == "ttest":
        res = stats.ttest_rel(a, b, alternative=alternative)
        statistic, p = float(res.statistic), float(res.pvalue)
        ci, ci_method = res.confidence_interval(confidence), "t"
    elif test == "bootstrap":
        boot = _bootstrap(d, alternative, int(n_resamples), confidence, rng)
        statistic, p = float(d.mean()), _bootstrap_p(boot.bootstrap_distribution, alternative)
        ci = boot.confidence_interval
    else:
        if test == "wilcoxon":
            res = stats.wilcoxon(a, b, zero_method=zero_method, alternative=alternative)
            statistic, p = float(res.statistic), float(res.pvalue)
        else:
            statistic, p = _sign_flip_test(d, alternative, int(n_resamples), rng)
        ci = _bootstrap(d, alternative, int(n_resamples), confidence, rng).confidence_interval

    return PairedResult(
        test=test,
        n=int(d.size),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float(d.mean()),
        statistic=statistic,
        p_value=p,
        ci_low=float(ci[0]),
        ci_high=float(ci[1]),
        effect_size=cohens_dz(d),
        effect_size_name=EFFECT_SIZE_NAME,
        alternative=alternative,
        confidence=confidence,
        ci_method=ci_method,
    )


# --------------------------------------------------------------------------- seeds


def seed_aggregate(per_seed_vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Each user's metric averaged over a model's seeds: (n_users,) from
    n_seeds vectors of (n_users,), all on the same users in the same order."""
    if len(per_seed_vectors) == 0:
        raise ValueError("seed_aggregate needs at least one per-seed vector.")
    vectors = [np.asarray(v, dtype=float) for v in per_seed_vectors]
    shapes = {v.shape for v in vectors}
    if len(shapes) != 1 or vectors[0].ndim != 1:
        raise ValueError(f"per-seed vectors must be 1-D and cover the same users; got shapes {sorted(shapes)}.")
    stacked = np.stack(vectors)
    if not np.isfinite(stacked).all():
        raise ValueError("per-seed vectors must be finite (no NaN or inf per-user values).")
    return stacked.mean(axis=0)


def paired_test_over_seeds(a_by_seed, b_by_seed, **test_options) -> PairedResult:
    """Paired test of two models trained with several seeds each.

    Each user's metric is averaged over the seeds of each model first, then the
    seed-averaged vectors are compared with `paired_test` (same options). The
    user stays the unit, n = number of users: averaging removes training noise
    from each user's score, whereas pooling seeds x users into one sample would
    count every user n_seeds times as if independent and make p-values too small
    whenever a model's advantage varies by user. The models may have different
    numbers of seeds.

    The p-value treats the trained seeds as given: it does not include the
    between-seed variance of training, so it answers "do these trained networks
    differ on these users". Two seeds of the same model differ by this test far
    more often than alpha; `seed_user_test` is the test of the models.
    """
    return paired_test(seed_aggregate(a_by_seed), seed_aggregate(b_by_seed), **test_options)


def mean_std_over_seeds(values) -> SeedSummary:
    """Mean and sample standard deviation (ddof=1) of one metric over seeds
    (e.g. overall NDCG@10 of each seed's run). std is NaN for a single seed."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("mean_std_over_seeds needs at least one value.")
    if not np.isfinite(x).all():
        raise ValueError("per-seed values must be finite (no NaN or inf).")
    std = float(np.std(x, ddof=1)) if x.size > 1 else math.nan
    return SeedSummary(float(x.mean()), std, int(x.size))


# --------------------------------------------------------------------------- seeds and users


SEED_TEST = "seeds"


@dataclass(frozen=True)
class SeedUserResult:
    """Model a vs model b when both the training seeds and the test users are random.

    The question is "does the training procedure of a beat that of b on users like
    these", so the null includes seed-to-seed variation (docs/design.md#statistics). The
    difference is of the model means, mean over seeds of each seed's mean over users
    (equal to the mean over users of the seed-averaged per-user difference).

    se**2 = var_seeds_a / n_seeds_a + var_seeds_b / n_seeds_b + var_users / n_users:
    `var_seeds_*` are the sample variances of a model's per-seed means (ddof=1);
    `var_users` is the user-by-model interaction variance, the part of the per-user
    spread of differences that is not seed-by-user noise already inside the seed
    means (see `seed_user_test`). `df` combines the two parts (Satterthwaite, the seed
    part at Hsu's min(nA, nB) - 1). `p_a_beats_b` is the share
    of (seed of a, seed of b) pairs whose a-mean is higher, ties counting one half
    (Bouthillier et al. 2021's P(A > B)); it is descriptive, not a test.
    """

    test: str
    n_users: int
    n_seeds_a: int
    n_seeds_b: int
    mean_a: float
    mean_b: float
    mean_diff: float
    se: float
    statistic: float
    df: float
    p_value: float
    ci_low: float
    ci_high: float
    var_seeds_a: float
    var_seeds_b: float
    var_users: float
    p_a_beats_b: float
    alternative: str = "two-sided"
    confidence: float = 0.95
    ci_method: str = "t-hsu-satterthwaite"


def _seed_matrix(name: str, per_seed_vectors) -> np.ndarray:
    """(seeds, users) from a list of per-seed vectors or a 2-D array; finite."""
    matrix = np.asarray([np.asarray(v, dtype=float) for v in per_seed_vectors], dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"{name}: per-seed vectors must be 1-D and cover the same users; got {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name}: per-seed vectors must be finite (no NaN or inf per-user values).")
    return matrix


def seed_by_user_variance(matrix: np.ndarray) -> float:
    """Residual mean square of the two-way (seed x user) layout of one model: the
    variance of a user's value around its seed's and its user's means, which
    estimates the seed-by-user noise sigma_e**2 (0 with one seed: nothing to
    estimate, and nothing needed since such a model is not tested)."""
    n_seeds, n_users = matrix.shape
    if n_seeds < 2:
        return 0.0
    residual = matrix - matrix.mean(axis=1, keepdims=True) - matrix.mean(axis=0, keepdims=True) + matrix.mean()
    return float(np.sum(residual**2) / ((n_seeds - 1) * (n_users - 1)))


def prob_a_beats_b(seed_means_a, seed_means_b) -> float:
    """Share of (seed of a, seed of b) pairs with a's metric higher; ties count 1/2."""
    a = np.asarray(seed_means_a, dtype=float)[:, None]
    b = np.asarray(seed_means_b, dtype=float)[None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))


def seed_user_test(
    a_by_seed,
    b_by_seed,
    alternative: str = "two-sided",
    confidence: float = 0.95,
) -> SeedUserResult:
    """Compare two models trained with 2+ seeds each on the same test users, with a
    null that includes the variation between training seeds.

    The model behind it is the crossed random-effects model of a metric y for model
    M, seed s, user u:  y = mu_M + user_u + (M x user)_u + seed_Ms + e_Msu.
    The difference of the model means D = mean_s m_As - mean_s m_Bs (m = a seed's
    mean over users) has variance
        sigma_bA**2/nA + sigma_bB**2/nB + sigma_int**2/U + sigma_eA**2/(nA U) + sigma_eB**2/(nB U).
    The users are shared, so the user main effect cancels (the seed means are paired
    over users). Method-of-moments estimates (Searle, Casella and McCulloch 1992, ch. 4):
    - var(m_As) over seeds estimates sigma_bA**2 + sigma_eA**2 / U (seed effect plus
      the seed-by-user noise averaged over users), so var_A / nA covers both;
    - the per-user differences of seed-averaged values d_u have variance
      sigma_int**2 + sigma_eA**2/nA + sigma_eB**2/nB; subtracting the seed-by-user
      residual mean squares (`seed_by_user_variance`) leaves the interaction, which is
      not in the seed means (it is the same for every seed). Truncated at 0.
    The t statistic D / se is referred to a t distribution whose degrees of freedom
    combine the two parts of se**2 by Satterthwaite's rule (Satterthwaite 1946), with
    the seed part counted at min(nA, nB) - 1 df: Hsu's conservative solution of the
    Behrens-Fisher problem (Hsu 1938; Mickey and Brown 1966; Scheffe 1970), because
    Welch's estimated df over-rejects with 2-3 seeds when the variances differ
    (about 9% at alpha 0.05 for 2 vs 3 seeds, sd ratio 6). With the user part
    negligible this is the Welch statistic on the seed means at min(nA, nB) - 1 df
    (2 df with 3 seeds: little power, by design); as the user part dominates the df
    grow towards the per-user paired t-test's.
    """
    _choice("alternative", alternative, ALTERNATIVES)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1; got {confidence}.")
    A, B = _seed_matrix("a", a_by_seed), _seed_matrix("b", b_by_seed)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"a and b must cover the same users; got {A.shape[1]} and {B.shape[1]} users.")
    (n_a, n_users), n_b = A.shape, B.shape[0]
    if n_a < 2 or n_b < 2:
        raise ValueError(
            f"the seed test needs at least 2 seeds per model (got {n_a} and {n_b}): with one "
            "seed the variation between trainings cannot be estimated."
        )
    if n_users < 2:
        raise ValueError(f"the seed test needs at least 2 users; got {n_users}.")
    means_a, means_b = A.mean(axis=1), B.mean(axis=1)
    d = A.mean(axis=0) - B.mean(axis=0)
    var_a, var_b = float(np.var(means_a, ddof=1)), float(np.var(means_b, ddof=1))
    interaction = float(np.var(d, ddof=1)) - seed_by_user_variance(A) / n_a - seed_by_user_variance(B) / n_b
    var_users = max(interaction, 0.0)
    # two parts of se**2: the seeds' (few df) and the users' (n_users - 1 df); the seed
    # part gets Hsu's min(nA, nB) - 1 df, not Welch's estimate (liberal with 2-3 seeds)
    parts = np.array([var_a / n_a + var_b / n_b, var_users / n_users])
    part_df = np.array([min(n_a, n_b) - 1, n_users - 1], dtype=float)
    se = math.sqrt(parts.sum())
    diff = float(means_a.mean() - means_b.mean())
    if se == 0.0:  # identical seed means and no user spread: nothing to test
        statistic, df, p = 0.0, math.inf, 1.0 if diff == 0.0 else 0.0
        ci, ci_method = _one_sided(diff, diff, alternative), "degenerate"
    else:
        ci_method = "t-hsu-satterthwaite"
        statistic = diff / se
        df = float(parts.sum() ** 2 / np.sum(parts**2 / part_df))
        t = stats.t(df)
        if alternative == "greater":
            p, ci = float(t.sf(statistic)), (diff - t.ppf(confidence) * se, math.inf)
        elif alternative == "less":
            p, ci = float(t.cdf(statistic)), (-math.inf, diff + t.ppf(confidence) * se)
        else:
            half = t.ppf(0.5 + confidence / 2) * se
            p, ci = float(min(1.0, 2 * t.sf(abs(statistic)))), (diff - half, diff + half)
    return SeedUserResult(
        test=SEED_TEST,
        n_users=int(n_users),
        n_seeds_a=int(n_a),
        n_seeds_b=int(n_b),
        mean_a=float(means_a.mean()),
        mean_b=float(means_b.mean()),
        mean_diff=diff,
        se=se,
        statistic=float(statistic),
        df=float(df),
        p_value=float(p),
        ci_low=float(ci[0]),
        ci_high=float(ci[1]),
        var_seeds_a=var_a,
        var_seeds_b=var_b,
        var_users=var_users,
        p_a_beats_b=prob_a_beats_b(means_a, means_b),
        alternative=alternative,
        confidence=confidence,
        ci_method=ci_method,
    )


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """t-interval of the mean of `values` (a model's per-seed means, or one run's per-user values):
    mean +- t_{n-1} * sd / sqrt(n). (nan, nan) below 2 values."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def prediction_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Interval that holds one new run's metric with probability `confidence`, from
    n >= 2 seeds: mean +- t_{n-1} * sd * sqrt(1 + 1/n) (normal seeds). The interval to
    hold a single published run against; the CI of the mean (without the 1) is for
    our mean. (nan, nan) below 2 seeds."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) * math.sqrt(1 + 1 / x.size)
    return float(x.mean() - half), float(x.mean() + half)


# --------------------------------------------------------------------------- multiple comparisons


def _adjust(pvalues, step_down: bool) -> np.ndarray:
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p-values must be a 1-D sequence; got shape {p.shape}.")
    ok = ~np.isnan(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError("p-values must lie in [0, 1] (NaN allowed).")
    q = p[ok]
    m = q.size
    order = np.argsort(q, kind="stable")
    rank = np.arange(1, m + 1)
    if step_down:  # Holm: max over j <= i of (m - j + 1) p_(j)
        sorted_adj = np.maximum.accumulate((m - rank + 1) * q[order])
    else:  # Benjamini-Hochberg: min over j >= i of m p_(j) / j
        sorted_adj = np.minimum.accumulate((m / rank * q[order])[::-1])[::-1]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(sorted_adj, 1.0)
    out = np.full(p.shape, np.nan)
    out[ok] = adjusted
    return out


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error rate).

    Sorted p_(1) <= ... <= p_(m): adj_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)).
    Reject H_i at level alpha iff adj_i <= alpha. Valid under any dependence,
    uniformly more powerful than Bonferroni: the correction for "reference vs
    each baseline" in one table. NaNs stay NaN and do not count in m.
    """
    return _adjust(pvalues, step_down=True)


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate).

    adj_(i) = min_{j>=i} min(1, m p_(j) / j); equals
    scipy.stats.false_discovery_control(method="bh") on NaN-free input. For
    exploratory all-pairs tables, where controlling the FWER is too strict.
    NaNs stay NaN and do not count in m.
    """
    return _adjust(pvalues, step_down=False)


# --------------------------------------------------------------------------- stars


def significance_marker(p_adjusted: float, alpha: float = 0.05, marker: str = "*") -> str:
    """`marker` when the adjusted p-value is <= alpha, else "" (also for NaN).
    One level only: the table shows effect sizes and CIs, not a star scale."""
    return marker if p_adjusted is not None and not math.isnan(p_adjusted) and p_adjusted <= alpha else ""
