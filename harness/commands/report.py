"""`report`: significance-tested tables, paper comparison and plots from the MLflow store."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("reports")


def _refuse_replacing_a_committed_report(args: argparse.Namespace) -> None:
    """reports/<name>/ with store/ beside it is committed evidence, regenerated from that store
    alone. Written to by default (no --out) from any other store -- the local results, say -- it
    would be silently replaced by a report of different runs: one line instead, saying how to
    regenerate it or where else to write."""
    from harness.errors import UserError
    from harness.store.location import sqlite_database

    if args.out is not None:  # a folder named explicitly is the user's to overwrite
        return
    name = args.name or ("-".join(args.studies) if args.studies else "all")
    committed = DEFAULT_OUT / name / "store"
    if not committed.is_dir():
        return
    source = args.tracking_uri
    database = sqlite_database(source) if source else None
    if source and committed.resolve() in (Path(source).resolve(), database and database.resolve().parent):
        return
    raise UserError(
        f"{DEFAULT_OUT / name} is a committed report made from {committed}, and this report would read "
        f"{source or 'the local tracking store'}: regenerate it with --tracking-uri {committed}, or write "
        "this one elsewhere with --out DIR (or --name NAME)"
    )


def register(sub) -> None:
    parser = sub.add_parser(
        "report",
        help="write a Markdown/HTML report with tables and figures from the tracking store",
        description="Read the MLflow tracking store (never the trainer) and write reports/<name>/ with "
        "report.md, a self-contained report.html, figures/*.png and tables/*.csv|tex: results per "
        "dataset and protocol group (mean and std over seeds, best bold, second underlined, "
        "significance against a reference model with seeds and users in the null, Holm-adjusted), the protocol groups and why "
        "they differ, a comparison with the published numbers, study histories, parameter "
        "importances and Pareto fronts, and benchmark throughput/memory plots.",
    )
    parser.add_argument(
        "studies",
        nargs="*",
        metavar="STUDY",
        help="studies (MLflow experiments) to report on (default: all experiments)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI, or the folder of a store made by `export` (default: sqlite under results/)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: reports/, where a committed report -- one with its store/ beside "
        "it -- is only regenerated from that store)",
    )
    parser.add_argument("--name", help="report name, the subfolder of --out (default: the study names or 'all')")
    parser.add_argument("--reference", default="tim4rec", help="model the others are tested against (default: tim4rec)")
    parser.add_argument(
        "--test",
        default="seeds",
        choices=["seeds", "ttest", "wilcoxon", "permutation", "bootstrap"],
        help="seeds (default): seed-and-user t-test, training randomness in the null, models "
        "with 2+ seeds only (a per-user t-test of the trained networks is shown beside it); "
        "ttest, wilcoxon, permutation, bootstrap: a paired per-user test of the trained "
        "networks only (docs/statistics.md)",
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics, e.g. hit@10,ndcg@10 (default: hit, ndcg, mrr at 10, 20, 50)",
    )
    parser.add_argument(
        "--primary",
        default="ndcg@10",
        help="metric of the exploratory all-pairs table and of the --confirm family (default: ndcg@10)",
    )
    parser.add_argument(
        "--confirm",
        default=None,
        metavar="MODEL[,MODEL]",
        help="a family of its own: these models against the reference at each hidden size, on the "
        "primary metric, Holm over those comparisons alone (table confirm_*), beside the results table's "
        "family of every metric and model; name it before the results for a confirmation (default: none)",
    )
    parser.add_argument(
        "--runs",
        default="auto",
        choices=["auto", "final", "train"],
        help="runs summarised in the results tables: final (study seed runs), train "
        "(`harness train` runs), auto = final when there are any (default: auto)",
    )
    parser.add_argument(
        "--bench-experiment", default="bench", help="experiment holding benchmark runs (default: bench)"
    )
    parser.add_argument(
        "--n-resamples",
        type=int,
        default=10_000,
        help="resamples of the permutation/bootstrap tests and CIs (default: 10000)",
    )
    parser.add_argument("--no-all-pairs", action="store_true", help="skip the exploratory all-pairs tables")
    parser.set_defaults(handler=run)


def _model_list(text: str | None) -> list[str]:
    """--confirm's comma-separated names; ReportError for an empty name (",", "a,,b", " ")."""
    if text is None:
        return []
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        from harness.report import ReportError

        raise ReportError(f"--confirm takes comma-separated model names; got {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    from harness.cli import output_console
    from harness.report import ReportOptions, generate_report

    _refuse_replacing_a_committed_report(args)
    console = output_console()
    options = ReportOptions(
        studies=args.studies,
        tracking_uri=args.tracking_uri,
        out=args.out or DEFAULT_OUT,
        name=args.name,
        reference=args.reference,
        test=args.test,
        alpha=args.alpha,
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
        primary=args.primary,
        confirm=_model_list(args.confirm),
        runs=args.runs,
        bench_experiment=args.bench_experiment,
        n_resamples=args.n_resamples,
        all_pairs=not args.no_all_pairs,
        log=lambda line: console.print(line, highlight=False),
    )
    report = generate_report(options)  # its ReportError and StoreError are UserErrors
    console.print(
        f"report written to {report.directory}: {report.markdown.name}, {report.html.name}, "
        f"{len(report.tables)} tables, {len(report.figures)} figures "
        f"({len(report.groups)} protocol group(s), {report.run_kind} runs)"
    )
    for note in dict.fromkeys(report.notes):
        console.print(f"note: {note}")
    return 0
