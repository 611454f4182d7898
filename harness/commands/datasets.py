"""`datasets`: the catalogue with sources, local availability and statistics."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    parser = sub.add_parser(
        "datasets",
        help="list named datasets: source, local availability, statistics",
        description="List the named datasets with their source, where they were found locally "
        "($HARNESS_DATA_DIR, the cache, or the embedded copy) and, for those present, the "
        "statistics after preprocessing (5-core by default).",
    )
    parser.add_argument("names", nargs="*", help="only these datasets (default: all)")
    parser.add_argument("--no-stats", action="store_true", help="skip loading (faster)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from harness.cli import output_console
    from harness.data.catalogue import CATALOGUE, find_local, load
    from harness.errors import UserError

    names = args.names or list(CATALOGUE)
    unknown = [n for n in names if n not in CATALOGUE]
    if unknown:
        raise UserError(f"unknown dataset(s) {unknown}; named datasets: {', '.join(CATALOGUE)}")
    console = output_console()
    # the numbers in a table narrow enough for a terminal; paths and sources below it, one line
    # each and never cut (a path is what a user copies)
    table = Table(title="datasets (statistics after the 5-core filter)", title_justify="left")
    numbers = ("users", "items", "interactions", "avg len", "same-time steps", "max_len")
    for column in ("name", "found", *numbers):
        table.add_column(column, justify="right" if column in numbers else "left", no_wrap=True)
    where = []
    for name in names:
        spec = CATALOGUE[name]
        found = find_local(spec)
        stats = ["", "", "", "", ""]
        if found and not args.no_stats:
            console.print(f"loading {name} for its statistics ...", highlight=False)
            s = load(name, download=False).statistics()
            stats = [
                f"{s['users']:,}",
                f"{s['items']:,}",
                f"{s['interactions']:,}",
                f"{s['avg_len']:.1f}",
                f"{s['tied_steps']:.0%}",
            ]
        table.add_row(name, found.origin if found else "missing", *stats, str(spec.max_len))
        where.append(f"{name}: {found.path}" if found else f"{name}: not local; source {spec.source}")
    console.print(table)
    for line in where:
        console.print(line, highlight=False, overflow="ignore", crop=False)
    return 0
