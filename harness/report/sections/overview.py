"""The report's title and opening paragraph: which store, which runs were read, which test."""

from __future__ import annotations

import pandas as pd

from harness.report import wording
from harness.report.document import Document
from harness.report.options import Context
from harness.store.reader import Run


def add(doc: Document, ctx: Context, name: str, store_uri: str, runs: list[Run], bench_runs: list[Run], kind: str):
    o = ctx.options
    counts = pd.Series([r.kind or "(none)" for r in runs], dtype=object).value_counts().sort_index()
    with_runs = sorted({r.experiment for r in runs})
    doc.heading(f"Report: {name}", 1)
    doc.paragraph(
        f"Tracking store: {store_uri}. Experiments with runs: {', '.join(with_runs) or 'none'}. "
        f"Runs read: {len(runs)} ("
        + ", ".join(f"{k}: {v}" for k, v in counts.items())
        + f"); benchmark runs: {len(bench_runs)}. "
        f"Results tables use {kind} runs (mean and standard deviation over seeds). Significance: "
        f"{wording.test_description(o)} against {o.reference}, alpha {o.alpha}."
    )
