"""Presenting measured rows: a terminal table (medians with their spread, ratios to the first row of
each shape) and one MLflow run per cell for the report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from harness.bench.cells import AXES, BenchCell
from harness.bench.measure import BenchResult
from harness.bench.timing import MEMORY_NONE
from harness.store import contract as tc
from harness.store.contract import BENCH_METRICS


def _fmt_spread(median: float, low: float, high: float, digits: int = 1) -> str:
    return f"{median:,.{digits}f} [{low:,.{digits}f}-{high:,.{digits}f}]"


def _backend_label(row: dict[str, Any]) -> str:
    """Requested backend and, when it was 'auto' (with or without per-kernel overrides), what ran (the distinct
    per-kernel backends)."""
    ran = sorted({part.partition("=")[2] or part for part in row["kernel_backends"].split(",")})
    label = row["backend"] + "->" + "+".join(ran) if row["backend"].split(":")[0] == "auto" else row["backend"]
    return label + (" compiled" if row.get("compile") else "")


def render_table(result: BenchResult, title: str | None = None):
    """A rich Table: throughputs as median [IQR], latency as median [min-max], ratios (x) vs the
    first row of the same shape."""
    from rich.markup import escape
    from rich.table import Table

    m = result.machine
    sources = sorted({r["memory_source"] for r in result.rows}) or [MEMORY_NONE]
    batches = sorted({(r["batch_size"], r["infer_batch_size"]) for r in result.rows})
    caption = (
        f"machine: {m['device_name']} ({m['device']}), {m['cpu_cores']} CPU cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}"
        + (f", 1-min load avg {m['load_avg_1min']}" if "load_avg_1min" in m else "")
        + ". Batch (train/infer): "
        + ", ".join(f"{a}/{b}" for a, b in batches)
        + f". Peak memory: {', '.join(sources)}. Medians after warm-up; [a-b] = IQR for throughput, "
        "min-max for latency; x = ratio to the first row of the same shape (train: positions/s, "
        "infer: users/s, mem: training peak)."
    )
    table = Table(title=escape(title or "model benchmark"), caption=escape(caption), caption_justify="left")
    for column, justify in (
        ("model", "left"),
        ("backend", "left"),
        ("h", "right"),
        ("L", "right"),
        ("chunk", "right"),
        ("protocol", "left"),
        ("train seq/s", "right"),
        ("train pos/s", "right"),
        ("x", "right"),
        ("infer users/s", "right"),
        ("latency ms", "right"),
        ("x", "right"),
        ("peak MB train", "right"),
        ("peak MB infer", "right"),
        ("x", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column not in ("train pos/s", "latency ms"))
    previous = None
    for row in result.rows:
        shape = (row["hidden"], row["seq_len"], row["batch_size"])
        if previous is not None and shape != previous:
            table.add_section()
        previous = shape
        # throughput spread from the step-time quartiles (the slow quartile = the low throughput)
        per_step = row["train_seqs_per_s"] * row["train_step_ms"] / 1000.0  # sequences per step
        pos_per_step = row["train_positions_per_s"] * row["train_step_ms"] / 1000.0
        q1_s, q3_s = row["train_step_ms_q1"] / 1000.0, row["train_step_ms_q3"] / 1000.0
        seqs = _fmt_spread(row["train_seqs_per_s"], per_step / q3_s, per_step / q1_s, 0)
        positions = _fmt_spread(row["train_positions_per_s"], pos_per_step / q3_s, pos_per_step / q1_s, 0)
        table.add_row(
            *(
                escape(cell)
                for cell in (
                    row["model"],
                    _backend_label(row),
                    str(row["hidden"]),
                    str(row["seq_len"]),
                    str(row["chunk_size"] or "-"),
                    row["protocol"],
                    seqs,
                    positions,
                    f"{row['train_ratio']:.2f}",
                    f"{row['infer_users_per_s']:,.0f}",
                    _fmt_spread(row["infer_latency_ms"], row["infer_latency_ms_min"], row["infer_latency_ms_max"], 1),
                    f"{row['infer_ratio']:.2f}",
                    f"{row['peak_memory_mb']:,.1f}",
                    f"{row['infer_peak_memory_mb']:,.1f}",
                    f"{row['memory_ratio']:.2f}",
                )
            )
        )
    return table


def log_rows(
    rows: Iterable[dict[str, Any]], machine: dict[str, Any], tracking_uri: str | None = None, experiment: str = "bench"
) -> list[str]:
    """One MLflow run per cell in experiment `experiment` (run kind bench): axes and settings as
    params, the measurements in BENCH_METRICS as metrics, memory_source and the machine as tags."""
    from harness.store.writer import Tracker, git_commit, library_versions

    tracker = Tracker(tracking_uri, experiment)
    run_ids = []
    for row in rows:
        params = {a: ("" if row[a] is None else row[a]) for a in AXES}
        params.update({k: row[k] for k in ("infer_batch_size", "n_items", "data", "device", "repeats", "warmup")})
        params.update({f"model.{k}": v for k, v in row.get("model_params", {}).items()})
        tags = {
            tc.KIND: tc.KIND_BENCH,
            tc.MODEL_TAG: row.get("base") or row["model"],  # a variant's registered model
            tc.BENCH_MEMORY_SOURCE: row["memory_source"],
            tc.KERNEL_BACKEND: row["kernel_backends"],
            tc.DEVICE_NAME: machine.get("device_name", ""),
            "machine": ", ".join(f"{k}={v}" for k, v in machine.items()),
            tc.GIT_COMMIT: git_commit(),
            **{f"version.{k}": v for k, v in library_versions().items()},
        }
        name = f"bench-{BenchCell(**{a: row[a] for a in AXES}).label()}-h{row['hidden']}-L{row['seq_len']}"
        run_id = tracker.start_run(name, params, tags)
        tracker.log_metrics(run_id, {k: row[k] for k in BENCH_METRICS if k in row})
        tracker.end_run(run_id)
        row["run_id"] = run_id
        run_ids.append(run_id)
    return run_ids
