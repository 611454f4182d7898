"""The companion tables of a results table: each row against the reference model (Holm), and the
exploratory all-pairs table on the primary metric (Benjamini-Hochberg); docs/design.md#statistics."""

from __future__ import annotations

from collections.abc import Sequence

from harness.report import results as rs
from harness.report import tables as tb
from harness.report import wording
from harness.report.options import Context

REFERENCE_CSV_COLUMNS = [
    "metric",
    "model",
    "hidden",
    "variant",
    "reference_model",
    "reference_hidden",
    "reference_variant",
    "n_users",
    "n_seeds",
    "n_seeds_reference",
    "mean_model",
    "mean_reference",
    "mean_diff",
    "test",
    "testable",
    "se",
    "df",
    "statistic",
    "ci_low",
    "ci_high",
    "ci_method",
    "p_value",
    "p_holm",
    "significant",
    "p_a_beats_b",
    "var_seeds_model",
    "var_seeds_reference",
    "var_users",
    "user_test",
    "user_ci_low",
    "user_ci_high",
    "user_statistic",
    "user_p_value",
    "user_p_holm",
    "user_significant",
    "effect_size_dz",
]

ALL_PAIRS_CSV_COLUMNS = [
    "metric",
    "a",
    "b",
    "n_users",
    "n_seeds_a",
    "n_seeds_b",
    "mean_a",
    "mean_b",
    "mean_diff",
    "test",
    "testable",
    "ci_low",
    "ci_high",
    "p_a_beats_b",
    "p_value",
    "p_bh",
    "significant",
    "user_p_value",
    "user_p_bh",
    "user_significant",
    "effect_size_dz",
]


def reference_table(ctx: Context, group: rs.Group, sig: rs.Significance, confirmed: Sequence[str] = ()) -> tb.Table:
    """Each row against the reference; with `confirmed`, the pre-declared family of those models on
    the primary metric (its own table and its own Holm family)."""
    o = ctx.options
    user_test = rs.user_test_of(o.test)
    columns = [
        "metric",
        "model",
        "hidden",
        "vs",
        "seeds",
        "mean",
        "reference",
        "difference",
        f"{wording.confidence_percent(o)}% CI (unadjusted)",
        "P(A>B) seeds",
        "df",
        "p",
        "p (Holm)",
        "significant",
        "per-user p (Holm)",
        "d_z",
    ]
    rows, csv_rows = [], []
    ordered = sorted(sig.comparisons, key=lambda c: (ctx.metrics.index(c.metric), c.row.sort_key()))
    for c in ordered:
        r, p = c.result, c.primary
        seeds = c.seeds
        rows.append(
            [
                tb.cell(c.metric),
                tb.cell(c.row.model + (f" [{c.row.variant}]" if c.row.variant else "")),
                tb.cell(str(c.row.hidden)),
                tb.cell(c.reference.label),
                *_difference_cells(c),
                tb.cell(tb.num(seeds.df, 1) if seeds else "-"),
                *_test_cells(c),
            ]
        )
        csv_rows.append(
            [
                c.metric,
                c.row.model,
                str(c.row.hidden),
                c.row.variant,
                c.reference.model,
                str(c.reference.hidden),
                c.reference.variant,
                str(r.n),
                str(len(c.row.runs)),
                str(len(c.reference.runs)),
                tb.raw(r.mean_a),
                tb.raw(r.mean_b),
                tb.raw(r.mean_diff),
                o.test,
                tb.raw(c.testable),
                tb.raw(seeds.se) if seeds else "",
                tb.raw(seeds.df) if seeds else "",
                tb.raw(p.statistic) if p else "",
                tb.raw(p.ci_low) if p else "",
                tb.raw(p.ci_high) if p else "",
                p.ci_method if p else "",
                tb.pvalue(p.p_value) if p else "",
                tb.pvalue(c.p_adjusted) if p else "",
                tb.raw(c.significant) if p else "",
                tb.raw(c.p_a_beats_b),
                tb.raw(seeds.var_seeds_a) if seeds else "",
                tb.raw(seeds.var_seeds_b) if seeds else "",
                tb.raw(seeds.var_users) if seeds else "",
                user_test,
                tb.raw(r.ci_low),
                tb.raw(r.ci_high),
                tb.raw(r.statistic),
                tb.pvalue(r.p_value),
                tb.pvalue(c.p_adjusted_users),
                tb.raw(c.significant_users),
                tb.raw(r.effect_size),
            ]
        )
    tested = [c for c in ordered if c.testable]
    if confirmed:
        family = (
            f"the {len(tested)} tested comparisons of the family named by --confirm alone ({', '.join(confirmed)} "
            f"against {o.reference} at each hidden size and variant, on {ctx.primary})"
        )
    else:
        family = f"the {len(tested)} tested comparisons of the results table"
    caption = (
        f"{group.dataset}, protocol {group.protocol_id}: each row vs {o.reference}, difference = row - "
        f"reference of the mean over seeds; seeds = row/reference. {wording.test_phrase(o, sig.n_users)}; "
        f"p-values Holm-adjusted over {family}, alpha {o.alpha}; df: the test's degrees of freedom."
    )
    # the per-user column's family: this table's rows (the confirm table's are a subset of the other's)
    rows_family = f"this table's {len(ordered)} rows" if confirmed else "all the rows"
    if confirmed:
        caption += (
            " The results table's stars adjust over every metric and model of that table instead; a family "
            "named before the results confirms, one named after them shows where the evidence is strongest."
        )
    if wording.by_seeds(o):
        caption += (
            " Rows with one seed on either side are not tested ('one seed: not tested'). P(A>B) seeds: the "
            "share of (row seed, reference seed) pairs where the row's metric is higher (Bouthillier et al. "
            "2021), descriptive."
        )
    caption += wording.ci_caption(o, tested, "Holm")
    caption += (
        f" Per-user p (Holm): the {wording.TEST_NAMES[user_test]} over {sig.n_users} users of each user's metric "
        f"averaged over a model's seeds, Holm-adjusted over {rows_family}: it tests these trained networks on "
        "these users, not the models, and is shown for every row, one-seed rows included. d_z: Cohen's d_z "
        "of those per-user differences."
    )
    if confirmed:
        name = f"confirm_{group.slug}"
        title = f"Family of {', '.join(confirmed)} vs {o.reference} on {ctx.primary}: {group.title}"
    else:
        name, title = f"significance_{group.slug}", f"Significance vs {o.reference}: {group.title}"
    return tb.Table(
        name,
        title,
        caption,
        columns,
        rows,
        REFERENCE_CSV_COLUMNS,
        csv_rows,
    )


