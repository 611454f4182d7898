"""report.md: a Document in Markdown; tables and figures are linked by their file under the report."""

from __future__ import annotations

from pathlib import Path

from harness.report import tables as tb
from harness.report.document import Block


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
