"""Protocol groups: which groups of comparable runs the store holds and what separates them
(docs/design.md#protocol: results of different protocols are never in one table)."""

from __future__ import annotations

from harness.report import results as rs
from harness.report import tables as tb
from harness.report.document import Document

COLUMNS = [
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
]


def add(doc: Document, groups: list[rs.Group]) -> None:
    doc.heading("Protocol groups")
    doc.paragraph(
        "Runs whose protocol differs (split, evaluation mode, seen-item masking, max_len, loss, training "
        "protocol, dataset and its fingerprint, k-core, order of equal timestamps) are never compared in one "
        "table. Groups found:"
    )
    rows = []
    for g in groups:
        p = g.comparability
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
    doc.table(
        tb.simple(
            "protocol_groups",
            "Protocol groups",
            "Protocol groups in the tracking store; each results table holds exactly one group.",
            COLUMNS,
            rows,
        )
    )
    diffs = rs.protocol_differences(groups)
    if diffs:
        doc.paragraph("Why the groups differ:")
        doc.bullets(
            f"{a} vs {b}: "
            + (
                "; ".join(f"{k} {va} vs {vb}" for k, va, vb in d)
                if d
                else "identical protocol tags (different protocol_id)"
            )
            for a, b, d in diffs
        )
