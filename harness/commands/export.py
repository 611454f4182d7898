"""`export`: copy studies into a small self-contained tracking store (committed evidence)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser(
        "export",
        help="copy studies' runs into a self-contained tracking store to commit beside a report",
        description="Copy every run of the named studies (MLflow experiments) -- status, params, tags, "
        "metric histories and per-user test ranks, not checkpoints -- into OUT as text: one record per "
        "run (OUT/runs/STUDY/*.json) and its ranks compressed (OUT/ranks/STUDY/*.csv.gz), written the "
        "same when the run is the same, so that git grows only by the runs that changed. "
        "`python -m harness report STUDY --tracking-uri OUT` then regenerates the report from it alone, "
        "on any clone; `python -m harness import OUT` puts the runs back into a local store. OUT is "
        "rebuilt from scratch.",
    )
    parser.add_argument("studies", nargs="+", metavar="STUDY", help="studies (MLflow experiments) to copy")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder of the new store, e.g. reports/paper_beauty/store"
    )
    parser.add_argument("--tracking-uri", help="source MLflow tracking URI (default: sqlite under results/)")
    parser.add_argument(
        "--checkpoints",
        nargs="*",
        metavar="STUDY",
        help="also carry each unfinished final run's last epoch checkpoint (OUT/checkpoints/) "
        "of these studies (none named: of every exported study), so that `import` on "
        "another clone lets `run` resume it instead of starting over",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.store.transfer import export_studies

    checkpoints = None
    if args.checkpoints is not None:
        from harness.studies.context import final_checkpoint_dir

        unknown = sorted(set(args.checkpoints) - set(args.studies))
        if unknown:
            raise UserError(f"--checkpoints names studies that are not exported: {', '.join(unknown)}")
        checkpoints = {study: final_checkpoint_dir(study) for study in args.checkpoints or args.studies}

    copies = export_studies(args.tracking_uri, args.studies, args.out, checkpoints=checkpoints)
    for name, copy in copies.items():
        line = f"{name}: {len(copy.copied)} runs -> {args.out}"
        if checkpoints and name in checkpoints:
            line += f", {len(copy.checkpoints)} unfinished run checkpoint(s) -> {args.out / 'checkpoints' / name}"
        print(line)
    # quoted: a path with spaces (or a study name with shell characters) still pastes as one word
    command = ["python", "-m", "harness", "report", *copies, "--tracking-uri", str(args.out)]
    print(f"report: {shlex.join(command)}")
    return 0