def all_pairs_table(ctx: Context, group: rs.Group, metric: str, pairs: rs.Significance) -> tb.Table:
    o = ctx.options
    columns = [
        "a",
        "b",
        "seeds",
        "mean a",
        "mean b",
        "a - b",
        f"{wording.confidence_percent(o)}% CI (unadjusted)",
        "P(A>B) seeds",
        "p",
        "p (BH)",
        "significant",
        "per-user p (BH)",
        "d_z",
    ]
    rows, csv_rows = [], []
    for c in pairs.comparisons:
        r, p = c.result, c.primary
        rows.append(
            [
                tb.cell(c.row.label),
                tb.cell(c.reference.label),
                *_difference_cells(c),
                *_test_cells(c),
            ]
        )
        csv_rows.append(
            [
                metric,
                c.row.label,
                c.reference.label,
                str(r.n),
                str(len(c.row.runs)),
                str(len(c.reference.runs)),
                tb.raw(r.mean_a),
                tb.raw(r.mean_b),
                tb.raw(r.mean_diff),
                o.test,
                tb.raw(c.testable),
                tb.raw(p.ci_low) if p else "",
                tb.raw(p.ci_high) if p else "",
                tb.raw(c.p_a_beats_b),
                tb.pvalue(p.p_value) if p else "",
                tb.pvalue(c.p_adjusted) if p else "",
                tb.raw(c.significant) if p else "",
                tb.pvalue(r.p_value),
                tb.pvalue(c.p_adjusted_users),
                tb.raw(c.significant_users),
                tb.raw(r.effect_size),
            ]
        )
    tested = [c for c in pairs.comparisons if c.testable]
    caption = (
        f"Exploratory: every pair of rows on test {metric} ({group.dataset}, protocol "
        f"{group.protocol_id}); {wording.test_phrase(o, pairs.n_users)}; Benjamini-Hochberg over the "
        f"{len(tested)} tested pairs (false discovery rate {o.alpha})."
    )
    if len(tested) < len(pairs.comparisons):
        caption += " Pairs with a one-seed row are not tested."
    caption += wording.ci_caption(o, tested, "BH")
    caption += (
        f" Per-user p (BH): the {wording.TEST_NAMES[rs.user_test_of(o.test)]} of these trained networks "
        "on seed-averaged per-user values, BH over all pairs."
    )
    return tb.Table(
        f"allpairs_{group.slug}",
        f"All pairs on {metric}: {group.title}",
        caption,
        columns,
        rows,
        ALL_PAIRS_CSV_COLUMNS,
        csv_rows,
    )


def _difference_cells(c: rs.ComparisonRow) -> list[tb.TableCell]:
    """seeds, the two means, their difference, its CI and P(A>B): the columns both tables share first."""
    r, p = c.result, c.primary
    return [
        tb.cell(f"{len(c.row.runs)}/{len(c.reference.runs)}"),
        tb.cell(tb.num(r.mean_a)),
        tb.cell(tb.num(r.mean_b)),
        tb.cell(tb.num(r.mean_diff, sign=True)),
        tb.cell(f"[{tb.num(p.ci_low, sign=True)}, {tb.num(p.ci_high, sign=True)}]" if p else "-"),
        tb.cell(f"{c.p_a_beats_b:.2f}"),
    ]


def _test_cells(c: rs.ComparisonRow) -> list[tb.TableCell]:
    """p, adjusted p, the verdict, the per-user adjusted p and d_z: the columns both tables end with."""
    p = c.primary
    return [
        tb.cell(tb.pvalue(p.p_value) if p else "one seed: not tested"),
        tb.cell(tb.pvalue(c.p_adjusted) if p else "-"),
        tb.cell(("yes" if c.significant else "no") if p else "-", bold=c.significant),
        tb.cell(tb.pvalue(c.p_adjusted_users)),
        tb.cell(f"{c.result.effect_size:+.3f}"),
    ]
