"""Assemble a report from the tracking store: tables, figures, report.md and a self-contained
report.html (figures embedded as base64 PNG).

    reports/<name>/report.md, report.html, figures/*.png, tables/*.csv, tables/*.tex

Everything is sorted and formatted with fixed precision, and nothing reads a clock, so the same store
gives the same tables byte for byte.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness import stats
from harness.errors import UserError
from harness.report import figures as fg
from harness.report import paper as pp
from harness.report import results as rs
from harness.report import studies as st
from harness.report import tables as tb
from harness.store import contract as tc
from harness.store.reader import Run, Store, select_experiments

TEST_NAMES = {
    stats.SEED_TEST: "seed-and-user t-test (seed variance in the null, Hsu-Satterthwaite df)",
    "ttest": "paired t-test",
    "wilcoxon": "Wilcoxon signed-rank test",
    "permutation": "paired sign-flip permutation test",
    "bootstrap": "paired percentile bootstrap test",
}


class ReportError(UserError, ValueError):
    """A report that cannot be built as asked (bad option)."""


@dataclasses.dataclass
class ReportOptions:
    studies: Sequence[str] = ()
    tracking_uri: str | None = None
    out: Path = Path("reports")
    name: str | None = None
    reference: str = "tim4rec"
    test: str = stats.SEED_TEST
    alpha: float = 0.05
    metrics: Sequence[str] | None = None
    primary: str = "ndcg@10"
    runs: str = "auto"  # auto | final | train
    bench_experiment: str = "bench"
    n_resamples: int = 10_000
    all_pairs: bool = True
    dpi: int = 110
    log: Callable[[str], None] | None = None  # hears each long stage as it begins


@dataclasses.dataclass
class FigureInfo:
    name: str
    path: Path
    caption: str
    labels: list[list[str]]  # legend labels per axes


@dataclasses.dataclass
class Report:
    directory: Path
    markdown: Path
    html: Path
    tables: dict[str, tb.Table]
    figures: dict[str, FigureInfo]
    groups: list[rs.Group]
    notes: list[str]
    run_kind: str


# ------------------------------------------------------------------------------------ blocks
# A report is a list of blocks rendered twice (Markdown and HTML).


@dataclasses.dataclass
class Block:
    kind: str  # h | p | table | figure | list
    text: str = ""
    level: int = 2
    table: tb.Table | None = None
    figure: FigureInfo | None = None
    items: list[str] = dataclasses.field(default_factory=list)


def _h(text, level=2):
    return Block("h", text, level)


def _p(text):
    return Block("p", text)


def _list(items):
    return Block("list", items=list(items))


# ------------------------------------------------------------------------------------ the build


class _Builder:
    def __init__(self, options: ReportOptions):
        self.o = options
        if options.test not in (stats.SEED_TEST, *stats.TESTS):
            raise ReportError(
                f"unknown test {options.test!r}; expected one of {', '.join((stats.SEED_TEST, *stats.TESTS))}"
            )
        if not 0 < options.alpha < 1:
            raise ReportError(f"alpha must be between 0 and 1; got {options.alpha}")
        if options.runs not in ("auto", "final", "train"):
            raise ReportError(f"--runs must be auto, final or train; got {options.runs!r}")
        try:
            self.metrics = rs.test_metric_names(options.metrics)
            self.primary = rs.test_metric_names([options.primary])[0]
        except ValueError as err:
            raise ReportError(str(err)) from None
        self.log = options.log or (lambda line: None)
        self.store = Store(options.tracking_uri, log=options.log)
        self.per_user = rs.PerUser(self.store)
        self.name = options.name or ("-".join(options.studies) if options.studies else "all")
        self.directory = Path(options.out) / self.name
        self.blocks: list[Block] = []
        self.tables: dict[str, tb.Table] = {}
        self.figures: dict[str, FigureInfo] = {}
        self.notes: list[str] = []

    # -------------------------------------------------------------- output helpers
    def table(self, table: tb.Table) -> None:
        self.tables[table.name] = table
        self.blocks.append(Block("table", table=table))

    def figure(self, name: str, fig, caption: str) -> None:
        path = self.directory / "figures" / f"{name}.png"
        labels = fg.line_labels(fig)
        fg.save(fig, path, self.o.dpi)
        info = FigureInfo(name, path, caption, labels)
        self.figures[name] = info
        self.blocks.append(Block("figure", figure=info))

    # -------------------------------------------------------------- wording
    @property
    def by_seeds(self) -> bool:
        return self.o.test == stats.SEED_TEST

    def test_description(self) -> str:
        user_test = TEST_NAMES[rs.user_test_of(self.o.test)]
        if self.by_seeds:
            return (
                f"{TEST_NAMES[self.o.test]} on each model's per-seed and per-user metrics, for models with 2 "
                "or more seeds (one-seed rows are not tested: one run says nothing about training "
                f"randomness); beside it the {user_test} over users of the trained networks"
            )
        return (
            f"{user_test} on per-user metrics (each user's metric averaged over a model's seeds): it tests "
            "these trained networks on these users, not the models (seed variation is not in its null)"
        )

    # -------------------------------------------------------------- sections
    def build(self) -> Report:
        self.log(f"reading the runs of {self.store.uri} ...")
        experiments = select_experiments(self.store, self.o.studies)
        result_experiments = {k: v for k, v in experiments.items() if k != self.o.bench_experiment or self.o.studies}
        runs = self.store.runs(result_experiments)
        bench_ids = {k: v for k, v in self.store.experiments().items() if k == self.o.bench_experiment}
        bench_runs = [r for r in self.store.runs(bench_ids) if r.kind == tc.KIND_BENCH and r.status == "FINISHED"]
        result_runs, kind, notes = rs.select_result_runs(runs, self.o.runs)
        self.notes += notes
        groups, notes = rs.group_runs(result_runs)
        self.notes += notes
        models = sorted({r.model for r in result_runs} | {r.model for r in bench_runs})
        self.colours = fg.ModelColours(models)

        counts = pd.Series([r.kind or "(none)" for r in runs], dtype=object).value_counts().sort_index()
        with_runs = sorted({r.experiment for r in runs})
        self.blocks.append(_h(f"Report: {self.name}", 1))
        self.blocks.append(
            _p(
                f"Tracking store: {self.store.uri}. Experiments with runs: {', '.join(with_runs) or 'none'}. "
                f"Runs read: {len(runs)} ("
                + ", ".join(f"{k}: {v}" for k, v in counts.items())
                + f"); benchmark runs: {len(bench_runs)}. "
                f"Results tables use {kind} runs (mean and standard deviation over seeds). Significance: "
                f"{self.test_description()} against {self.o.reference}, alpha {self.o.alpha}."
            )
        )
        self.protocol_section(groups)
        self.log(f"results tables and significance tests of {len(result_runs)} {kind} run(s) ...")
        self.results_section(groups, kind)
        self.paper_section(groups)
        self.log("study histories, parameter importances and benchmarks ...")
        self.studies_section(runs)
        self.bench_section(bench_runs)
        if self.notes:
            self.blocks.append(_h("Notes"))
            self.blocks.append(_list(sorted(set(self.notes), key=self.notes.index)))
        return self.write(groups, kind)

    def protocol_section(self, groups: list[rs.Group]) -> None:
        self.blocks.append(_h("Protocol groups"))
        self.blocks.append(
            _p(
                "Runs whose protocol differs (split, evaluation mode, seen-item masking, max_len, loss, training "
                "protocol, dataset and its fingerprint, k-core, order of equal timestamps) are never compared in one "
                "table. Groups found:"
            )
        )
        rows = []
        for g in groups:
            p = g.protocol
            rows.append(
                [
                    g.slug,
                    g.protocol_id,
                    g.dataset,
                    p.get("train_protocol", ""),
                    p.get("max_len", ""),
                    p.get("mask_seen", ""),
                    p.get("eval_mode", ""),
                    p.get("split", ""),
                    p.get("loss", ""),
                    p.get("kcore", ""),
                    p.get("tie_order", ""),
                    p.get("dataset_fingerprint", ""),
                    str(len(g.runs)),
                    " ".join(sorted({r.model for r in g.rows}, key=rs.model_sort_key)),
                ]
            )
        self.table(
            tb.simple(
                "protocol_groups",
                "Protocol groups",
                "Protocol groups in the tracking store; each results table holds exactly one group.",
                [
                    "group",
                    "protocol_id",
                    "dataset",
                    "train_protocol",
                    "max_len",
                    "mask_seen",
                    "eval_mode",
                    "split",
                    "loss",
                    "kcore",
                    "tie_order",
                    "fingerprint",
                    "runs",
                    "models",
                ],
                rows,
            )
        )
        diffs = rs.protocol_differences(groups)
        if diffs:
            self.blocks.append(_p("Why the groups differ:"))
            self.blocks.append(
                _list(
                    f"{a} vs {b}: "
                    + (
                        "; ".join(f"{k} {va} vs {vb}" for k, va, vb in d)
                        if d
                        else "identical protocol tags (different protocol_id)"
                    )
                    for a, b, d in diffs
                )
            )

    # -------------------------------------------------------------- results
    def results_section(self, groups: list[rs.Group], kind: str) -> None:
        self.blocks.append(_h("Results"))
        if not groups:
            self.blocks.append(_p(f"No {kind} runs with test metrics in the selected experiments."))
            return
        for group in groups:
            self.blocks.append(_h(group.title, 3))
            present = [m for m in self.metrics if any(rs.mlflow_key(m) in r.metrics for r in group.runs)]
            if not present:
                self.blocks.append(_p("No test metrics among the selected ones."))
                continue
            sig = rs.compare_to_reference(
                group, present, self.o.reference, self.per_user, self.o.test, self.o.alpha, self.o.n_resamples
            )
            self.table(self.results_table(group, present, sig, kind))
            for note in sig.notes:
                self.notes.append(f"{group.slug}: {note}")
            if sig.comparisons:
                self.table(self.significance_table(group, sig))
            primary = self.primary if self.primary in present else present[0]
            if self.o.all_pairs and len(group.rows) > 1:
                pairs = rs.compare_all_pairs(
                    group, primary, self.per_user, self.o.test, self.o.alpha, self.o.n_resamples
                )
                self.notes += [f"{group.slug}: {n}" for n in pairs.notes]
                if pairs.comparisons:
                    self.table(self.all_pairs_table(group, primary, pairs))
            self.hidden_figure(group, present)

    def _summary_frame(self, group: rs.Group, metrics: Sequence[str]) -> pd.DataFrame:
        records = []
        for row in group.rows:
            for metric in metrics:
                s = rs.summarise(row, metric)
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

    def results_table(self, group: rs.Group, metrics: list[str], sig: rs.Significance, kind: str) -> tb.Table:
        has_variant = any(r.variant for r in group.rows)
        summaries = {(i, m): rs.summarise(row, m) for i, row in enumerate(group.rows) for m in metrics}
        marks = {
            m: rs.rank_marks([summaries[(i, m)].mean if summaries[(i, m)] else None for i in range(len(group.rows))])
            for m in metrics
        }
        by_cell = {(id(c.row), c.metric): c for c in sig.comparisons}
        columns = ["model", "hidden"] + (["variant"] if has_variant else []) + ["seeds"] + metrics
        csv_columns = ["model", "hidden", "variant", "n_seeds", "seeds"]
        for m in metrics:
            csv_columns += [f"{m}_mean", f"{m}_std", f"{m}_mark", f"{m}_p_holm", f"{m}_significant"]
        rows, csv_rows = [], []
        for i, row in enumerate(group.rows):
            cells = [tb.cell(row.model), tb.cell(str(row.hidden) if row.hidden is not None else "-")]
            if has_variant:
                cells.append(tb.cell(row.variant or "-"))
            untested = any(c.row is row and not c.testable for c in sig.comparisons)
            cells.append(tb.cell(f"{len(row.runs)}, not tested" if untested else str(len(row.runs))))
            record = [
                row.model,
                "" if row.hidden is None else str(row.hidden),
                row.variant,
                str(len(row.runs)),
                ";".join(row.seeds),
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
            f"{group.dataset}, protocol {group.protocol_id} ({group.protocol.get('train_protocol', '?')} "
            f"training): test metrics, mean ± standard deviation over seeds of {kind} runs. Bold: best, "
            "underlined: second best (by mean, at the printed precision). "
        )
        if not sig.reference_present:
            caption += f"No stars: the reference model {self.o.reference} is absent from this group."
        elif sig.comparisons:
            tested = [c for c in sig.comparisons if c.testable]
            caption += (
                f"*: differs from {self.o.reference} ({_partner_rule(sig.comparisons)}) at alpha = {self.o.alpha}, "
                f"{self._test_phrase(sig.n_users)}, Holm-adjusted over the {len(tested)} tested comparisons of "
                f"this table (two-sided); differences, {int(round((1 - self.o.alpha) * 100))}% CIs, the "
                f"per-user test and effect sizes in the companion table significance_{group.slug}."
            )
            if len(tested) < len(sig.comparisons):
                caption += (
                    " Seeds '1, not tested': a model with one seed gets no star, whatever its difference: "
                    "one run cannot show that a difference survives retraining (its per-user test of the "
                    "trained network is in the companion table)."
                )
        elif all(r.model == self.o.reference for r in group.rows):
            caption += f"No stars: {self.o.reference} is the only model in this group."
        else:
            caption += "No stars: no comparison with the reference could be made (see the notes)."
        return tb.Table(
            f"results_{group.slug}", f"Results: {group.title}", caption, columns, rows, csv_columns, csv_rows
        )

    def _test_phrase(self, n_users) -> str:
        if self.by_seeds:
            return (
                f"{TEST_NAMES[self.o.test]}: the difference of the model means over seeds, its variance the "
                f"seed-to-seed variance of both models plus the user-level variance over {n_users} test "
                "users, so retraining is in the null"
            )
        return (
            f"{TEST_NAMES[self.o.test]} on per-user values over {n_users} test users (each user's metric "
            "averaged over a model's seeds first): a test of these trained networks, seed variation not in "
            "its null"
        )

    def _ci_caption(self, comparisons, adjusted_name: str) -> str:
        """The CIs are per comparison; say so, and explain rows whose CI excludes 0 but whose adjusted
        p-value is above alpha (the adjustment, not the interval, decides the star)."""
        conf = int(round((1 - self.o.alpha) * 100))
        text = (
            f" The {conf}% CIs are unadjusted (per comparison, not corrected for multiplicity), so a CI "
            f"that excludes 0 does not by itself mean significant: the star needs the {adjusted_name} "
            f"p-value <= {self.o.alpha}."
        )
        mismatched = [
            c
            for c in comparisons
            if c.testable and not c.significant and (c.primary.ci_low > 0 or c.primary.ci_high < 0)
        ]
        if mismatched:
            text += (
                f" {len(mismatched)} row(s) here have a CI excluding 0 and 'no': significant before, "
                f"not after the {adjusted_name} adjustment."
            )
        return text

    def significance_table(self, group: rs.Group, sig: rs.Significance) -> tb.Table:
        conf = int(round((1 - self.o.alpha) * 100))
        user_test = rs.user_test_of(self.o.test)
        columns = [
            "metric",
            "model",
            "hidden",
            "vs",
            "seeds",
            "mean",
            "reference",
            "difference",
            f"{conf}% CI (unadjusted)",
            "P(A>B) seeds",
            "df",
            "p",
            "p (Holm)",
            "significant",
            "per-user p (Holm)",
            "d_z",
        ]
        csv_columns = [
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
        rows, csv_rows = [], []
        ordered = sorted(sig.comparisons, key=lambda c: (self.metrics.index(c.metric), c.row.sort_key()))
        for c in ordered:
            r, p = c.result, c.primary
            seeds = c.seeds
            rows.append(
                [
                    tb.cell(c.metric),
                    tb.cell(c.row.model + (f" [{c.row.variant}]" if c.row.variant else "")),
                    tb.cell(str(c.row.hidden)),
                    tb.cell(c.reference.label),
                    tb.cell(f"{len(c.row.runs)}/{len(c.reference.runs)}"),
                    tb.cell(tb.num(r.mean_a)),
                    tb.cell(tb.num(r.mean_b)),
                    tb.cell(f"{r.mean_diff:+.4f}"),
                    tb.cell(f"[{p.ci_low:+.4f}, {p.ci_high:+.4f}]" if p else "-"),
                    tb.cell(f"{c.p_a_beats_b:.2f}"),
                    tb.cell(f"{seeds.df:.1f}" if seeds else "-"),
                    tb.cell(tb.pvalue(p.p_value) if p else "one seed: not tested"),
                    tb.cell(tb.pvalue(c.p_adjusted) if p else "-"),
                    tb.cell(("yes" if c.significant else "no") if p else "-", bold=c.significant),
                    tb.cell(tb.pvalue(c.p_adjusted_users)),
                    tb.cell(f"{r.effect_size:+.3f}"),
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
                    self.o.test,
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
        caption = (
            f"{group.dataset}, protocol {group.protocol_id}: each row vs {self.o.reference}, difference = row - "
            f"reference of the mean over seeds; seeds = row/reference. {self._test_phrase(sig.n_users)}; "
            f"p-values Holm-adjusted over the {len(tested)} tested comparisons of the results table, alpha "
            f"{self.o.alpha}; df: the test's degrees of freedom."
        )
        if self.by_seeds:
            caption += (
                " Rows with one seed on either side are not tested ('one seed: not tested'). P(A>B) seeds: the "
                "share of (row seed, reference seed) pairs where the row's metric is higher (Bouthillier et al. "
                "2021), descriptive."
            )
        caption += self._ci_caption(tested, "Holm")
        caption += (
            f" Per-user p (Holm): the {TEST_NAMES[user_test]} over {sig.n_users} users of each user's metric "
            "averaged over a model's seeds, Holm-adjusted over all the rows: it tests these trained networks on "
            "these users, not the models, and is shown for every row, one-seed rows included. d_z: Cohen's d_z "
            "of those per-user differences."
        )
        return tb.Table(
            f"significance_{group.slug}",
            f"Significance vs {self.o.reference}: {group.title}",
            caption,
            columns,
            rows,
            csv_columns,
            csv_rows,
        )

    def all_pairs_table(self, group: rs.Group, metric: str, pairs: rs.Significance) -> tb.Table:
        conf = int(round((1 - self.o.alpha) * 100))
        columns = [
            "a",
            "b",
            "seeds",
            "mean a",
            "mean b",
            "a - b",
            f"{conf}% CI (unadjusted)",
            "P(A>B) seeds",
            "p",
            "p (BH)",
            "significant",
            "per-user p (BH)",
            "d_z",
        ]
        csv_columns = [
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
        rows, csv_rows = [], []
        for c in pairs.comparisons:
            r, p = c.result, c.primary
            rows.append(
                [
                    tb.cell(c.row.label),
                    tb.cell(c.reference.label),
                    tb.cell(f"{len(c.row.runs)}/{len(c.reference.runs)}"),
                    tb.cell(tb.num(r.mean_a)),
                    tb.cell(tb.num(r.mean_b)),
                    tb.cell(f"{r.mean_diff:+.4f}"),
                    tb.cell(f"[{p.ci_low:+.4f}, {p.ci_high:+.4f}]" if p else "-"),
                    tb.cell(f"{c.p_a_beats_b:.2f}"),
                    tb.cell(tb.pvalue(p.p_value) if p else "one seed: not tested"),
                    tb.cell(tb.pvalue(c.p_adjusted) if p else "-"),
                    tb.cell(("yes" if c.significant else "no") if p else "-", bold=c.significant),
                    tb.cell(tb.pvalue(c.p_adjusted_users)),
                    tb.cell(f"{r.effect_size:+.3f}"),
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
                    self.o.test,
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
            f"{group.protocol_id}); {self._test_phrase(pairs.n_users)}; Benjamini-Hochberg over the "
            f"{len(tested)} tested pairs (false discovery rate {self.o.alpha})."
        )
        if len(tested) < len(pairs.comparisons):
            caption += " Pairs with a one-seed row are not tested."
        caption += self._ci_caption(tested, "BH")
        caption += (
            f" Per-user p (BH): the {TEST_NAMES[rs.user_test_of(self.o.test)]} of these trained networks "
            "on seed-averaged per-user values, BH over all pairs."
        )
        return tb.Table(
            f"allpairs_{group.slug}",
            f"All pairs on {metric}: {group.title}",
            caption,
            columns,
            rows,
            csv_columns,
            csv_rows,
        )

    def hidden_figure(self, group: rs.Group, metrics: list[str]) -> None:
        frame = self._summary_frame(group, metrics)
        if frame.empty:
            return
        at10 = [m for m in metrics if m.endswith("@10")]
        shown = (at10 or metrics)[:3]
        fig = fg.metric_vs_hidden(frame, shown, self.colours, f"{group.title}")
        self.figure(
            f"hidden_{group.slug}",
            fig,
            f"Test {', '.join(shown)} vs hidden dimension ({group.dataset}, protocol {group.protocol_id}); "
            "mean ± standard deviation over seeds (no bar: one seed).",
        )

    # -------------------------------------------------------------- paper comparison
    def paper_section(self, groups: list[rs.Group]) -> None:
        reference = pp.load_paper_numbers()
        columns = [
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
        csv_columns = [
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
        rows, csv_rows = [], []
        metric_names = sorted(
            {m for m in reference["metric"] if pp.ACCURACY_METRICS.match(m)},
            key=lambda m: (
                rs.test_metric_names([m])[0] not in self.metrics,
                rs.DEFAULT_METRICS.index(m) if m in rs.DEFAULT_METRICS else 99,
                m,
            ),
        )
        for group in groups:
            matches, why = pp.protocol_matches_paper(group.protocol)
            for row in group.rows:
                for metric in metric_names:
                    found = pp.lookup(reference, group.dataset, row.model, row.hidden, metric)
                    if found.empty:
                        continue
                    s = rs.summarise(row, metric)
                    if s is None:
                        continue
                    low, high, over = self._interval(row, metric, s)
                    pi_low, pi_high = rs.prediction_interval(s.values)  # (nan, nan) with one seed
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
                                    f"[{tb.num(pi_low)}, {tb.num(pi_high)}]"
                                    if inside_pi is not None
                                    else "- (one seed)"
                                ),
                                tb.cell(tb.num(value)),
                                tb.cell(f"{ref['source']} ({ref['tag']})"),
                                tb.cell(f"{diff:+.4f}"),
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
        self.blocks.append(_h("Paper comparison"))
        if not rows:
            self.blocks.append(
                _p(
                    "No dataset and model of these results has a published number in "
                    "harness/reference/paper_numbers.csv."
                )
            )
            return
        self.table(
            tb.Table(
                "paper_comparison",
                "Ours vs published numbers",
                "Ours: mean over seeds with a 95% t-interval of that mean over seeds (2+ seeds) or, with one seed, over "
                "test users (column 'CI over'). The paper reports single runs, so it is held against a 95% prediction "
                "interval for one run from our seeds (mean +- t(n-1) sd sqrt(1 + 1/n), 2+ seeds; none from one seed): "
                "'inside PI' says whether the paper's number lies in that prediction interval, not in the narrower CI "
                "of our mean (the CSV has both, inside_pi and inside_ci). Paper: harness/reference/paper_numbers.csv "
                "(source and tag: SEC transcription, DERIVED from reported improvements, ISSUE/REPO-README quoted). "
                "Difference = ours - paper; relative to the paper's number. 'paper protocol': our "
                "group uses the published protocol (full ranking, seen items not masked, max_len 200 for ML-1M and "
                "50 otherwise, 5-core, same-time interactions in the order of the paper's data file).",
                columns,
                rows,
                csv_columns,
                csv_rows,
            )
        )

    def _interval(self, row: rs.Row, metric: str, s: rs.CellSummary) -> tuple[float, float, str]:
        if s.n >= 2:
            low, high = rs.seed_interval(s.values)
            return low, high, f"seeds (t, n={s.n})"
        users, vectors, _ = self.per_user.vectors(row, metric)
        if users is not None and vectors:
            low, high = rs.user_interval(vectors[0])
            return low, high, f"users (t, n={len(users)})"
        return math.nan, math.nan, "-"

    # -------------------------------------------------------------- studies
    def studies_section(self, runs: list[Run]) -> None:
        by_experiment: dict[str, list[Run]] = {}
        for run in runs:
            by_experiment.setdefault(run.experiment, []).append(run)
        found = [s for name in sorted(by_experiment) for s in st.studies_from_runs(name, by_experiment[name])]
        if not found:
            return
        self.blocks.append(_h("Hyper-parameter studies"))
        for study in found:
            self.blocks.append(_h(f"Study {study.name}", 3))
            slug = "".join(c if c.isalnum() or c in "-._" else "-" for c in study.name).strip("-")
            best_fn = max if study.directions[0] == "maximize" else min
            best = best_fn(study.trials["objective_0"])
            self.blocks.append(
                _p(
                    f"{len(study.trials)} finished trials with objectives ({study.left_out} trial runs left out: "
                    f"failed, pruned or without objectives). Objectives: "
                    + ", ".join(
                        f"objective_{i} = {n} ({d})"
                        for i, (n, d) in enumerate(zip(study.objective_names, study.directions))
                    )
                    + f" (directions {study.directions_source}). Best objective_0: {best:.4f}. "
                    f"Searched parameters: {', '.join(study.params) or 'none found'}."
                )
            )
            frame = study.trials.rename(columns={"objective_0": "value"})[["number", "value"]]
            self.figure(
                f"history_{slug}",
                fg.optimisation_history(
                    frame, study.directions[0], study.objective_names[0], f"{study.name}: optimisation history"
                ),
                f"Optimisation history of study {study.name}: objective_0 ({study.objective_names[0]}) of each "
                f"finished trial and the best value so far ({study.directions[0]}).",
            )
            values, method = st.importances(study)
            if values:
                self.figure(
                    f"importance_{slug}",
                    fg.param_importances(values, method, f"{study.name}: parameter importances"),
                    f"Parameter importances of study {study.name} for objective_0, {method}, computed from the "
                    "trial runs in the tracking store (an Optuna study rebuilt in memory).",
                )
                self.table(
                    tb.simple(
                        f"importance_{slug}",
                        f"Parameter importances: {study.name}",
                        f"Importance of each searched parameter for objective_0 ({method}).",
                        ["parameter", "importance"],
                        [[k, f"{v:.6f}"] for k, v in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))],
                        align=["l", "r"],
                    )
                )
            if study.n_objectives >= 2:
                self.figure(
                    f"pareto_{slug}",
                    fg.pareto_front(
                        study.trials, study.directions, study.objective_names, f"{study.name}: Pareto front"
                    ),
                    f"Pareto front of study {study.name}: objective_0 vs objective_1 of every finished trial; "
                    f"directions {', '.join(study.directions[:2])} ({study.directions_source}).",
                )
                mask = fg.pareto_mask(
                    study.trials[["objective_0", "objective_1"]].to_numpy(dtype=float), study.directions[:2]
                )
                front = study.trials[mask].sort_values(["objective_0", "number"])
                self.table(
                    tb.simple(
                        f"pareto_{slug}",
                        f"Pareto-optimal trials: {study.name}",
                        f"Non-dominated trials of study {study.name} (objective_0 {study.directions[0]}, objective_1 "
                        f"{study.directions[1]}).",
                        ["trial", "objective_0", "objective_1", *study.params],
                        [
                            [
                                str(int(r["number"])),
                                f"{r['objective_0']:.6f}",
                                f"{r['objective_1']:.6f}",
                                *[str(r[p]) for p in study.params],
                            ]
                            for _, r in front.iterrows()
                        ],
                        align=["r"] * (3 + len(study.params)),
                    )
                )

    # -------------------------------------------------------------- benchmarks
    def bench_section(self, bench_runs: list[Run]) -> None:
        if not bench_runs:
            return
        frame = bench_frame(bench_runs)
        self.blocks.append(_h("Benchmarks"))
        self.blocks.append(
            _p(
                f"{len(frame)} benchmark cells from experiment {self.o.bench_experiment!r} (the latest run of each "
                "cell; `python -m harness bench --track`). Medians over repeats after warm-up. Throughput and memory "
                "are only comparable within one machine and batch size."
            )
        )
        columns = [
            "machine",
            "model",
            "backend",
            "hidden",
            "seq_len",
            "chunk",
            "protocol",
            "batch",
            "train seq/s",
            "train pos/s",
            "infer users/s",
            "latency ms",
            "peak MB",
            "memory source",
        ]
        rows = [
            [
                r.device_name,
                r.model,
                r.backend,
                str(r.hidden),
                str(r.seq_len),
                r.chunk_size or "-",
                r.protocol,
                f"{r.batch_size}/{r.infer_batch_size}",
                f"{r.train_seqs_per_s:.1f}",
                f"{r.train_positions_per_s:.1f}",
                f"{r.infer_users_per_s:.1f}",
                f"{r.infer_latency_ms:.2f}",
                f"{r.peak_memory_mb:.1f}",
                r.memory_source,
            ]
            for r in frame.itertuples()
        ]
        self.table(
            tb.simple(
                "bench",
                "Benchmark cells",
                "Latest benchmark run per cell; batch = training/inference batch size.",
                columns,
                rows,
                align=["l"] * 3 + ["r"] * 3 + ["l", "r"] + ["r"] * 5 + ["l"],
            )
        )
        contexts = sorted(
            frame.groupby(["device_name", "data", "n_items", "batch_size", "infer_batch_size"]),
            key=lambda kv: tuple(str(v) for v in kv[0]),
        )
        for index, (context, cells) in enumerate(contexts, start=1):
            device, data, n_items, batch, infer_batch = context
            where = f"{device}, {data} data ({n_items} items), batch {batch}/{infer_batch}"
            source = ", ".join(sorted(set(cells["memory_source"])))
            fixed = _fixed_chunks(cells)
            # one figure per value of the other axis: cost vs sequence length at each hidden size,
            # and vs hidden size at each sequence length
            for axis, label, across, across_label, tag in (
                ("seq_len", "sequence length", "hidden", "hidden", "h"),
                ("hidden", "hidden dimension", "seq_len", "sequence length", "L"),
            ):
                for value in sorted(fixed[across].unique()):
                    part = fixed[fixed[across] == value]
                    if part[axis].nunique() >= 2:
                        self.figure(
                            f"bench_{axis}_m{index}_{tag}{value}",
                            fg.bench_vs(
                                part,
                                axis,
                                ["backend", "protocol", "chunk_size"],
                                self.colours,
                                f"vs {label}, {across_label} {value} ({device})",
                                source,
                            ),
                            f"Training throughput, inference throughput and peak training memory vs {label} "
                            f"at {across_label} {value}; {where}. Memory source: {source}.",
                        )
            chunked = cells[cells["chunk_size"] != ""]
            for hidden in sorted(chunked["hidden"].unique()):
                part = chunked[chunked["hidden"] == hidden]
                if part["chunk_size"].nunique() >= 2:
                    part = part.assign(chunk_size=part["chunk_size"].astype(int))
                    self.figure(
                        f"bench_chunk_m{index}_h{hidden}",
                        fg.bench_vs(
                            part,
                            "chunk_size",
                            ["backend", "protocol", "seq_len"],
                            self.colours,
                            f"SSD chunk size, hidden {hidden} ({device})",
                            source,
                        ),
                        f"SSD chunk size vs training throughput, inference throughput and peak training memory at "
                        f"hidden {hidden}; {where}. Memory source: {source}.",
                    )

    # -------------------------------------------------------------- writing
    def write(self, groups, kind) -> Report:
        tables_dir = self.directory / "tables"
        figures_dir = self.directory / "figures"
        for directory, suffixes in ((tables_dir, (".csv", ".tex")), (figures_dir, (".png",))):
            if directory.is_dir():  # stale outputs of an earlier report of the same name
                for path in directory.iterdir():
                    if path.suffix in suffixes and path.is_file() and not self._produced(path):
                        path.unlink()
        for table in self.tables.values():
            tb.write(table, tables_dir)
        md_path = self.directory / "report.md"
        html_path = self.directory / "report.html"
        md_path.write_text(render_markdown(self.blocks, self.directory), encoding="utf-8", newline="\n")
        html_path.write_text(render_html(self.blocks, self.name), encoding="utf-8", newline="\n")
        return Report(self.directory, md_path, html_path, self.tables, self.figures, groups, self.notes, kind)

    def _produced(self, path: Path) -> bool:
        if path.suffix == ".png":
            return path.stem in self.figures
        return path.stem in self.tables


def _fixed_chunks(cells: pd.DataFrame) -> pd.DataFrame:
    """For the seq_len / hidden figures: one chunk size per model (its most frequent, then smallest)."""
    keep = []
    for _model, part in cells.groupby("model", sort=True):
        chunks = part["chunk_size"]
        if (chunks == "").all():
            keep.append(part)
            continue
        counts = chunks[chunks != ""].astype(int).value_counts()
        best = min(counts.index, key=lambda c: (-counts[c], c))
        keep.append(part[chunks == str(best)])
    return pd.concat(keep) if keep else cells.iloc[0:0]


BENCH_COLUMNS = (
    "model",
    "backend",
    "hidden",
    "seq_len",
    "batch_size",
    "chunk_size",
    "protocol",
    "infer_batch_size",
    "n_items",
    "data",
)


def bench_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per bench cell (latest run wins), sorted."""
    records = {}
    for run in sorted(runs, key=lambda r: (r.start_time, r.run_id)):
        record: dict[str, Any] = {k: run.params.get(k, "") for k in BENCH_COLUMNS}
        for key in ("hidden", "seq_len", "batch_size", "infer_batch_size", "n_items"):
            try:
                record[key] = int(float(record[key]))
            except ValueError:
                record[key] = 0
        if record["backend"] == "auto":  # say what ran
            ran = sorted({p.partition("=")[2] or p for p in run.tags.get(tc.KERNEL_BACKEND, "").split(",") if p})
            record["backend"] = "auto->" + "+".join(ran) if ran else "auto"
        if run.params.get("compile") == "True":  # a compiled cell is another cell (bench --compile)
            record["backend"] += " compiled"
        record["device_name"] = run.tags.get(tc.DEVICE_NAME, "") or run.params.get("device", "")
        record["memory_source"] = run.tags.get(tc.BENCH_MEMORY_SOURCE, "")
        for metric in tc.BENCH_METRICS:
            record[metric] = run.metrics.get(metric, math.nan)
        record["run_id"] = run.run_id
        key = tuple(record[k] for k in (*BENCH_COLUMNS, "device_name"))
        records[key] = record
    frame = pd.DataFrame.from_records(list(records.values()))
    if frame.empty:
        return frame
    frame["_model"] = frame["model"].map(rs.model_sort_key)
    frame = (
        frame.sort_values(
            ["device_name", "data", "batch_size", "_model", "backend", "protocol", "hidden", "seq_len", "chunk_size"]
        )
        .drop(columns="_model")
        .reset_index(drop=True)
    )
    return frame


