"""Training cost side by side: seconds per training epoch and per full evaluation on amazon-beauty, for
this checkout, an earlier commit and RecBole 1.2's SASRec, measured in one run on one machine.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python scripts/bench_training_cost.py \
        --baseline 9f263d3 --recbole /tmp/recbole --out reports/bench_cpu/epochs

The earlier commit is checked out into a temporary git worktree and every cell runs in a fresh
subprocess with that checkout's own code, alternating baseline and current cell by cell so that drift
of the machine falls on both. RecBole (never a project dependency) is installed into a side folder as
`scripts/check_against_recbole.py` describes.

What a cell measures (model, hidden size, training protocol; batch 2048, bucketed batches as the amazon-beauty
studies train, or `--batching random` as the faithful default does; the official model options, `--threads`
torch threads):
- epoch: the epoch's batch order is drawn as training draws it (seed 2020, epoch 1); every k-th batch
  of it is timed (gathering the batch, forward, loss, backward, Adam step) after one untimed warm-up
  batch, `--repeats` times; the median time of each sampled batch, summed and scaled by
  (batches in the epoch) / (batches sampled), estimates the epoch. The same batches are timed for both
  checkouts (same data, seed and sampling), so the ratio compares like with like.
- evaluation: full ranking of the test split (22,363 users on amazon-beauty), median of `--repeats`
  after one warm-up.
RecBole: its own SASRec with the TiM4Rec baseline configuration, its own training loader (random
batches of 2048 prefix samples, the paper protocol) and its own full-sort evaluation; the first
`--batches` batches of the loader are timed (fetching included) and scaled to the loader's length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAUSAL = ("sasrec", "tisasrec", "mamba4rec", "ssd4rec")  # faithful tim4rec trains with prefix samples only


# ----------------------------------------------------------------------------------- one cell, in-process
def measure_cell(cell: dict) -> dict:
    """Runs inside the checkout under test: only APIs that both checkouts share."""
    import numpy as np
    import torch

    from harness.config import make_config
    from harness.data.samples import batch_order, gather
    from harness.train import Trainer

    torch.set_num_threads(cell["threads"])
    options = [f"hidden_size={cell['hidden']}"]
    if cell.get("heads"):  # the low-dimension studies' head_dim rule: this many heads at every width
        import models

        shape = models.build_config(cell["model"], {})  # the defaults: expand does not depend on the width
        if hasattr(shape, "head_dim"):
            options.append(f"head_dim={cell['hidden'] * shape.expand // cell['heads']}")
    config = make_config(
        {
            "dataset": cell["dataset"],
            "model": cell["model"],
            "batching": cell.get("batching", "bucketed"),
            "protocol": cell["protocol"],
            "threads": cell["threads"],
            "seed": 2020,
        },
        options,
    )
    trainer = Trainer(config, progress=None)
    all_positions = cell["protocol"] == "all_positions"
    batches = batch_order(
        trainer.train_windows,
        config.batch_size,
        np.random.default_rng([2020, 1]),
        all_positions,
        bucketed=config.batching == "bucketed",
    )
    step = max(1, len(batches) // cell["batches"])
    sampled = batches[::step][: cell["batches"]]
    width = None if trainer.model.trims_padding else trainer.max_len
    trainer.model.train()

    def train_step(index):
        batch = gather(trainer.data, trainer.train_windows.subset(index), width, all_positions)
        loss = trainer._loss(batch)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    train_step(batches[-1])  # warm-up (allocator, lazy initialisation)
    seconds = np.zeros((cell["repeats"], len(sampled)))
    for repeat in range(cell["repeats"]):
        for position, index in enumerate(sampled):
            began = time.perf_counter()
            train_step(index)
            seconds[repeat, position] = time.perf_counter() - began
    epoch = float(np.median(seconds, axis=0).sum() * len(batches) / len(sampled))
    trainer.evaluate_split("test")  # warm-up
    evaluations = []
    for _ in range(cell["repeats"]):
        began = time.perf_counter()
        result = trainer.evaluate_split("test")
        evaluations.append(time.perf_counter() - began)
    return {
        "epoch_s": epoch,
        "eval_s": statistics.median(evaluations),
        "batches": len(batches),
        "sampled": len(sampled),
        "users": int(len(result.ranks)),
    }


def measure_recbole(cell: dict) -> dict:
    """RecBole 1.2 SASRec, its loader and evaluator, on the same dataset file and protocol."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from check_against_recbole import recbole_pipeline

    from harness.data.catalogue import locate

    torch.set_num_threads(cell["threads"])
    inter_file = locate(cell["dataset"], download=False)[1].path
    config, dataset, (train, _, test) = recbole_pipeline(cell["recbole"], inter_file, cell["dataset"], 50)
    import recbole.trainer.trainer as recbole_trainer
    from recbole.model.sequential_recommender.sasrec import SASRec

    recbole_trainer.get_tensorboard = lambda logger: None  # TensorBoard is stubbed out, and unused here

    config["metrics"], config["topk"], config["valid_metric"] = ["Hit", "NDCG", "MRR"], [10, 20, 50], "NDCG@10"
    torch.manual_seed(2020)
    model = SASRec(config, train._dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    batches, times = iter(train), []
    for number in range(cell["batches"] + 1):
        began = time.perf_counter()
        interaction = next(batches)
        optimizer.zero_grad()
        model.calculate_loss(interaction).backward()
        optimizer.step()
        if number:  # the first batch is the warm-up
            times.append(time.perf_counter() - began)
    evaluator = recbole_trainer.Trainer(config, model)
    evaluations = []
    for _ in range(cell["repeats"] + 1):
        began = time.perf_counter()
        evaluator.evaluate(test, load_best_model=False, show_progress=False)
        evaluations.append(time.perf_counter() - began)
    return {
        "epoch_s": statistics.median(times) * len(train),
        "eval_s": statistics.median(evaluations[1:]),
        "batches": len(train),
        "sampled": len(times),
        "users": int(len(test._dataset)),
    }


# ----------------------------------------------------------------------------------- orchestration
def run_cell(checkout: Path, cell: dict, cwd: Path | None = None) -> dict:
    """One cell in a fresh interpreter whose `harness` and `models` are the checkout's."""
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(cell["threads"]))
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(cell)]
    done = subprocess.run(command, cwd=cwd or checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cell {cell} failed in {checkout}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cells(models: list[str], hiddens: list[int], args) -> list[dict]:
    common = {
        "dataset": args.dataset,
        "threads": args.threads,
        "batches": args.batches,
        "repeats": args.repeats,
        "batching": args.batching,
        "heads": args.heads,
    }
    out = []
    for model in models:
        for protocol in args.protocols.split(","):
            if protocol == "all_positions" and model not in CAUSAL:
                continue
            for hidden in hiddens:
                out.append({**common, "model": model, "hidden": hidden, "protocol": protocol})
    return out


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


# ----------------------------------------------------------------------------------- the report
def write_report(summary: dict, out: Path) -> None:
    """results.json (the measurements), report.md (the table, ratios) and epoch_seconds.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    rows, recbole = summary["rows"], summary.get("recbole")
    lines = [
        "# Training cost on amazon-beauty: this checkout vs an earlier commit vs RecBole",
        "",
        f"Measured {summary['date']} on {summary['machine']}, {summary['threads']} torch threads, by "
        "`scripts/bench_training_cost.py` (see its docstring for the method). "
        f"Baseline: commit {summary['baseline']}; current: {summary['current']}. Batch 2048, {summary.get('batching', 'bucketed')} batches; "
        + (
            f"SSD models with {summary['heads']} heads at every width (head_dim = hidden * expand / {summary['heads']}, "
            "as the low-dimension studies); "
            if summary.get("heads")
            else ""
        )
        + f"an epoch is estimated from {summary['batches']} sampled batches of the epoch's own order "
        f"(median of {summary['repeats']} repeats each, warm-up excluded), evaluation is the full ranking of "
        "every test user.",
        "",
        "| model | hidden | protocol | epoch s (baseline) | epoch s (current) | epoch speedup | "
        "eval s (baseline) | eval s (current) | eval speedup |",
        "|:---|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['hidden']} | {row['protocol']} | {row['baseline_epoch_s']:.1f} | "
            f"{row['current_epoch_s']:.1f} | {row['baseline_epoch_s'] / row['current_epoch_s']:.2f}x | "
            f"{row['baseline_eval_s']:.2f} | {row['current_eval_s']:.2f} | "
            f"{row['baseline_eval_s'] / row['current_eval_s']:.2f}x |"
        )
    if recbole:
        ours = next((r for r in rows if (r["model"], r["hidden"], r["protocol"]) == ("sasrec", 64, "prefix")), None)
        lines += [
            "",
            f"RecBole 1.2 SASRec (TiM4Rec baseline configuration, hidden 64, its own random batches of "
            f"2048 prefix samples and its own full-sort evaluation; {recbole['sampled']} of "
            f"{recbole['batches']} batches timed): **{recbole['epoch_s']:.1f} s per epoch, "
            f"{recbole['eval_s']:.2f} s per evaluation** of {recbole['users']} users.",
        ]
        if ours:
            lines += [
                "",
                f"Our SASRec prefix epoch (current) is 1/{recbole['epoch_s'] / ours['current_epoch_s']:.1f} "
                f"of RecBole's (baseline: 1/{recbole['epoch_s'] / ours['baseline_epoch_s']:.1f}); our "
                f"evaluation is 1/{recbole['eval_s'] / ours['current_eval_s']:.1f} of RecBole's.",
            ]
    lines += ["", "![seconds per epoch](epoch_seconds.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

    labels = [f"{r['model']}\nh{r['hidden']}\n{'prefix' if r['protocol'] == 'prefix' else 'all pos.'}" for r in rows]
    figure, axis = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 4.5))
    positions = range(len(rows))
    axis.bar(
        [p - 0.2 for p in positions],
        [r["baseline_epoch_s"] for r in rows],
        0.4,
        label=f"baseline {summary['baseline']}",
    )
    axis.bar(
        [p + 0.2 for p in positions], [r["current_epoch_s"] for r in rows], 0.4, label=f"current {summary['current']}"
    )
    if recbole:
        axis.axhline(recbole["epoch_s"], color="grey", linestyle="--", label="RecBole SASRec h64")
        axis.set_yscale("log")
    axis.set_xticks(list(positions), labels, fontsize=7)
    axis.set_ylabel("seconds per training epoch")
    axis.set_title(f"amazon-beauty, batch 2048, {summary['threads']} threads: {summary['machine']}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "epoch_seconds.png", dpi=110, metadata={"Software": None})
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default="9f263d3", help="the commit to compare against (a git revision)")
    parser.add_argument("--recbole", help="folder holding recbole 1.2 (skip RecBole when absent)")
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--models", default="sasrec,tisasrec,mamba4rec,ssd4rec,tim4rec")
    parser.add_argument("--hidden", default="16,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8, help="batches timed per epoch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--batching",
        choices=["bucketed", "random"],
        default="bucketed",
        help="the epoch's batches: bucketed (the amazon-beauty studies') or random (the faithful default)",
    )
    parser.add_argument("--protocols", default="prefix,all_positions", help="training protocols to measure")
    parser.add_argument(
        "--heads",
        type=int,
        help="SSD models (TiM4Rec, SSD4Rec*): head_dim = hidden * expand / HEADS, as the low-dimension studies set "
        "it (4); default: the official head_dim 32, which leaves one head at hidden 16",
    )
    parser.add_argument("--out", type=Path, help="folder for results.json, report.md and the figure")
    parser.add_argument("--render", type=Path, help="only re-render the report from this results.json")
    args = parser.parse_args()
    if args.render:
        write_report(json.loads(args.render.read_text()), args.out or args.render.parent)
        return 0
    if args.measure:
        cell = json.loads(args.measure)
        print(json.dumps(measure_recbole(cell) if cell.get("recbole") else measure_cell(cell)))
        return 0

    baseline = git("rev-parse", "--short", args.baseline)
    current = git("rev-parse", "--short", "HEAD") + (
        "+dirty" if git("status", "--porcelain", "--", "harness", "models") else ""
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="harness-baseline-") as folder:
        worktree = Path(folder) / "checkout"
        git("worktree", "add", "--detach", str(worktree), baseline)
        try:
            for cell in cells(
                list(filter(None, args.models.split(","))), [int(h) for h in args.hidden.split(",")], args
            ):
                results = {"baseline": run_cell(worktree, cell), "current": run_cell(ROOT, cell)}
                rows.append(
                    {
                        **cell,
                        **{
                            f"{version}_{key}": value
                            for version, result in results.items()
                            for key, value in result.items()
                        },
                    }
                )
                print(
                    f"{cell['model']:>9} h{cell['hidden']:<3} {cell['protocol']:<13} epoch "
                    f"{rows[-1]['baseline_epoch_s']:7.1f} s -> {rows[-1]['current_epoch_s']:7.1f} s   eval "
                    f"{rows[-1]['baseline_eval_s']:5.2f} s -> {rows[-1]['current_eval_s']:5.2f} s",
                    flush=True,
                )
        finally:
            git("worktree", "remove", "--force", str(worktree))
    recbole = None
    if args.recbole:
        cell = {
            "dataset": args.dataset,
            "threads": args.threads,
            "batches": args.batches,
            "repeats": args.repeats,
            "recbole": str(Path(args.recbole).resolve()),
        }
        with tempfile.TemporaryDirectory(prefix="recbole-run-") as scratch:  # RecBole writes saved/ there
            recbole = run_cell(ROOT, cell, cwd=Path(scratch))
        print(f"RecBole SASRec h64 prefix: epoch {recbole['epoch_s']:.1f} s, eval {recbole['eval_s']:.2f} s")
    summary = {
        "machine": machine(),
        "baseline": baseline,
        "current": current,
        "threads": args.threads,
        "batches": args.batches,
        "repeats": args.repeats,
        "batching": args.batching,
        "heads": args.heads,
        "dataset": args.dataset,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "recbole": recbole,
    }
    if args.out:
        write_report(summary, args.out)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
