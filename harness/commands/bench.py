"""`bench`: training throughput, full-ranking inference and peak memory of models, side by side."""

from __future__ import annotations

import argparse

from harness.store import contract as tc


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def register(sub) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmark training throughput, inference latency and peak memory",
        description="Time one training step (full-softmax CE, Adam) and one full-ranking inference "
        "batch for every combination of the chosen axes, on synthetic batches (default) or batches "
        "of a dataset. Warm-up steps are excluded, CUDA is synchronised before every clock read, "
        "and the table shows medians with their spread and ratios to the first row of each shape. "
        "Comma-separated lists build the product; chunk sizes apply to SSD models only and "
        "all_positions to causal models only (other combinations are skipped with a note).",
    )
    parser.add_argument(
        "--models",
        type=_names,
        default=["sasrec"],
        help="models (default: sasrec); a variant with its own options is NAME=MODEL:KEY=VALUE[:KEY=VALUE], "
        "shown as NAME (e.g. tim4rec-log=tim4rec:time_encoding=log)",
    )
    parser.add_argument("--hidden", type=_ints, default=[64], help="hidden sizes (default: 64)")
    parser.add_argument("--seq-len", type=_ints, default=[50], help="sequence lengths (default: 50)")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch (default: 256)")
    parser.add_argument(
        "--infer-batch-size",
        type=int,
        default=None,
        help="users per inference batch (default: the training batch size)",
    )
    parser.add_argument("--chunk-size", type=_ints, default=None, help="SSD chunk sizes (default: each model's own)")
    parser.add_argument(
        "--backend",
        type=_names,
        default=["auto"],
        help="kernel backends: auto, torch, cpp, triton, cuda, each optionally with per-kernel overrides "
        "(cpp:dropout=torch: the C++ kernels but torch's dropout) (default: auto)",
    )
    parser.add_argument(
        "--protocol",
        type=_names,
        default=["prefix"],
        help="training protocols: prefix, all_positions (default: prefix)",
    )
    parser.add_argument(
        "--compile",
        type=_names,
        default=["eager"],
        dest="compiles",
        help="eager, compiled or both (eager,compiled): the encoder through torch.compile "
        "(default: eager; compilation happens in the warm-up steps)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default: 2)")
    parser.add_argument("--dataset", default=None, help="draw batches from this dataset instead of synthetic data")
    parser.add_argument(
        "--n-items", type=int, default=None, help="catalogue size of synthetic data (default: 3416, ML-1M's)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option for every model, repeatable (e.g. n_layers=1)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--track",
        action="store_true",
        help=f"log one MLflow run per cell (experiment 'bench', {tc.KIND}={tc.KIND_BENCH})",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under results/)")
    parser.add_argument("--experiment", default="bench", help="MLflow experiment (default: bench)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from harness.bench.cells import DEFAULT_N_ITEMS, BenchError, parse_model_spec
    from harness.bench.measure import run_benchmark
    from harness.bench.present import log_rows, render_table
    from harness.cli import output_console
    from harness.config import parse_setting, route_setting
    from harness.errors import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset and args.n_items:
        raise UserError("--n-items sets the synthetic catalogue; a --dataset brings its own")
    params = {}
    for item in args.overrides:
        key, value = parse_setting(item)
        training: dict = {}
        route_setting(key, value, training, params)
        if training:  # a bench cell has its own batch and no training run to set up
            raise UserError(f"{key} is a training setting; bench --set takes model options")
        if key.removeprefix("model.") in ("hidden_size", "chunk_size"):
            raise UserError(f"{key} is a benchmark axis: use --hidden / --chunk-size")
    unknown = sorted(set(args.compiles) - {"eager", "compiled"})
    if unknown:
        raise UserError(f"--compile takes eager and/or compiled, got {', '.join(unknown)}")
    console = output_console()
    try:
        specs = [parse_model_spec(text) for text in args.models]
        result = run_benchmark(
            specs,
            hiddens=args.hidden,
            seq_lens=args.seq_len,
            batch_size=args.batch_size,
            chunk_sizes=args.chunk_size or [None],
            backends=args.backend,
            protocols=args.protocol,
            compiles=[name == "compiled" for name in args.compiles],
            repeats=args.repeats,
            warmup=args.warmup,
            dataset=args.dataset,
            n_items=args.n_items or DEFAULT_N_ITEMS,
            infer_batch_size=args.infer_batch_size,
            device=args.device,
            model_params=params,
            on_row=lambda r: console.print(
                f"[dim]measured {r['model']}/{r['backend']} h{r['hidden']} L{r['seq_len']} "
                f"c{r['chunk_size'] or '-'} {r['protocol']}: {r['train_seqs_per_s']:,.0f} seq/s[/]"
            ),
            on_note=lambda n: console.print(f"[yellow]note:[/] {n}"),
            on_progress=lambda m: console.print(f"[dim]{m}[/]"),
        )
    except BenchError as err:
        raise UserError(str(err)) from None
    data = args.dataset or f"synthetic, {args.n_items or DEFAULT_N_ITEMS:,} items"
    console.print(render_table(result, title=f"model benchmark ({data})"))
    for note in result.notes:
        console.print(f"note: {note}")
    if not result.rows:
        raise UserError("no valid cell to measure (see the notes above)")
    if args.track:
        run_ids = log_rows(result.rows, result.machine, args.tracking_uri, args.experiment)
        console.print(f"logged {len(run_ids)} run(s) to MLflow experiment {args.experiment!r}")
    return 0
