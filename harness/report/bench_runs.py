"""Benchmark runs as a table: one row per bench cell (`python -m harness bench --track`), the latest
run of each cell winning, with what ran (the kernel backend 'auto' resolved to) and the machine."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from harness.report import results as rs
from harness.store import contract as tc
from harness.store.reader import Run

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
        if record["backend"].split(":")[0] == "auto":  # say what ran (also under per-kernel overrides)
            ran = sorted({p.partition("=")[2] or p for p in run.tags.get(tc.KERNEL_BACKEND, "").split(",") if p})
            record["backend"] += "->" + "+".join(ran) if ran else ""
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


def fixed_chunks(cells: pd.DataFrame) -> pd.DataFrame:
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
