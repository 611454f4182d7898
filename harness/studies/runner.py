"""Running a study: `run` (search with N local workers, then final seed runs, then a summary) and
`worker` (join a study's search from any process or machine). Several studies given to `run` search
in turn, then share one pool of workers for their final runs.

Layout: one Optuna study per (dataset, model), named `<study>/<dataset>/<model>`, all in one
storage; one MLflow experiment named after the study with a parent run (harness.kind=study), a
nested run per trial (harness.kind=trial) and per final seed run (harness.kind=final).

Resuming: rerunning the same command continues. Finished trials are kept; trials left RUNNING by
a dead process are failed with the reason and retried (harness/studies/accounting.py); final runs
already FINISHED in MLflow are skipped and a killed one resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.store import contract as tc
from harness.studies import finals as fin
from harness.studies import shared
from harness.studies.context import StudyContext, quiet_optuna
from harness.studies.live import LiveView
from harness.studies.resolved import Study
from harness.studies.search import search, wait_until_searched
from harness.studies.space import check_points


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def worker_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


# ---------------------------------------------------------------------------- run
@dataclasses.dataclass
class Prepared:
    """A study after its search: the final runs it asks for and when it began."""

    ctx: StudyContext
    chosen: list
    missing: list
    jobs: list
    todo: list
    began: float


def run_studies(
    studies: list[Study],
    storage: str | None = None,
    workers: int | None = None,
    tracking_uri: str | None = None,
    console: Console | None = None,
    live: bool = True,
) -> int:
    """Each study's search in turn, then the final runs of all of them as one pool: a worker that
    finds nothing left to claim in one study goes on to the next, so a queue of long studies keeps
    every worker busy to the end. Returns 1 when a final run is missing, else 0."""
    console = console or Console()
    quiet_optuna()
    contexts = [StudyContext(study, storage, tracking_uri, worker_index=0) for study in studies]
    for ctx in contexts:  # every dataset of every study readable, every store shared, before any work
        preload(ctx)
        shared.preflight(ctx)
    prepared = [_search_stage(ctx, workers or ctx.spec.workers, console, live) for ctx in contexts]

    todo = sum(len(p.todo) for p in prepared)
    pool = min(workers or max(ctx.spec.workers for ctx in contexts), todo)
    final_began = time.time()
    if pool == 1:
        fin.run_queue(fin.queue([(p.ctx, p.jobs) for p in prepared]), log=lambda m: console.print(m, highlight=False))
    elif todo:
        _spawn_and_wait(contexts, pool, "final", console, storage, tracking_uri)
    console.print(f"final stage finished in {time.time() - final_began:.0f} s", highlight=False)
    return max(_conclude(p, console) for p in prepared)


def _search_stage(ctx: StudyContext, workers: int, console: Console, live: bool) -> Prepared:
    """Set the study up, run its search (if any) and list its final runs."""
    study = ctx.study
    ctx.setup()
    parent = ctx.parent_run_id
    ctx.tracker.reopen(parent)
    ctx.write_ui_view()
    console.print(
        f"study [bold]{study.name}[/]: {len(study.cells)} (dataset, model) cells, "
        f"storage {ctx.storage.describe()}, MLflow experiment {study.name!r} "
        f"(parent run {parent}), {workers} worker(s)",
        highlight=False,
    )
    began = time.time()
    if study.search:
        with LiveView(ctx, console, workers=workers, enabled=live):
            if workers == 1:
                search(ctx)
            else:
                _spawn_and_wait([ctx], workers, "search", console, ctx.storage.url, ctx.tracking_uri)

            def waiting(n: int) -> None:
                console.print(f"waiting for {n} trial(s) of other workers ...", highlight=False)

            wait_until_searched(ctx, on_wait=waiting, poll=3.0)
        console.print(f"search finished in {time.time() - began:.0f} s", highlight=False)

    chosen, missing = fin.select(ctx)
    jobs = fin.jobs_for(ctx, chosen)
    cleaned = fin.cleanup_orphans(ctx)
    if cleaned:
        console.print(f"marked {cleaned} MLflow run(s) of dead processes as KILLED", highlight=False)
    done = fin.finished_keys(ctx)
    todo = [j for j in jobs if j.key not in done]
    console.print(
        f"final stage of {study.name}: {len(chosen)} selected configuration(s), {len(jobs)} final "
        f"run(s), {len(jobs) - len(todo)} already done",
        highlight=False,
    )
    return Prepared(ctx, chosen, missing, jobs, todo, began)


def _conclude(prepared: Prepared, console: Console) -> int:
    """Summary table and the parent run's record; 1 when a final run is missing."""
    ctx = prepared.ctx
    if ctx.keep_trial_checkpoints:
        fin.drop_trial_checkpoints(ctx)
    rows = fin.summary_rows(ctx, prepared.chosen, prepared.missing)
    counts = fin.trial_counts(ctx)
    _print_summary(console, ctx, rows, counts)
    _log_summary(ctx, ctx.parent_run_id, prepared.chosen, rows, counts, time.time() - prepared.began)
    ctx.write_ui_view()  # its columns: the metrics the finals now have
    incomplete = [r for r in rows if r["seeds_done"] < r["seeds"] and r.get("note") is None]
    return 1 if incomplete else 0


