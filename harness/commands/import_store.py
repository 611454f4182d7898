"""`import`: put an exported store's runs (and carried checkpoints) back into the local store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser(
        "import",
        help="copy the runs of an exported store (e.g. reports/paper_beauty/store) into the local tracking store",
        description="The reverse of `export`: copy the runs of STORE's studies into the local tracking "
        "store, skipping runs it already has (same origin, or a final run of a configuration and seed "
        "that finished here), so importing twice changes nothing. Checkpoints the export carried "
        "(STORE/checkpoints/) are put beside the imported runs, and `run` then skips the finished "
        "runs and resumes the unfinished ones from their last epoch: how a study continues on a "
        "fresh clone.",
    )
    parser.add_argument("store", type=Path, help="exported store folder (text records, or the older mlflow.db)")
    parser.add_argument("studies", nargs="*", metavar="STUDY", help="studies to import (default: all in STORE)")
    parser.add_argument("--tracking-uri", help="target MLflow tracking URI (default: sqlite under results/)")
    parser.add_argument(
        "--without-ranks",
        action="store_true",
        help="import tested runs even when STORE lacks their per-user test ranks (the report then "
        "cannot test them per user); without it such a store is refused before anything is copied",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from harness.store.checkpoints import check_store
    from harness.store.transfer import import_studies
    from harness.studies.context import final_checkpoint_dir

    # checkpoints first: one crafted to run code refuses the whole import before a run is copied
    for path in check_store(args.store):
        print(f"warning: carried checkpoint {path} is unreadable; its run will start again", file=sys.stderr)
    copies = import_studies(
        args.store,
        args.studies,
        args.tracking_uri,
        checkpoint_dir=final_checkpoint_dir,
        without_ranks=args.without_ranks,
        log=lambda line: print(line, flush=True),
    )
    for name, copy in copies.items():
        print(
            f"{name}: {len(copy.copied)} run(s) imported, {copy.skipped} already here, "
            f"{len(copy.checkpoints)} checkpoint(s) to resume from"
        )
    return 0
