"""Results: per protocol group, the results table (mean ± sd over seeds, best and second marked,
stars against the reference model), its significance and all-pairs tables, and the metric vs
hidden-size figure."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import pandas as pd

from harness.report import figures as fg
from harness.report import results as rs
from harness.report import tables as tb
from harness.report import wording
from harness.report.document import Document
from harness.report.options import Context
from harness.report.sections import significance
from harness.store import contract as tc


def add(doc: Document, ctx: Context, groups: list[rs.Group], kind: str) -> None:
    o = ctx.options
    doc.heading("Results")
    if not groups:
        doc.paragraph(f"No {kind} runs with test metrics in the selected experiments.")
        return
    for group in groups:
        doc.heading(group.title, 3)
        present = [m for m in ctx.metrics if any(rs.mlflow_key(m) in r.metrics for r in group.runs)]
        if not present:
            doc.paragraph("No test metrics among the selected ones.")
            continue
        sig = rs.compare_to_reference(group, present, o.reference, ctx.per_user, o.test, o.alpha, o.n_resamples)
        doc.table(results_table(ctx, group, present, sig, kind))
        for note in sig.notes:
            doc.notes.append(f"{group.slug}: {note}")
        if sig.comparisons:
            doc.table(significance.reference_table(ctx, group, sig))
        if o.confirm:
            confirmatory(doc, ctx, group, present)
        primary = ctx.primary if ctx.primary in present else present[0]
        if o.all_pairs and len(group.rows) > 1:
            pairs = rs.compare_all_pairs(group, primary, ctx.per_user, o.test, o.alpha, o.n_resamples)
            doc.notes += [f"{group.slug}: {n}" for n in pairs.notes]
            if pairs.comparisons:
                doc.table(significance.all_pairs_table(ctx, group, primary, pairs))
        hidden_figure(doc, ctx, group, present)


def confirmatory(doc: Document, ctx: Context, group: rs.Group, present: list[str]) -> None:
    """The family named by `--confirm`: its models against the reference at each hidden size, on the
    primary metric, Holm over those comparisons alone. The results table adjusts over every metric
    and model it shows, which is right for exploring and too wide for the one question a study was
    run for; named before the results, this family is that question's confirmation."""
    o = ctx.options
    for model in o.confirm:
        if not any(r.model == model for r in group.rows):
            doc.notes.append(f"{group.slug}: --confirm {model}: no such model in this group, left out of its family")
    if not any(r.model in o.confirm for r in group.rows) or not any(r.model == o.reference for r in group.rows):
        return  # nothing to test (the reference's absence is noted with the results table)
    if ctx.primary not in present:
        doc.notes.append(f"{group.slug}: --confirm: no test {ctx.primary} in this group, not tested")
        return
    focus = rs.focused(group, o.confirm, o.reference)
    family = rs.compare_to_reference(focus, [ctx.primary], o.reference, ctx.per_user, o.test, o.alpha, o.n_resamples)
    doc.notes += [f"{group.slug}: {note}" for note in family.notes if f"{group.slug}: {note}" not in doc.notes]
    if family.comparisons:
        present_models = [m for m in o.confirm if any(r.model == m for r in group.rows)]
        doc.table(significance.reference_table(ctx, group, family, confirmed=present_models))


def seconds_per_epoch(row: rs.Row) -> float | None:
    """Median over a row's runs of the seconds per training epoch each run logged (None: none did)."""
    values = [r.metrics[tc.SECONDS_PER_EPOCH] for r in row.runs if tc.SECONDS_PER_EPOCH in r.metrics]
    return statistics.median(values) if values else None


