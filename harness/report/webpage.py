"""report.html: a Document as one self-contained page, figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html

from harness.report import tables as tb
from harness.report.document import Block

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