# ------------------------------------------------------------------------------------ rendering


def render_markdown(blocks: list[Block], directory: Path) -> str:
    out = []
    for b in blocks:
        if b.kind == "h":
            out.append(f"{'#' * b.level} {b.text}\n")
        elif b.kind == "p":
            out.append(f"{b.text}\n")
        elif b.kind == "list":
            out.append("\n".join(f"- {item}" for item in b.items) + "\n")
        elif b.kind == "table":
            t = b.table
            out.append(
                f"**{t.title}** (tables/{t.name}.csv, tables/{t.name}.tex)\n\n{tb.to_markdown(t)}\n"
                f"*{tb._md_escape(t.caption)}*\n"
            )
        elif b.kind == "figure":
            f = b.figure
            rel = f.path.relative_to(directory).as_posix()
            out.append(f"![{f.name}]({rel})\n\n*{f.caption}*\n")
    return "\n".join(out)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; white-space: nowrap; }
thead th { border-bottom: 2px solid #444; }
caption { caption-side: bottom; text-align: left; color: #555; padding-top: 0.4em; white-space: normal;
          max-width: 1100px; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
.tabletitle { font-weight: bold; margin-top: 1em; }
"""


def render_html(blocks: list[Block], name: str) -> str:
    out = [
        f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>Report: {html.escape(name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>"
    ]
    for b in blocks:
        if b.kind == "h":
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif b.kind == "p":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "list":
            out.append("<ul>\n" + "\n".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "\n</ul>")
        elif b.kind == "table":
            out.append(f'<div class="tabletitle">{html.escape(b.table.title)}</div>\n{tb.to_html(b.table)}')
        elif b.kind == "figure":
            data = base64.b64encode(b.figure.path.read_bytes()).decode("ascii")
            out.append(
                f'<figure id="{html.escape(b.figure.name)}"><img alt="{html.escape(b.figure.name)}" '
                f'src="data:image/png;base64,{data}">\n<figcaption>{html.escape(b.figure.caption)}'
                "</figcaption></figure>"
            )
    out.append("</body>\n</html>\n")
    return "\n".join(out)


def generate_report(options: ReportOptions) -> Report:
    """Build the report described by `options` from the tracking store."""
    return _Builder(options).build()


def _significant_csv(comparison) -> str:
    """A results-table cell's significance in the CSV: true/false, 'untested' (one seed), '' (none)."""
    if comparison is None:
        return ""
    return tb.raw(comparison.significant) if comparison.testable else "untested"


def _partner_rule(comparisons) -> str:
    """Which reference row each model was tested against: the same hidden size, unless the reference
    has a single row, which then stands in for the sizes it lacks (said, with its size)."""
    other = sorted({c.reference.hidden for c in comparisons if c.reference.hidden != c.row.hidden}, key=str)
    if not other:
        return "same hidden size"
    return f"same hidden size where it has one, else its only row, hidden {', '.join(str(h) for h in other)}"
