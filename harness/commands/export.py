"""`export`: copy studies into a small self-contained tracking store (committed evidence)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser(
        "export",
        help="copy studies' runs into a self-contained tracking store to commit beside a report",
        description="Copy every run of the named studies (MLflow experiments) -- status, params, tags, "
        "metric histories and per-user test ranks, not checkpoints -- into OUT/mlflow.db with the ranks "
        "under OUT/mlartifacts/. `python -m harness report STUDY --tracking-uri sqlite:///OUT/mlflow.db` "
        "then regenerates the report from it alone, on any clone. OUT is rebuilt from scratch.",
    )
    parser.add_argument("studies", nargs="+", metavar="STUDY", help="studies (MLflow experiments) to copy")
    parser.add_argument("--out", type=Path, required=True, help="folder of the new store, e.g. reports/paper_beauty/store")
    parser.add_argument("--tracking-uri", help="source MLflow tracking URI (default: sqlite under results/)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from harness.cli import UserError
    from harness.report import StoreError
    from harness.report.export import export_studies

    try:
        counts = export_studies(args.tracking_uri, args.studies, args.out)
    except StoreError as err:
        raise UserError(str(err)) from None
    for name, count in counts.items():
        print(f"{name}: {count} runs -> {args.out / 'mlflow.db'}")
    print(f"report: python -m harness report {' '.join(counts)} --tracking-uri sqlite:///{args.out / 'mlflow.db'}")
    return 0