def preload(ctx: StudyContext) -> None:
    """Load (and cache) every dataset before storage is touched: a missing or unreadable dataset
    stops the study here with one line instead of failing every trial."""
    for cell in ctx.study.cells:
        config, _ = cell.resolve(check_points(cell.space)[0])
        ctx.data_for(config)


def _spawn_and_wait(
    contexts: list[StudyContext],
    workers: int,
    stage: str,
    console: Console,
    storage: str | None,
    tracking_uri: str | None,
) -> None:
    """Start `workers` worker processes for a stage of these studies and wait for all of them.
    Each worker's output goes to <first study>/logs/<stage>-worker-<i>.log (a final-stage worker
    moves its output to each study's own log as it goes)."""
    from harness.errors import UserError

    logs = contexts[0].root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = worker_threads(workers)
    procs = []
    for index in range(workers):
        command = [
            sys.executable,
            "-m",
            "harness",
            "worker",
            *(str(Path(ctx.study.path).resolve()) for ctx in contexts),
            "--index",
            str(index),
            "--stage",
            stage,
            "--parent-pid",
            str(os.getpid()),
            "--threads",
            str(threads),
            "--quiet",
        ]
        if storage:
            command += ["--storage", storage]
        if tracking_uri:
            command += ["--tracking-uri", tracking_uri]
        log_path = logs / f"{stage}-worker-{index}.log"
        handle = open(log_path, "a")
        handle.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        handle.flush()
        procs.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT), log_path, handle))
    try:
        for proc, _, _ in procs:
            proc.wait()
    except BaseException:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        for _, _, handle in procs:
            handle.close()
    failed = [(p, path) for p, path, _ in procs if p.returncode != 0]
    if failed:
        proc, path = failed[0]
        tail = Path(path).read_text().strip().splitlines()[-1:] or ["(empty log)"]
        raise UserError(f"{len(failed)} {stage} worker(s) failed (exit {proc.returncode}); see {path}: {tail[0]}")


def _print_summary(console: Console, ctx: StudyContext, rows, counts) -> None:
    table = Table(
        title=f"study {ctx.study.name}: selected configurations (validation) and test over final seeds",
        title_justify="left",
    )
    objective = ctx.study.objectives[0]
    for column in ("dataset", "model", "select", "trial", objective.key, "test ndcg@10", "seeds"):
        table.add_column(column, justify="left" if column in ("dataset", "model", "select") else "right")
    for row in rows:
        value = row["objectives"][0] if row["objectives"] else math.nan
        test = row["test_ndcg_at_10_mean"]
        sd = row["test_ndcg_at_10_sd"]
        test_text = "-" if math.isnan(test) else (f"{test:.4f}" + (f" ± {sd:.4f}" if not math.isnan(sd) else ""))
        table.add_row(
            row["dataset"],
            row["model"],
            row["select"],
            "-" if row["trial"] is None else str(row["trial"]),
            "-" if math.isnan(value) else f"{value:.4f}",
            test_text,
            row.get("note") or f"{row['seeds_done']}/{row['seeds']}",
        )
    console.print(table)
    for label, count in counts.items():
        console.print(
            f"trials {label}: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(count.items())),
            highlight=False,
            markup=False,
        )


