"""How fast can a training epoch be on this CPU without changing the mathematics? A lower bound from
the matrix products alone, set beside the measured epochs and the training-cost targets.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python scripts/epoch_floor.py \
        --costs reports/bench_cpu/epochs/results.json --out reports/bench_cpu/floor

For each (model, hidden, protocol) row of the committed training-cost benchmark
(`scripts/bench_training_cost.py`), the same sampled batches of the same epoch order are run once
(forward, loss, backward) under torch's FLOP counter, and the count is scaled to the epoch as the
benchmark scales its times. Only matrix products, convolutions and attention are counted: the
elementwise work (dropout, softmax, normalisation, the selective scan's recurrences, Adam) is left
out, so the floor is what the epoch would cost if everything else were free.

The rate is this machine's best float32 matrix product: the largest GFLOP/s of `torch.mm` over the
shapes that dominate training (the tied scores over every item, the feed-forward and projection
layers), best of `--repeats`, with `--threads` threads. floor = GFLOP per epoch / that rate.
A target below the floor cannot be reached by any implementation that keeps float32 and the
model's arithmetic on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def matmul_rate(threads: int, repeats: int, n_items: int, hidden: int) -> dict[str, float]:
    """Best achieved GFLOP/s of float32 mm per shape (m, k, n)."""
    import torch

    torch.set_num_threads(threads)
    shapes = {
        f"scores 2048x{hidden} @ {hidden}x{n_items}": (2048, hidden, n_items),
        f"feed-forward 20480x{hidden} @ {hidden}x{4 * hidden}": (20480, hidden, 4 * hidden),
        "square 2048x2048 @ 2048x2048": (2048, 2048, 2048),
    }
    rates = {}
    for label, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - began)
        rates[label] = 2.0 * m * k * n / best / 1e9
    return rates


def epoch_flops(row: dict, batches: int) -> float:
    """Matrix-product FLOPs of one training epoch (forward + backward), from sampled batches."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from harness.config import make_config
    from harness.data.samples import batch_order, gather
    from harness.train import Trainer

    config = make_config(
        {
            "dataset": row["dataset"],
            "model": row["model"],
            "batching": "bucketed",
            "protocol": row["protocol"],
            "seed": 2020,
        },
        [f"hidden_size={row['hidden']}"],
    )
    trainer = Trainer(config, progress=None)
    all_positions = row["protocol"] == "all_positions"
    order = batch_order(
        trainer.train_windows, config.batch_size, np.random.default_rng([2020, 1]), all_positions, bucketed=True
    )
    step = max(1, len(order) // batches)
    sampled = order[::step][:batches]  # the batches the cost benchmark times
    width = None if trainer.model.trims_padding else trainer.max_len
    trainer.model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        for index in sampled:
            batch = gather(trainer.data, trainer.train_windows.subset(index), width, all_positions)
            trainer._loss(batch).backward()
    return counter.get_total_flops() * len(order) / len(sampled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--costs", type=Path, default=Path("reports/bench_cpu/epochs/results.json"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hidden", type=int, nargs="*", default=[64], help="rows of these widths only")
    parser.add_argument(
        "--reuse-flops",
        action="store_true",
        help="take the FLOP counts from OUT/results.json (they do not depend on the machine's load) and "
        "measure only the matrix-product rate, e.g. again on a quiet machine",
    )
    args = parser.parse_args()

    import torch

    from harness.data.catalogue import load

    costs = json.loads(args.costs.read_text())
    rows = [r for r in costs["rows"] if r["hidden"] in args.hidden]
    torch.set_num_threads(args.threads)
    n_items = load(costs["dataset"]).n_items
    rates = matmul_rate(args.threads, args.repeats, n_items, max(args.hidden))
    rate = max(rates.values())
    recbole_epoch = costs["recbole"]["epoch_s"] if costs.get("recbole") else None
    counted = {}
    if args.reuse_flops:
        previous = json.loads((args.out / "results.json").read_text())["rows"]
        counted = {(e["model"], e["hidden"], e["protocol"]): e["gflop_per_epoch"] * 1e9 for e in previous}
    table = []
    for row in rows:
        key = (row["model"], row["hidden"], row["protocol"])
        flops = counted.get(key) or epoch_flops({**row, "dataset": costs["dataset"]}, costs["batches"])
        floor = flops / 1e9 / rate
        entry = {
            "model": row["model"],
            "hidden": row["hidden"],
            "protocol": row["protocol"],
            "gflop_per_epoch": flops / 1e9,
            "floor_s": floor,
            "current_epoch_s": row["current_epoch_s"],
            "target_3x_s": row["baseline_epoch_s"] / 3,
        }
        if row["model"] == "sasrec" and row["protocol"] == "prefix" and recbole_epoch:
            entry["target_recbole_30_s"] = recbole_epoch / 30
        table.append(entry)
        print(entry, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "costs": str(args.costs),
        "rates_gflops": rates,
        "rate_gflops": rate,
        "rows": table,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Lower bound of a training epoch on this CPU: matrix products only",
        "",
        f"Written by `scripts/epoch_floor.py` (method in its docstring) from `{args.costs}`. Best float32 "
        f"matrix-product rate here, {args.threads} threads: "
        + ", ".join(f"{label}: {value:.0f} GFLOP/s" for label, value in rates.items())
        + f". The floor divides the epoch's matrix-product FLOPs by the best of these ({rate:.0f} GFLOP/s); "
        "everything else (dropout, softmax, scans, Adam, copies) is counted as free.",
        "",
        "| model | hidden | protocol | GFLOP / epoch | floor s | epoch s now | 3x target s | target / floor |",
        "|:---|---:|:---|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        lines.append(
            f"| {e['model']} | {e['hidden']} | {e['protocol']} | {e['gflop_per_epoch']:.0f} | {e['floor_s']:.1f} "
            f"| {e['current_epoch_s']:.1f} | {e['target_3x_s']:.1f} | {e['target_3x_s'] / e['floor_s']:.2f} |"
        )
    for e in table:
        if "target_recbole_30_s" in e:
            lines += [
                "",
                f"SASRec prefix at hidden {e['hidden']}: 1/30 of RecBole's epoch ({recbole_epoch:.1f} s) is "
                f"{e['target_recbole_30_s']:.1f} s against a matrix-product floor of {e['floor_s']:.1f} s "
                f"(target / floor {e['target_recbole_30_s'] / e['floor_s']:.2f}).",
            ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
