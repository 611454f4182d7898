"""A live view of a running study, read from the Optuna storage (so it also shows the trials of
workers in other processes and on other machines): per (model, dataset) the trials done, running,
pruned, failed and waiting, the best objective value so far and an ETA.

On a terminal it is a rich Live table refreshed every couple of seconds; otherwise (logs, CI) one
line is printed whenever a cell's counts change.
"""

from __future__ import annotations

import math
import threading
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from harness.studies import accounting as acc
from harness.studies.context import StudyContext


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def snapshot(ctx: StudyContext, workers: int = 1) -> list[dict]:
    from optuna.trial import TrialState

    from harness.studies.finals import pareto_front

    rows = []
    directions = ctx.study.directions()
    for cell in ctx.study.cells:
        if cell.n_trials == 0:
            continue
        trials = ctx.trials(cell)
        retried = acc.retried_numbers(trials)
        count = {s: 0 for s in ("COMPLETE", "RUNNING", "PRUNED", "FAIL", "WAITING")}
        durations = []
        for t in trials:
            if t.state == TrialState.FAIL and t.number in retried:
                continue  # replaced by its retry
            count[t.state.name] = count.get(t.state.name, 0) + 1
            if t.state.is_finished() and t.datetime_start and t.datetime_complete:
                durations.append((t.datetime_complete - t.datetime_start).total_seconds())
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete and ctx.study.multi_objective:
            best = f"front {len(pareto_front(complete, directions))}"
        elif complete:
            pick = max if directions[0] == "maximize" else min
            best = f"{pick(t.values[0] for t in complete):.4f}"
        else:
            best = "-"
        finished = count["COMPLETE"] + count["PRUNED"] + count["FAIL"]
        if ctx.study.sampler_type == "grid" or ctx.spec.timeout is None:
            budget = cell.n_trials
            remaining = max(0, budget - finished)
            mean = sum(durations) / len(durations) if durations else math.nan
            eta = remaining * mean / max(1, workers) if remaining else 0.0
        else:
            used = acc.seconds_used(trials)
            eta = max(0.0, ctx.spec.timeout - used) / max(1, workers)
            budget = cell.n_trials if cell.n_trials < 10**9 else None
        rows.append(
            {
                "cell": cell.label,
                "done": count["COMPLETE"],
                "running": count["RUNNING"],
                "pruned": count["PRUNED"],
                "failed": count["FAIL"],
                "waiting": count["WAITING"],
                "budget": budget,
                "best": best,
                "eta": eta,
                "finished": finished,
            }
        )
    return rows


def render(ctx: StudyContext, rows: list[dict], started: float) -> Table:
    objective = ctx.study.objectives[0]
    table = Table(
        title=f"study {ctx.study.name}: {_fmt_seconds(time.time() - started)} elapsed, {objective.label()}",
        title_justify="left",
    )
    for column in ("model/dataset", "done", "running", "pruned", "failed", "budget", "best", "ETA"):
        table.add_column(column, justify="left" if column == "model/dataset" else "right")
    total_eta = 0.0
    for row in rows:
        total_eta += row["eta"] if math.isfinite(row["eta"]) else 0.0
        table.add_row(
            row["cell"],
            str(row["done"]),
            str(row["running"]),
            str(row["pruned"]),
            str(row["failed"]),
            str(row["budget"] or "time"),
            row["best"],
            _fmt_seconds(row["eta"]),
        )
    table.caption = f"ETA for the search about {_fmt_seconds(total_eta)} (then the final seed runs)"
    return table


class LiveView:
    def __init__(
        self,
        ctx: StudyContext,
        console: Console | None = None,
        workers: int = 1,
        interval: float = 2.0,
        enabled: bool = True,
    ):
        self.ctx, self.workers, self.interval, self.enabled = ctx, workers, interval, enabled
        self.console = console or Console()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="harness-live", daemon=True)
        self._live: Live | None = None
        self._last: dict[str, tuple] = {}

    def __enter__(self):
        if not self.enabled:
            return self
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._tick()
        if self._live:
            self._live.__exit__(*exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except Exception:  # a view never breaks the study
                pass

    def _tick(self) -> None:
        rows = snapshot(self.ctx, self.workers)
        if self._live:
            self._live.update(render(self.ctx, rows, self.started))
            return
        for row in rows:
            key = (row["done"], row["running"], row["pruned"], row["failed"])
            if self._last.get(row["cell"]) != key:
                self._last[row["cell"]] = key
                budget = row["budget"] or "time"
                self.console.print(
                    f"[{row['cell']}] done {row['done']}/{budget}, running {row['running']}, "
                    f"pruned {row['pruned']}, failed {row['failed']}, best {row['best']}, "
                    f"ETA {_fmt_seconds(row['eta'])}",
                    highlight=False,
                    markup=False,
                )