def _log_summary(ctx: StudyContext, parent: str, chosen, rows, counts, seconds: float) -> None:
    import csv
    import io

    selection = [
        {
            "dataset": c.cell.dataset,
            "model": c.cell.name,
            "select": c.select,
            "trial": c.trial,
            "params": c.params,
            "values": c.values,
            "pareto": c.pareto,
        }
        for c in chosen
    ]
    ctx.tracker.log_text(parent, json.dumps(selection, indent=2, default=str), "selection.json")
    ctx.tracker.log_text(parent, json.dumps(counts, indent=2), "trial_counts.json")
    buffer = io.StringIO()
    fields = [k for k in rows[0] if k not in ("params", "objectives")] if rows else []
    writer = csv.DictWriter(buffer, fieldnames=fields + ["params", "objectives"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {**row, "params": json.dumps(row["params"], default=str), "objectives": json.dumps(row["objectives"])}
        )
    ctx.tracker.log_text(parent, buffer.getvalue(), "summary.csv")
    ctx.tracker.log_metrics(parent, {"wall_seconds": seconds})
    ctx.tracker.set_tags(parent, {tc.STATE: tc.STATE_COMPLETE})
    ctx.tracker.end_run(parent, "FINISHED")


# ---------------------------------------------------------------------------- worker
def watch_parent(pid: int) -> None:
    """Exit when the process that started this worker is gone (killed -9, say)."""

    def loop():
        while True:
            time.sleep(2)
            if os.getppid() != pid:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(20)
                os._exit(3)

    threading.Thread(target=loop, name="harness-parent-watch", daemon=True).start()


def run_worker(
    study: Study,
    storage: str | None = None,
    tracking_uri: str | None = None,
    index: int | None = None,
    console: Console | None = None,
    live: bool = True,
) -> int:
    """Join a study's search: create/load its Optuna studies (race-free), then run trials until the
    budget is spent."""
    console = console or Console()
    quiet_optuna()
    ctx = StudyContext(study, storage, tracking_uri, worker_index=index)
    preload(ctx)
    shared.preflight(ctx)
    ctx.setup()
    ctx.parent_run_id  # noqa: B018 -- find or create the parent run before any trial

    def event(kind, cell, info):
        if kind == "end":
            values = info.get("values")
            shown = ", ".join(f"{v:.4f}" for v in values) if values else info.get("reason", "")
            console.print(
                f"[{cell.label}] trial {info['number']} {info['state'].lower()}: {shown}", highlight=False, markup=False
            )

    with LiveView(ctx, console, enabled=live):
        ran = search(ctx, on_event=event)
    console.print(
        f"worker {index if index is not None else os.getpid()}: ran {ran} trial(s); storage {ctx.storage.url}",
        highlight=False,
    )
    return 0


def run_final_worker(
    studies: list[Study], storage: str | None, tracking_uri: str | None, index: int, console: Console
) -> int:
    """The final stage of `run` in one worker process: the final runs nobody has finished or claimed,
    in the studies' common queue (fin.queue), each run's output appended to its study's worker log."""
    jobs = []
    for study in studies:
        ctx = StudyContext(study, storage, tracking_uri, worker_index=index)
        preload(ctx)
        shared.preflight(ctx)
        ctx.setup()
        chosen, _ = fin.select(ctx)
        jobs.append((ctx, fin.jobs_for(ctx, chosen)))

    def log_to(ctx: StudyContext):
        return output_to(ctx.root / "logs" / f"final-worker-{index}.log")

    ran = fin.run_queue(fin.queue(jobs), log=lambda m: console.print(m, highlight=False), log_to=log_to)
    console.print(f"worker {index}: {ran} final run(s) of {', '.join(s.name for s in studies)}", highlight=False)
    return 0


@contextlib.contextmanager
def output_to(path: Path):
    """Append this process's stdout and stderr (file descriptors, so library output too) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
