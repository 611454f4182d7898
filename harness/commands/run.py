"""`run`: run a study file end to end: search (Optuna), then the final seed runs (MLflow)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser(
        "run",
        help="run a study: hyper-parameter search, then final seed runs of the selected configs",
        description="Run a study file (studies/*.yaml): one Optuna study per (dataset, model) "
        "optimising validation metrics only, then the best configuration per model, dataset and "
        "select_per value retrained with the final seeds and tested once. Rerunning the same "
        "command resumes an interrupted study. Several study files share one pool of workers for "
        "their final runs. The study file format: docs/studies.md.",
    )
    parser.add_argument(
        "study",
        type=Path,
        nargs="+",
        help="study file (YAML); with several, their searches run in turn and then "
        "all their final runs as one queue, so no worker idles between studies, taken seed "
        "round by seed round (every study's first seeds, then their second seeds, ...)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved plan (models, datasets, search spaces, "
        "trial counts, storage, expected cost) and the progress so far (final runs "
        "stored, their epochs and best values, what is left); train nothing",
    )
    parser.add_argument(
        "--no-timing",
        action="store_true",
        help="with --dry-run: no timed training step for configurations without a stored epoch "
        "(the time estimate then leaves them out)",
    )
    parser.add_argument(
        "--storage",
        help="Optuna storage: a journal file path (default "
        "results/studies/<name>.journal) or an RDB URL, e.g. "
        "postgresql+psycopg2://user:pass@host/db",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="local worker processes for the search and the final runs (default: the study's `workers`, else 1)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the study's, else sqlite under results/); with an "
        "http://host:port server and a PostgreSQL --storage, the same command on several hosts "
        "shares the study (docs/multi-host.md)",
    )
    parser.add_argument("--no-live", action="store_true", help="no live table, log lines only")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from harness.cli import output_console
    from harness.errors import UserError
    from harness.studies.validation import load_study

    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    console = output_console()
    # checking builds every configuration of the space (the model registry, torch): seconds
    console.print(f"checking {', '.join(map(str, args.study))} ...", highlight=False)
    studies = [load_study(path) for path in args.study]  # every file valid before any work
    names = [study.name for study in studies]
    if len(set(names)) < len(names):
        raise UserError(f"study {next(n for n in names if names.count(n) > 1)!r} given twice")
    if args.dry_run:
        from harness.studies.context import StudyContext
        from harness.studies.plan import print_plan, print_progress

        for study in studies:
            context = StudyContext(study, args.storage, args.tracking_uri)
            print_plan(study, context, console)
            print_progress(study, context, console, workers=args.workers, timing=not args.no_timing)
        return 0
    _require_writable(studies, args)
    from harness.studies.runner import run_studies

    return run_studies(
        studies,
        storage=args.storage,
        workers=args.workers,
        tracking_uri=args.tracking_uri,
        console=console,
        live=not args.no_live,
    )


def _require_writable(studies, args) -> None:
    """Each study's folder (checkpoints, locks), journal and tracking store take files, before any
    work: a read-only results/ is one line, not a traceback after the first trial."""
    from harness.store.checks import checked_uri
    from harness.store.location import artifact_folder, default_tracking_uri
    from harness.studies.context import study_root
    from harness.studies.storage import StudyStorage, default_storage_url
    from harness.writable import require_writable, require_writable_store

    for study in studies:
        require_writable(study_root(study.name), "the study folder")
        storage = StudyStorage(args.storage or study.spec.storage.url or default_storage_url(study.name))
        if storage.path is not None:  # a journal file or an SQLite database: a local file
            require_writable(storage.path.parent, "the study storage's folder")
        # a wrong URI or a damaged database: one line now, not a failed trial later
        uri = checked_uri(args.tracking_uri or study.spec.tracking_uri or default_tracking_uri(), reading=False)
        require_writable_store(uri, artifact_folder(uri))
