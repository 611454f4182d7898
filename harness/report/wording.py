"""How a report names its significance tests in paragraphs and captions: one wording, used by the
opening paragraph and by every table that carries a star."""

from __future__ import annotations

from harness import stats
from harness.report import results as rs
from harness.report.options import ReportOptions

TEST_NAMES = {
    stats.SEED_TEST: "seed-and-user t-test (seed variance in the null, Hsu-Satterthwaite df)",
    "ttest": "paired t-test",
    "wilcoxon": "Wilcoxon signed-rank test",
    "permutation": "paired sign-flip permutation test",
    "bootstrap": "paired percentile bootstrap test",
}


def by_seeds(options: ReportOptions) -> bool:
    return options.test == stats.SEED_TEST


def test_description(options: ReportOptions) -> str:
    user_test = TEST_NAMES[rs.user_test_of(options.test)]
    if by_seeds(options):
        return (
            f"{TEST_NAMES[options.test]} on each model's per-seed and per-user metrics, for models with 2 "
            "or more seeds (one-seed rows are not tested: one run says nothing about training "
            f"randomness); beside it the {user_test} over users of the trained networks"
        )
    return (
        f"{user_test} on per-user metrics (each user's metric averaged over a model's seeds): it tests "
        "these trained networks on these users, not the models (seed variation is not in its null)"
    )


def test_phrase(options: ReportOptions, n_users) -> str:
    if by_seeds(options):
        return (
            f"{TEST_NAMES[options.test]}: the difference of the model means over seeds, its variance the "
            f"seed-to-seed variance of both models plus the user-level variance over {n_users} test "
            "users, so retraining is in the null"
        )
    return (
        f"{TEST_NAMES[options.test]} on per-user values over {n_users} test users (each user's metric "
        "averaged over a model's seeds first): a test of these trained networks, seed variation not in "
        "its null"
    )


def confidence_percent(options: ReportOptions) -> int:
    return int(round((1 - options.alpha) * 100))


def ci_caption(options: ReportOptions, comparisons, adjusted_name: str) -> str:
    """The CIs are per comparison; say so, and explain rows whose CI excludes 0 but whose adjusted
    p-value is above alpha (the adjustment, not the interval, decides the star)."""
    text = (
        f" The {confidence_percent(options)}% CIs are unadjusted (per comparison, not corrected for "
        f"multiplicity), so a CI that excludes 0 does not by itself mean significant: the star needs the "
        f"{adjusted_name} p-value <= {options.alpha}."
    )
    mismatched = [
        c for c in comparisons if c.testable and not c.significant and (c.primary.ci_low > 0 or c.primary.ci_high < 0)
    ]
    if mismatched:
        text += (
            f" {len(mismatched)} row(s) here have a CI excluding 0 and 'no': significant before, "
            f"not after the {adjusted_name} adjustment."
        )
    return text
