"""Benchmarks: the latest run of each bench cell as a table, and cost (throughput, memory) against
sequence length, hidden size and SSD chunk size as figures, one set per machine and batch size
(docs/design.md#measurement)."""

from __future__ import annotations

from harness.report import figures as fg
from harness.report import tables as tb
from harness.report.bench_runs import bench_frame, fixed_chunks
from harness.report.document import Document
from harness.report.options import Context
from harness.store.reader import Run

COLUMNS = [
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


def add(doc: Document, ctx: Context, bench_runs: list[Run]) -> None:
    if not bench_runs:
        return
    frame = bench_frame(bench_runs)
    doc.heading("Benchmarks")
    doc.paragraph(
        f"{len(frame)} benchmark cells from experiment {ctx.options.bench_experiment!r} (the latest run of each "
        "cell; `python -m harness bench --track`). Medians over repeats after warm-up. Throughput and memory "
        "are only comparable within one machine and batch size."
    )
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
    doc.table(
        tb.simple(
            "bench",
            "Benchmark cells",
            "Latest benchmark run per cell; batch = training/inference batch size.",
            COLUMNS,
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
        fixed = fixed_chunks(cells)
        # one figure per value of the other axis: cost vs sequence length at each hidden size,
        # and vs hidden size at each sequence length
        for axis, label, across, across_label, tag in (
            ("seq_len", "sequence length", "hidden", "hidden", "h"),
            ("hidden", "hidden dimension", "seq_len", "sequence length", "L"),
        ):
            for value in sorted(fixed[across].unique()):
                part = fixed[fixed[across] == value]
                if part[axis].nunique() >= 2:
                    doc.figure(
                        f"bench_{axis}_m{index}_{tag}{value}",
                        fg.bench_vs(
                            part,
                            axis,
                            ["backend", "protocol", "chunk_size"],
                            ctx.colours,
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
                doc.figure(
                    f"bench_chunk_m{index}_h{hidden}",
                    fg.bench_vs(
                        part,
                        "chunk_size",
                        ["backend", "protocol", "seq_len"],
                        ctx.colours,
                        f"SSD chunk size, hidden {hidden} ({device})",
                        source,
                    ),
                    f"SSD chunk size vs training throughput, inference throughput and peak training memory at "
                    f"hidden {hidden}; {where}. Memory source: {source}.",
                )