def results_table(ctx: Context, group: rs.Group, metrics: list[str], sig: rs.Significance, kind: str) -> tb.Table:
    o = ctx.options
    has_variant = any(r.variant for r in group.rows)
    summaries = {(i, m): rs.row_summary(row, m) for i, row in enumerate(group.rows) for m in metrics}
    marks = {
        m: rs.rank_marks([summaries[(i, m)].mean if summaries[(i, m)] else None for i in range(len(group.rows))])
        for m in metrics
    }
    by_cell = {(id(c.row), c.metric): c for c in sig.comparisons}
    columns = ["model", "hidden"] + (["variant"] if has_variant else []) + ["seeds", "s/epoch"] + metrics
    csv_columns = ["model", "hidden", "variant", "n_seeds", "seeds", tc.SECONDS_PER_EPOCH]
    for m in metrics:
        csv_columns += [f"{m}_mean", f"{m}_std", f"{m}_mark", f"{m}_p_holm", f"{m}_significant"]
    rows, csv_rows = [], []
    for i, row in enumerate(group.rows):
        cells = [tb.cell(row.model), tb.cell(str(row.hidden) if row.hidden is not None else "-")]
        if has_variant:
            cells.append(tb.cell(row.variant or "-"))
        untested = any(c.row is row and not c.testable for c in sig.comparisons)
        cells.append(tb.cell(f"{len(row.runs)}, not tested" if untested else str(len(row.runs))))
        epoch_seconds = seconds_per_epoch(row)
        epoch_text = "" if epoch_seconds is None else f"{epoch_seconds:.3f}"  # the CSV's; the cell shows it
        cells.append(tb.cell(tb.shown(epoch_text, 1) if epoch_text else "-"))
        record = [
            row.model,
            "" if row.hidden is None else str(row.hidden),
            row.variant,
            str(len(row.runs)),
            ";".join(row.seeds),
            epoch_text,
        ]
        for m in metrics:
            s = summaries[(i, m)]
            comparison = by_cell.get((id(row), m))
            if s is None:
                cells.append(tb.cell("-"))
                record += ["", "", "", "", ""]
                continue
            text = tb.num(s.mean) + ("" if math.isnan(s.std) else f" ± {tb.num(s.std)}")
            mark = marks[m][i]
            star = bool(comparison and comparison.significant)
            cells.append(tb.cell(text, bold=mark == "best", underline=mark == "second", star=star))
            record += [
                tb.raw(s.mean),
                tb.raw(s.std),
                mark,
                tb.pvalue(comparison.p_adjusted) if comparison else "",
                _significant_csv(comparison),
            ]
        rows.append(cells)
        csv_rows.append(record)
    caption = (
        f"{group.dataset}, protocol {group.protocol_id} ({group.comparability.get('train_protocol', '?')} "
        f"training): test metrics, mean ± standard deviation over seeds of {kind} runs. Bold: best, "
        "underlined: second best (by mean, at the printed precision). s/epoch: the cost beside the accuracy, the "
        "median over the row's runs of each run's median seconds per training epoch, on the machine and load "
        "that trained it (comparable between rows trained side by side, not across machines). "
    )
    if not sig.reference_present:
        caption += f"No stars: the reference model {o.reference} is absent from this group."
    elif sig.comparisons:
        tested = [c for c in sig.comparisons if c.testable]
        caption += (
            f"*: differs from {o.reference} ({partner_rule(sig.comparisons)}) at alpha = {o.alpha}, "
            f"{wording.test_phrase(o, sig.n_users)}, Holm-adjusted over the {len(tested)} tested comparisons of "
            f"this table (two-sided); differences, {wording.confidence_percent(o)}% CIs, the "
            f"per-user test and effect sizes in the companion table significance_{group.slug}."
        )
        if len(tested) < len(sig.comparisons):
            caption += (
                " Seeds '1, not tested': a model with one seed gets no star, whatever its difference: "
                "one run cannot show that a difference survives retraining (its per-user test of the "
                "trained network is in the companion table)."
            )
    elif all(r.model == o.reference for r in group.rows):
        caption += f"No stars: {o.reference} is the only model in this group."
    else:
        caption += "No stars: no comparison with the reference could be made (see the notes)."
    return tb.Table(f"results_{group.slug}", f"Results: {group.title}", caption, columns, rows, csv_columns, csv_rows)


def _significant_csv(comparison) -> str:
    """A results-table cell's significance in the CSV: true/false, 'untested' (one seed), '' (none)."""
    if comparison is None:
        return ""
    return tb.raw(comparison.significant) if comparison.testable else "untested"


def partner_rule(comparisons) -> str:
    """Which reference row each model was tested against: the same hidden size, unless the reference
    has a single row, which then stands in for the sizes it lacks (said, with its size)."""
    other = sorted({c.reference.hidden for c in comparisons if c.reference.hidden != c.row.hidden}, key=str)
    if not other:
        return "same hidden size"
    return f"same hidden size where it has one, else its only row, hidden {', '.join(str(h) for h in other)}"


def _summary_frame(group: rs.Group, metrics: Sequence[str]) -> pd.DataFrame:
    records = []
    for row in group.rows:
        for metric in metrics:
            s = rs.row_summary(row, metric)
            if s is not None and row.hidden is not None:
                records.append(
                    dict(
                        model=row.model,
                        variant=row.variant,
                        hidden=row.hidden,
                        metric=metric,
                        mean=s.mean,
                        std=s.std,
                        n=s.n,
                    )
                )
    return pd.DataFrame.from_records(records, columns=["model", "variant", "hidden", "metric", "mean", "std", "n"])


def hidden_figure(doc: Document, ctx: Context, group: rs.Group, metrics: list[str]) -> None:
    frame = _summary_frame(group, metrics)
    if frame.empty:
        return
    at10 = [m for m in metrics if m.endswith("@10")]
    shown = (at10 or metrics)[:3]
    fig = fg.metric_vs_hidden(frame, shown, ctx.colours, f"{group.title}")
    doc.figure(
        f"hidden_{group.slug}",
        fig,
        f"Test {', '.join(shown)} vs hidden dimension ({group.dataset}, protocol {group.protocol_id}); "
        "line: mean over seeds; band: ± one standard deviation over seeds; hollow marker: one seed, whose "
        "spread is unknown (the band narrows to the line there).",
    )
