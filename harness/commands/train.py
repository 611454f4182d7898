"""`train`: one training run of one model on one dataset, tracked in MLflow."""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.config import TrainConfig


def _settings_help() -> str:
    lines = ["training settings for --set (model options are listed by --list-options):"]
    for name, field in TrainConfig.model_fields.items():
        if name == "model_params":
            continue
        default = field.default_factory() if field.default_factory else field.default
        lines.append(f"  {name:<16} {field.description} (default: {default})")
    return "\n".join(lines)


def register(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="train and evaluate one model on one dataset",
        description="Train one model with full-softmax cross-entropy, early-stop on validation, "
        "test the best checkpoint once, and record everything in MLflow. A killed run resumes "
        "from its last epoch when the same command is run again.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sasrec", help="registered model name (default: sasrec)")
    parser.add_argument("--dataset", default="ml-latest-small",
                        help="dataset name (see `datasets`) or a file path (default: ml-latest-small)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting or model option, repeatable, e.g. --set lr=5e-4 "
                        "--set hidden_size=32 (values are YAML: 1e-3, true, [10, 20])")
    parser.add_argument("--config", type=Path, help="YAML file of settings (overridden by --set)")
    parser.add_argument("--protocol", choices=["prefix", "all_positions"],
                        help="training protocol (default: prefix, the paper's)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (default: 300)")
    parser.add_argument("--seed", type=int, help="random seed (default: 2020, RecBole's)")
    parser.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--kernel-backend", help="auto, torch or triton (default: auto)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under results/)")
    parser.add_argument("--experiment", default="train", help="MLflow experiment (default: train)")
    parser.add_argument("--no-track", action="store_true", help="do not record in MLflow")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where resumable checkpoints go (default: results/checkpoints)")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines, no bars")
    parser.add_argument("--list-options", action="store_true",
                        help="print the model's options with defaults and exit")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import yaml
    from rich.console import Console
    from rich.table import Table

    import models
    from harness.config import make_config
    from harness.data.catalogue import tie_order_note
    from harness.metrics import metric_key

    console = Console()
    if args.list_options:
        config = models.build_config(args.model)
        for key, value in config.to_dict().items():
            console.print(f"{key} = {value!r}")
        return 0
    base = yaml.safe_load(args.config.read_text()) if args.config else {}
    base = dict(base or {})
    base["model"] = args.model
    base["dataset"] = args.dataset
    for key, value in (("protocol", args.protocol), ("epochs", args.epochs), ("seed", args.seed),
                       ("device", args.device), ("kernel_backend", args.kernel_backend)):
        if value is not None:
            base[key] = value
    config = make_config(base, args.overrides)

    from harness.tracking import Tracker, results_dir
    from harness.train import Trainer

    tracker = None if args.no_track else Tracker(args.tracking_uri, args.experiment)
    trainer = Trainer(
        config,
        tracker=tracker,
        checkpoint_dir=args.checkpoint_dir or results_dir() / "checkpoints",
        progress=not args.no_progress,
    )
    console.print(
        f"[bold]{config.model}[/] on {trainer.data.name} ({trainer.data.n_users:,} users, "
        f"{trainer.data.n_items:,} items), protocol {config.protocol}, max_len {trainer.max_len}, "
        f"{trainer.model.n_parameters():,} parameters, device {trainer.device}, "
        f"kernels {trainer.model.backend_report() or 'torch'}"
    )
    note = tie_order_note(config.dataset, config.tie_order)
    if note:
        console.print(note, highlight=False)
    result = trainer.fit()
    table = Table(title=f"{config.model} test (best validation epoch {result.best_epoch} of "
                  f"{result.epochs_run}, {result.seconds_per_epoch:.1f} s/epoch)")
    table.add_column("metric")
    for k in config.topk:
        table.add_column(f"@{k}", justify="right")
    for metric in ("hit", "ndcg", "mrr"):
        table.add_row(metric, *(f"{result.test[metric_key(metric, k, 'test')]:.4f}"
                                for k in config.topk))
    console.print(table)
    if result.run_id:
        console.print(f"MLflow run {result.run_id} in {tracker.uri}")
    return 0
