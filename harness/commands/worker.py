"""`worker`: join a study's search from another process or machine (shared storage)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser(
        "worker",
        help="join a running study's search (same storage) from another process or machine",
        description="Run trials of a study until its budget is spent, sharing the Optuna storage "
        "with any number of other workers: a journal file on one machine, or an RDB URL "
        "(PostgreSQL) across machines. Studies are created race-free if missing. Workers run the "
        "search only: `python -m harness run STUDY` (rerun after the workers end, or running "
        "alongside them) waits for the search and runs the final seed runs.",
    )
    # several only for the final stage that `run` hands its workers (one pool over the studies)
    parser.add_argument("study", type=Path, nargs="+", help="study file (YAML)")
    parser.add_argument("--storage", help="Optuna storage (default: the study's, else results/studies/<name>.journal)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the study's); several hosts: docs/multi-host.md"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads for this worker")
    parser.add_argument("--no-live", action="store_true", help="no live table, log lines only")
    # used by `run` when it starts local workers
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=["search", "final"], default="search", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from harness.cli import output_console
    from harness.errors import UserError
    from harness.studies.runner import run_final_worker, run_worker, set_threads, watch_parent
    from harness.studies.validation import load_study

    if args.stage == "search" and len(args.study) != 1:
        raise UserError("a worker joins one study's search: give one study file")
    studies = [load_study(path) for path in args.study]
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    if args.parent_pid:
        watch_parent(args.parent_pid)
    set_threads(args.threads)
    console = output_console()
    if args.stage == "final":
        return run_final_worker(studies, args.storage, args.tracking_uri, args.index or 0, console)
    return run_worker(
        studies[0],
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        index=args.index,
        console=console,
        live=not (args.no_live or args.quiet),
    )
