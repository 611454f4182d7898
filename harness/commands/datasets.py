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
    from rich.console import Console
    from rich.table import Table

    from harness.data.catalogue import CATALOGUE, find_local, load
    from harness.errors import UserError

    names = args.names or list(CATALOGUE)
    unknown = [n for n in names if n not in CATALOGUE]
    if unknown:
        raise UserError(f"unknown dataset(s) {unknown}; named datasets: {', '.join(CATALOGUE)}")
    table = Table(title="datasets (statistics after the 5-core filter)")
    numbers = ("users", "items", "interactions", "avg len", "same-time steps", "max_len")
    for column in ("name", "available", *numbers, "source"):
        table.add_column(column, justify="right" if column in numbers else "left")
    for name in names:
        spec = CATALOGUE[name]
        found = find_local(spec)
        stats = ["", "", "", "", ""]
        if found and not args.no_stats:
            s = load(name, download=False).statistics()
            stats = [
                f"{s['users']:,}",
                f"{s['items']:,}",
                f"{s['interactions']:,}",
                f"{s['avg_len']:.1f}",
                f"{s['tied_steps']:.0%}",
            ]
        available = f"{found.origin}: {found.path}" if found else "missing"
        table.add_row(name, available, *stats, str(spec.max_len), spec.source)
    Console(width=200).print(table)
    return 0
