"""Paper comparison: our mean over seeds against each published number for the same dataset,
model and hidden size, judged by a prediction interval for one run (the papers report single
runs; docs/design.md#statistics)."""

from __future__ import annotations

import math

from harness import stats
from harness.report import paper as pp
from harness.report import results as rs
from harness.report import tables as tb
from harness.report.document import Document
from harness.report.options import Context

COLUMNS = [
    "dataset",
    "group",
    "model",
    "hidden",
    "metric",
    "ours",
    "95% CI of mean",
    "CI over",
    "95% PI one run",
    "paper",
    "source",
    "difference",
    "relative",
    "inside PI",
    "paper protocol",
]
CSV_COLUMNS = [
    "dataset",
    "group",
    "model",
    "hidden",
    "variant",
    "metric",
    "ours_mean",
    "ci_low",
    "ci_high",
    "ci_over",
    "n",
    "pi_low",
    "pi_high",
    "paper_value",
    "paper_source",
    "paper_table",
    "paper_tag",
    "paper_note",
    "diff",
    "rel_diff_percent",
    "inside_ci",
    "inside_pi",
    "protocol_matches_paper",
    "protocol_differences",
]
CAPTION = (
    "Ours: mean over seeds with a 95% t-interval of that mean over seeds (2+ seeds) or, with one seed, over "
    "test users (column 'CI over'). The paper reports single runs, so it is held against a 95% prediction "
    "interval for one run from our seeds (mean +- t(n-1) sd sqrt(1 + 1/n), 2+ seeds; none from one seed): "
    "'inside PI' says whether the paper's number lies in that prediction interval, not in the narrower CI "
    "of our mean (the CSV has both, inside_pi and inside_ci). Paper: harness/reference/paper_numbers.csv "
    "(source and tag: SEC transcription, DERIVED from reported improvements, ISSUE/REPO-README quoted). "
    "Difference = ours - paper; relative to the paper's number. 'paper protocol': our "
    "group uses the published protocol (full ranking, seen items not masked, max_len 200 for ML-1M and "
    "50 otherwise, 5-core, same-time interactions in the order of the paper's data file)."
)


def add(doc: Document, ctx: Context, groups: list[rs.Group]) -> None:
    reference = pp.load_paper_numbers()
    rows, csv_rows = [], []
    metric_names = sorted(
        {m for m in reference["metric"] if pp.ACCURACY_METRICS.match(m)},
        key=lambda m: (
            rs.test_metric_names([m])[0] not in ctx.metrics,
            rs.DEFAULT_METRICS.index(m) if m in rs.DEFAULT_METRICS else 99,
            m,
        ),
    )
    for group in groups:
        matches, why = pp.protocol_matches_paper(group.comparability)
        for row in group.rows:
            for metric in metric_names:
                found = pp.lookup(reference, group.dataset, row.model, row.hidden, metric)
                if found.empty:
                    continue
                s = rs.row_summary(row, metric)
                if s is None:
                    continue
                low, high, over = _interval(ctx, row, metric, s)
                pi_low, pi_high = stats.prediction_interval(s.values)  # (nan, nan) with one seed
                for _, ref in found.iterrows():
                    value = float(ref["value"])
                    diff = s.mean - value
                    inside = (low <= value <= high) if not math.isnan(low) else None
                    inside_pi = (pi_low <= value <= pi_high) if not math.isnan(pi_low) else None
                    rows.append(
                        [
                            tb.cell(group.dataset),
                            tb.cell(group.slug),
                            tb.cell(row.model),
                            tb.cell(str(row.hidden)),
                            tb.cell(metric),
                            tb.cell(tb.num(s.mean)),
                            tb.cell(f"[{tb.num(low)}, {tb.num(high)}]" if not math.isnan(low) else "-"),
                            tb.cell(over),
                            tb.cell(
                                f"[{tb.num(pi_low)}, {tb.num(pi_high)}]" if inside_pi is not None else "- (one seed)"
                            ),
                            tb.cell(tb.num(value)),
                            tb.cell(f"{ref['source']} ({ref['tag']})"),
                            tb.cell(tb.num(diff, sign=True)),
                            tb.cell(f"{100 * diff / value:+.1f}%"),
                            tb.cell("-" if inside_pi is None else "yes" if inside_pi else "no"),
                            tb.cell("yes" if matches else f"no: {why}"),
                        ]
                    )
                    csv_rows.append(
                        [
                            group.dataset,
                            group.slug,
                            row.model,
                            str(row.hidden),
                            row.variant,
                            metric,
                            tb.raw(s.mean),
                            tb.raw(low),
                            tb.raw(high),
                            over,
                            str(s.n),
                            tb.raw(pi_low),
                            tb.raw(pi_high),
                            f"{value:.4f}",
                            ref["source"],
                            ref["table"],
                            ref["tag"],
                            ref["note"],
                            tb.raw(diff),
                            tb.raw(100 * diff / value),
                            "" if inside is None else tb.raw(bool(inside)),
                            "" if inside_pi is None else tb.raw(bool(inside_pi)),
                            tb.raw(matches),
                            why,
                        ]
                    )
    doc.heading("Paper comparison")
    if not rows:
        doc.paragraph(
            "No dataset and model of these results has a published number in harness/reference/paper_numbers.csv."
        )
        return
    doc.table(tb.Table("paper_comparison", "Ours vs published numbers", CAPTION, COLUMNS, rows, CSV_COLUMNS, csv_rows))


def _interval(ctx: Context, row: rs.Row, metric: str, s: rs.RowSummary) -> tuple[float, float, str]:
    """The 95% interval of our mean: over seeds with 2+, else over the one run's test users."""
    if s.n >= 2:
        low, high = stats.mean_interval(s.values)
        return low, high, f"seeds (t, n={s.n})"
    users, vectors, _ = ctx.per_user.vectors(row, metric)
    if users is not None and vectors:
        low, high = stats.mean_interval(vectors[0])
        return low, high, f"users (t, n={len(users)})"
    return math.nan, math.nan, "-"
