"""Assemble a report from the tracking store: tables, figures, report.md and a self-contained
report.html (figures embedded as base64 PNG).

    reports/<name>/report.md, report.html, figures/*.png, tables/*.csv, tables/*.tex

Options are checked (harness.report.options), the runs selected and grouped by protocol
(harness.report.results), each section adds its blocks to a Document (harness.report.sections.*),
and the document is written: tables as files, then report.md and report.html (the renderers).
Everything is sorted and formatted with fixed precision, and nothing reads a clock, so the same store
gives the same tables byte for byte.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.report import figures as fg
from harness.report import results as rs
from harness.report import tables as tb
from harness.report.document import Document, FigureInfo
from harness.report.markdown import render_markdown
from harness.report.options import Context, ReportError, ReportOptions, checked_metrics
from harness.report.sections import bench, overview, paper, protocol, results, studies
from harness.report.webpage import render_html
from harness.store import contract as tc
from harness.store.reader import Store, select_experiments

__all__ = ["Report", "ReportError", "ReportOptions", "generate_report"]


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


def generate_report(options: ReportOptions) -> Report:
    """Build the report described by `options` from the tracking store."""
    metrics, primary = checked_metrics(options)
    log = options.log or (lambda line: None)
    store = Store(options.tracking_uri, log=options.log)
    name = options.report_name
    doc = Document(Path(options.out) / name, options.dpi)
    log(f"reading the runs of {store.uri} ...")

    experiments = select_experiments(store, options.studies)
    # the bench experiment is read for the benchmark section only, unless studies name it
    result_experiments = {k: v for k, v in experiments.items() if k != options.bench_experiment or options.studies}
    runs = store.runs(result_experiments)
    bench_ids = {k: v for k, v in store.experiments().items() if k == options.bench_experiment}
    bench_runs = [r for r in store.runs(bench_ids) if r.kind == tc.KIND_BENCH and r.status == "FINISHED"]
    result_runs, kind, notes = rs.select_result_runs(runs, options.runs)
    doc.notes += notes
    groups, notes = rs.group_runs(result_runs)
    doc.notes += notes
    models = sorted({r.model for r in result_runs} | {r.model for r in bench_runs})
    ctx = Context(options, metrics, primary, rs.PerUser(store), fg.ModelColours(models))

    overview.add(doc, ctx, name, store.uri, runs, bench_runs, kind)
    protocol.add(doc, groups)
    log(f"results tables and significance tests of {len(result_runs)} {kind} run(s) ...")
    results.add(doc, ctx, groups, kind)
    paper.add(doc, ctx, groups)
    log("study histories, parameter importances and benchmarks ...")
    studies.add(doc, runs)
    bench.add(doc, ctx, bench_runs)
    if doc.notes:
        doc.heading("Notes")
        doc.bullets(sorted(set(doc.notes), key=doc.notes.index))
    return _write(doc, name, groups, kind)


def _write(doc: Document, name: str, groups: list[rs.Group], kind: str) -> Report:
    tables_dir = doc.directory / "tables"
    figures_dir = doc.directory / "figures"
    for directory, suffixes in ((tables_dir, (".csv", ".tex")), (figures_dir, (".png",))):
        if directory.is_dir():  # stale outputs of an earlier report of the same name
            for path in directory.iterdir():
                if path.suffix in suffixes and path.is_file() and not doc.produced(path):
                    path.unlink()
    for table in doc.tables.values():
        tb.write(table, tables_dir)
    md_path = doc.directory / "report.md"
    html_path = doc.directory / "report.html"
    md_path.write_text(render_markdown(doc.blocks, doc.directory), encoding="utf-8", newline="\n")
    html_path.write_text(render_html(doc.blocks, name), encoding="utf-8", newline="\n")
    return Report(doc.directory, md_path, html_path, doc.tables, doc.figures, groups, doc.notes, kind)
