"""The document a report is: an ordered list of blocks (headings, paragraphs, lists, tables,
figures) that the renderers turn into report.md and report.html, plus the tables and figures by
name (written as files beside it) and the notes collected while building.

Sections add to a Document; nothing here knows what a section says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from harness.report import figures as fg
from harness.report import tables as tb


@dataclasses.dataclass
class FigureInfo:
    name: str
    path: Path
    caption: str
    labels: list[list[str]]  # legend labels per axes


@dataclasses.dataclass
class Block:
    kind: str  # h | p | table | figure | list
    text: str = ""
    level: int = 2
    table: tb.Table | None = None
    figure: FigureInfo | None = None
    items: list[str] = dataclasses.field(default_factory=list)


class Document:
    def __init__(self, directory: Path, dpi: int):
        self.directory = directory
        self.dpi = dpi
        self.blocks: list[Block] = []
        self.tables: dict[str, tb.Table] = {}
        self.figures: dict[str, FigureInfo] = {}
        self.notes: list[str] = []  # said once each, in the order first said, under "Notes"

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("h", text, level))

    def paragraph(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def bullets(self, items: Iterable[str]) -> None:
        self.blocks.append(Block("list", items=list(items)))

    def table(self, table: tb.Table) -> None:
        self.tables[table.name] = table
        self.blocks.append(Block("table", table=table))

    def figure(self, name: str, fig, caption: str) -> None:
        """Save a matplotlib figure as figures/<name>.png and place it here."""
        path = self.directory / "figures" / f"{name}.png"
        labels = fg.line_labels(fig)
        fg.save(fig, path, self.dpi)
        info = FigureInfo(name, path, caption, labels)
        self.figures[name] = info
        self.blocks.append(Block("figure", figure=info))

    def produced(self, path: Path) -> bool:
        """Whether a file under tables/ or figures/ is one this document wrote."""
        if path.suffix == ".png":
            return path.stem in self.figures
        return path.stem in self.tables
