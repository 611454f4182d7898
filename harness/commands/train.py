"""`train`: one training run of one model on one dataset, tracked in MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path


def _settings_help() -> str:
    # imported here, not at registration: pydantic and numpy would slow every `--help`
    from harness.config import TrainConfig

    lines = ["training settings for --set (model options are listed by --list-options):"]
    for name, field in TrainConfig.model_fields.items():
        if name == "model_params":
            continue
        default = field.default_factory() if field.default_factory else field.default
        # a description that explains its default (None = "the dataset's") says it once
        said = "(default:" in (field.description or "")
        lines.append(f"  {name:<16} {field.description}" + ("" if said else f" (default: {default})"))
    return "\n".join(lines)


# the parsers' own list, repeated so that registering the command imports nothing (pandas)
FORMATS = ("atomic", "movielens-dat", "csv", "tsv", "amazon-json")


def _columns(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",")]
    if len(names) != 3 or not all(names):
        raise argparse.ArgumentTypeError(f"expected USER,ITEM,TIMESTAMP column names, got {text!r}")
    return names


def _list_options(model: str, console) -> None:
    """The model's options (--set NAME=VALUE) with type, default, allowed values and what each does."""
    from rich.table import Table

    import models

    table = Table(title=f"options of {model} (--set NAME=VALUE)", title_justify="left")
    for column in ("option", "type", "default", "allowed"):
        table.add_column(column, no_wrap=True)
    table.add_column("what it does", ratio=1)
    for option in models.model_class(model).config_class.options():
        allowed = ", ".join(map(str, option.choices)) if option.choices else ""
        table.add_row(option.name, option.kind, repr(option.default), allowed, option.help)
    console.print(table)


def register(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="train and evaluate one model on one dataset",
        description="Train one model with full-softmax cross-entropy, early-stop on validation, "
        "test the best checkpoint once, and record everything in MLflow. A killed run resumes "
        "from its last epoch when the same command is run again.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    format_help = parser.format_help

    def with_settings() -> str:  # the settings table is built only when `train --help` asks
        parser.epilog = _settings_help()
        return format_help()

    parser.format_help = with_settings
    parser.add_argument("--model", default="sasrec", help="registered model name (default: sasrec)")
    parser.add_argument(
        "--dataset",
        default="ml-latest-small",
        help="dataset name (see `datasets`) or a file path (default: ml-latest-small)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training setting or model option, repeatable, e.g. --set lr=5e-4 "
        "--set hidden_size=32 (values are YAML: 1e-3, true, [10, 20])",
    )
    parser.add_argument("--config", type=Path, help="YAML file of settings (overridden by --set)")
    parser.add_argument(
        "--format",
        dest="data_format",
        choices=FORMATS,
        help="format of a --dataset file (default: from its name: .inter atomic, "
        ".csv, .dat movielens-dat, .tsv/.data, .json amazon-json)",
    )
    parser.add_argument(
        "--columns",
        dest="data_columns",
        type=_columns,
        metavar="USER,ITEM,TIMESTAMP",
        help="the user, item and timestamp columns of a --dataset file (atomic, csv, "
        "amazon-json; default: recognised from common names such as user_id, item_id, "
        "timestamp)",
    )
    parser.add_argument(
        "--protocol", choices=["prefix", "all_positions"], help="training protocol (default: prefix, the paper's)"
    )
    parser.add_argument("--epochs", type=int, help="maximum epochs (default: 300)")
    parser.add_argument("--seed", type=int, help="random seed (default: 2020, RecBole's)")
    parser.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--kernel-backend", help="auto, torch, cpp, triton or cuda (default: auto)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under results/)")
    parser.add_argument("--experiment", default="train", help="MLflow experiment (default: train)")
    parser.add_argument("--no-track", action="store_true", help="do not record in MLflow")
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where resumable checkpoints go (default: results/checkpoints)",
    )
    parser.add_argument("--no-progress", action="store_true", help="plain log lines, no bars")
    parser.add_argument(
        "--list-options",
        action="store_true",
        help="print the model's options with their types, defaults, allowed values and descriptions, and exit",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from harness.cli import output_console
    from harness.config import make_config, read_config_file

    console = output_console()
    if args.list_options:
        _list_options(args.model, console)
        return 0
    base = read_config_file(args.config) if args.config else {}
    base["model"] = args.model
    base["dataset"] = args.dataset
    for key in ("protocol", "epochs", "seed", "device", "kernel_backend", "data_format", "data_columns"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    config = make_config(base, args.overrides)

    from harness.data.catalogue import tie_order_note
    from harness.metrics import metric_key
    from harness.store.checks import checked_uri
    from harness.store.location import artifact_folder, default_tracking_uri, results_dir
    from harness.writable import require_writable, require_writable_store

    # every place the run writes to takes files, or one line now rather than a traceback later
    checkpoint_dir = args.checkpoint_dir or results_dir() / "checkpoints"
    require_writable(checkpoint_dir, "the checkpoint folder")
    if not args.no_track:
        # a wrong URI or a damaged database: one line now, not after the data is loaded
        uri = checked_uri(args.tracking_uri or default_tracking_uri(), reading=False)
        require_writable_store(uri, artifact_folder(uri))

    from harness.data.catalogue import load_for
    from harness.store.writer import Tracker
    from harness.train import Trainer

    # before the store is opened: a dataset that cannot train leaves it as it was
    data = load_for(config, log=lambda line: console.print(line, highlight=False))
    if not args.no_track:
        console.print(f"tracking store {uri}, experiment {args.experiment!r}", highlight=False)
    tracker = None if args.no_track else Tracker(args.tracking_uri, args.experiment)
    trainer = Trainer(
        config,
        data=data,
        tracker=tracker,
        checkpoint_dir=checkpoint_dir,
        progress=not args.no_progress,
    )
    console.print(
        f"[bold]{trainer.model_name}[/] on {trainer.data.name} ({trainer.data.n_users:,} users, "
        f"{trainer.data.n_items:,} items), protocol {config.protocol}, max_len {trainer.max_len}, "
        f"{trainer.model.n_parameters():,} parameters, device {trainer.device}, "
        f"kernels {trainer.model.backend_report() or 'torch'}"
    )
    note = tie_order_note(config.dataset, config.tie_order)
    if note:
        console.print(note, highlight=False)
    result = trainer.fit()
    table = Table(
        title=f"{trainer.model_name} test (best validation epoch {result.best_epoch} of "
        f"{result.epochs_run}, {result.seconds_per_epoch:.1f} s/epoch)"
    )
    table.add_column("metric")
    for k in config.topk:
        table.add_column(f"@{k}", justify="right")
    for metric in ("hit", "ndcg", "mrr"):
        table.add_row(metric, *(f"{result.test[metric_key(metric, k, 'test')]:.4f}" for k in config.topk))
    console.print(table)
    if result.run_id:
        console.print(f"MLflow run {result.run_id} in {tracker.uri}")
    return 0
