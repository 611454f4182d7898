"""A small table model rendered four ways: Markdown, LaTeX (booktabs), HTML and CSV.

Display cells carry their emphasis (bold = best, underline = second best, a star = significant);
the CSV holds the raw numbers with fixed formatting. Nothing here reads clocks or environment, so
the same table always renders to the same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import math
import numbers
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path


@dataclasses.dataclass
class TableCell:
    text: str
    bold: bool = False
    underline: bool = False
    star: bool = False


@dataclasses.dataclass
class Table:
    name: str  # file stem under tables/
    title: str
    caption: str
    columns: list[str]
    rows: list[list[TableCell]]
    csv_columns: list[str]
    csv_rows: list[list[str]]
    align: list[str] | None = None  # 'l' or 'r' per column

    def alignment(self) -> list[str]:
        return self.align or ["l"] + ["r"] * (len(self.columns) - 1)


def cell(text: str, **flags) -> TableCell:
    return TableCell(text, **flags)


def num(value: float | None, digits: int = 4, sign: bool = False) -> str:
    """Fixed formatting for display ('+' before positive values when `sign`); '-' for missing values.
    A float is shown from its CSV form (`raw`): see `shown`."""
    if value is None:
        return "-"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)  # numpy floats of any width too
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return shown(raw(value), digits, sign)
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def shown(text: str, digits: int = 4, sign: bool = False) -> str:
    """A number as a CSV holds it (its text), at `digits` decimals, rounded half away from zero as a
    reader of the CSV would round it by hand; a zero has neither sign. Tables show their floats this
    way and docs/findings.md reads them back from the CSVs this way, so both print the same digits.
    Rounding the binary value directly could differ from rounding its CSV form in the last digit
    (0.0350502 is 0.035050 in the CSV, which Python's format rounds to 0.0350 from the binary)."""
    with localcontext() as context:
        context.prec = 80  # exact for any float's decimal text
        value = Decimal(text).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    if value == 0:
        return f"{abs(value):f}"
    return f"{value:+f}" if sign else f"{value:f}"


def raw(value) -> str:
    """Fixed formatting for CSV: floats with 6 decimals (p-values in scientific notation elsewhere),
    NaN/None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6f}"
    return str(value)


def pvalue(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.3e}"


# ------------------------------------------------------------------------------------ markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


@dataclasses.dataclass(frozen=True)
class _Markup:
    """How one output format escapes a cell and marks best (bold), second (underline) and significance."""

    escape: Callable[[str], str]
    bold: Callable[[str], str]
    underline: Callable[[str], str]
    star: str

    def render(self, c: TableCell) -> str:
        text = self.escape(c.text)
        if c.bold:
            text = self.bold(text)
        if c.underline:
            text = self.underline(text)
        return text + self.star if c.star else text


_MARKDOWN = _Markup(_md_escape, lambda t: f"**{t}**", lambda t: f"<u>{t}</u>", "\\*")


def to_markdown(table: Table) -> str:
    render = _MARKDOWN.render
    align = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(_md_escape(c) for c in table.columns) + " |",
        "|" + "|".join(align[a] for a in table.alignment()) + "|",
    ]
    lines += ["| " + " | ".join(render(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ LaTeX

_LATEX = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "±": r"$\pm$",
    "<": r"$<$",
    ">": r"$>$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


_LATEX_MARKUP = _Markup(latex_escape, lambda t: rf"\textbf{{{t}}}", lambda t: rf"\underline{{{t}}}", r"$^{*}$")


def to_latex(table: Table) -> str:
    render = _LATEX_MARKUP.render
    spec = "".join(table.alignment())
    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(table.caption)}}}",
        rf"\label{{tab:{table.name}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(render(c) for c in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ HTML


_HTML = _Markup(html.escape, lambda t: f"<b>{t}</b>", lambda t: f"<u>{t}</u>", "<sup>*</sup>")


def to_html(table: Table) -> str:
    render = _HTML.render
    align = {"l": "left", "r": "right", "c": "center"}
    cols = table.alignment()
    head = "".join(f'<th style="text-align:{align[a]}">{html.escape(c)}</th>' for c, a in zip(table.columns, cols))
    body = "\n".join(
        "<tr>" + "".join(f'<td style="text-align:{align[a]}">{render(c)}</td>' for c, a in zip(row, cols)) + "</tr>"
        for row in table.rows
    )
    return (
        f'<table id="{html.escape(table.name)}">\n<caption>{html.escape(table.caption)}</caption>\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"
    )


# ------------------------------------------------------------------------------------ CSV


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.csv_columns)
    writer.writerows(table.csv_rows)
    return buffer.getvalue()


def write(table: Table, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".csv", to_csv(table)), (".tex", to_latex(table))):
        path = directory / f"{table.name}{suffix}"
        path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


def simple(
    name: str,
    title: str,
    caption: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: list[str] | None = None,
) -> Table:
    """A table whose display and CSV forms are the same strings (left-aligned unless `align`)."""
    return Table(
        name,
        title,
        caption,
        list(columns),
        [[TableCell(str(v)) for v in r] for r in rows],
        list(columns),
        [[str(v) for v in r] for r in rows],
        align or ["l"] * len(columns),
    )
