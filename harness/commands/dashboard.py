"""`dashboard`: optuna-dashboard on a study's Optuna storage, if it is installed."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser(
        "dashboard",
        help="start optuna-dashboard (127.0.0.1) on a study's Optuna storage",
        description="Serve optuna-dashboard for the studies in a storage: pass a study file (its "
        "storage, default results/studies/<name>.journal) or --storage.",
    )
    parser.add_argument("study", type=Path, nargs="?", help="study file (YAML)")
    parser.add_argument("--storage", help="journal file path or RDB URL")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError

    try:
        import optuna_dashboard
    except ImportError:
        raise UserError(
            "optuna-dashboard is not installed; install it with `pip install optuna-dashboard` "
            "(or browse the runs with `python -m harness ui`)"
        ) from None
    from harness.studies.storage import StudyStorage, default_storage_url

    if args.storage:
        url = args.storage
    elif args.study:
        from harness.studies.validation import load_study

        study = load_study(args.study, check_datasets=False)
        url = study.spec.storage.url or default_storage_url(study.name)
    else:
        raise UserError("give a study file or --storage")
    storage = StudyStorage(url)
    if storage.kind == "journal" and not storage.exists():
        raise UserError(f"no study storage at {storage.path} yet; run the study first")
    print(f"optuna-dashboard on http://{args.host}:{args.port} ({storage.describe()})", flush=True)
    optuna_dashboard.run_server(storage.open(), host=args.host, port=args.port)
    return 0
