"""The final stage: select the best configuration per (dataset, model, select_per value) from
COMPLETE trials' validation-only objective values, retrain it with each final seed, test once.

- Selection reads `trial.values` (validation metrics, throughput, memory) and nothing else; trials
  never compute test metrics. Ties go to the lower trial number. With several objectives,
  `final.select: best` takes the best on the first objective and `pareto` every trial on the
  group's Pareto front.
- A study with n_trials 0 has no search: every configuration of its (discrete) space is final.
- A final run is identified by `harness.final_key` (a hash of its full configuration, seed
  included). Runs already FINISHED in MLflow are not redone; a killed one resumes from its
  checkpoint (results/studies/<name>/checkpoints/final/, mirrored into the MLflow run's artifacts
  on a tracking server: harness/studies/shared.py) and reopens its MLflow run.
- Workers share the final runs by claiming them (harness/studies/claims.py): a worker takes the
  next run in order that is neither finished nor held by another live process. With a storage that
  several hosts share, a worker also waits for the runs others hold, and takes over the run of a
  worker whose claim expired.
- `final.reuse_trial: true` lets the seed equal to the trial's own seed reuse the trial's
  training (its kept checkpoint holds the best-validation weights): identical configuration,
  identical seed, so the test evaluation is the only work left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.config import identity_key
from harness.data.catalogue import shown_name
from harness.pareto import non_dominated
from harness.store import contract as tc
from harness.store.contract import FINAL_KEY
from harness.studies import accounting as acc
from harness.studies import shared
from harness.studies.context import StudyContext, retrying
from harness.studies.resolved import StudyCell


@dataclasses.dataclass
class Selected:
    cell: StudyCell
    select: str
    trial: int | None  # None: a configuration of a study without search
    params: dict[str, Any]
    values: list[float] | None
    config: Any  # TrainConfig at the trials' seed
    pareto: bool = False


@dataclasses.dataclass
class Job:
    selected: Selected
    seed: int
    config: Any

    @property
    def key(self) -> str:
        return final_key(self.config)

    @property
    def configuration(self) -> str:
        """The run's name without its seed: what its seeds have in common."""
        cell = self.selected.cell
        return f"{cell.name}-{shown_name(cell.dataset)}-{self.selected.select}"

    @property
    def run_name(self) -> str:
        return f"{self.configuration}-s{self.seed}"

    @property
    def round(self) -> int:
        """0 for its configuration's first seed, 1 for the second, ..."""
        return self.selected.cell.seeds.index(self.seed)


@dataclasses.dataclass
class Queued:
    """A final job in a queue of several studies' jobs, with its place in its own study's order."""

    ctx: StudyContext
    job: Job
    number: int  # from 1
    of: int


def final_key(config) -> str:
    return identity_key(config)


def pareto_front(trials, directions: list[str]) -> list:
    """The trials no other trial dominates on their objective values."""
    if not trials:
        return []
    return [t for t, kept in zip(trials, non_dominated([t.values for t in trials], directions)) if kept]


def best_trial(trials, direction: str):
    sign = 1 if direction == "maximize" else -1
    return min(trials, key=lambda t: (-sign * t.values[0], t.number))


def select(ctx: StudyContext) -> tuple[list[Selected], list[tuple[StudyCell, str]]]:
    """Selected configurations, and the (cell, group) pairs that have no completed trial."""
    from optuna.trial import TrialState

    chosen: list[Selected] = []
    missing: list[tuple[StudyCell, str]] = []
    directions = ctx.study.directions()
    for cell in ctx.study.cells:
        if cell.n_trials == 0:
            from harness.studies import space as sp

            for point in sp.grid(cell.space):
                config, _ = cell.resolve(point)
                label = (
                    cell.select_label(config)
                    if ctx.study.select_per
                    else (",".join(f"{k}={v}" for k, v in point.items()) or "all")
                )
                chosen.append(Selected(cell, label, None, point, None, config))
            continue
        groups: dict[str, list] = defaultdict(list)
        for trial in ctx.trials(cell):
            group = trial.user_attrs.get(tc.SELECT)
            if group is None:
                continue
            groups[group]
            if trial.state == TrialState.COMPLETE:
                groups[group].append(trial)
        for group in sorted(groups, key=_group_order):
            trials = groups[group]
            if not trials:
                missing.append((cell, group))
                continue
            front = pareto_front(trials, directions) if ctx.study.multi_objective else []
            picked = front if ctx.spec.final.select == "pareto" else [best_trial(trials, directions[0])]
            for trial in sorted(picked, key=lambda t: t.number):
                config, _ = cell.resolve(trial.params)
                chosen.append(
                    Selected(
                        cell, group, trial.number, dict(trial.params), list(trial.values), config, pareto=trial in front
                    )
                )
    return chosen, missing


def _group_order(label: str):
    """hidden_size=8 before hidden_size=16: numeric parts compare as numbers."""
    parts = []
    for item in label.split(","):
        key, _, value = item.partition("=")
        try:
            parts.append((key, 0, float(value), ""))
        except ValueError:
            parts.append((key, 1, 0.0, value))
    return parts


def jobs_for(ctx: StudyContext, chosen: list[Selected]) -> list[Job]:
    """Seed-major order: the first seed of every selected configuration, then every second seed, ...
    so a long study stopped part-way already has one result per configuration (in the study file's
    model order) before it has three of any."""
    jobs, seen = [], set()
    rounds = max((len(item.cell.seeds) for item in chosen), default=0)
    for round_index in range(rounds):
        for item in chosen:
            if round_index >= len(item.cell.seeds):
                continue
            seed = item.cell.seeds[round_index]
            job = Job(item, seed, item.config.model_copy(update={"seed": seed}))
            if job.key not in seen:
                seen.add(job.key)
                jobs.append(job)
    return jobs


def final_runs(ctx: StudyContext) -> list:
    return search_final_runs(ctx.tracker.client, ctx.tracker.experiment_id, ctx.study.name)


def search_final_runs(client, experiment_id: str, study_name: str) -> list:
    return retrying(
        client.search_runs,
        [experiment_id],
        filter_string=f"tags.`{tc.KIND}` = '{tc.KIND_FINAL}' and tags.`{tc.STUDY}` = '{study_name}'",
        max_results=50000,
    )


def finished_keys(ctx: StudyContext) -> set[str]:
    return {r.data.tags.get(FINAL_KEY) for r in final_runs(ctx) if r.info.status == "FINISHED"}


def resumable_runs(ctx: StudyContext) -> dict[str, int]:
    """MLflow run id -> last checkpointed epoch, for the final runs a rerun would resume (here, or
    from the server's copy of their checkpoint: -1 when its epoch is not read)."""
    from harness import checkpoints

    found = {}
    if shared.is_remote(ctx.tracking_uri):
        for run in final_runs(ctx):
            if run.info.status != "FINISHED" and shared.has_checkpoint(ctx.tracker.client, run.info.run_id):
                found[run.info.run_id] = -1
    if ctx.final_checkpoints.is_dir():
        for path in ctx.final_checkpoints.glob("*.pt"):
            try:
                state = checkpoints.load(path)
            except (checkpoints.CheckpointCorrupt, checkpoints.UnsafeCheckpointError):
                continue  # not resumable; the run's own start reports it (harness/train.py)
            if state.get("run_id"):
                found[state["run_id"]] = int(state.get("epoch", 0))
    return found


def cleanup_orphans(ctx: StudyContext) -> int:
    """After the search: MLflow trial runs still RUNNING belong to dead processes (Optuna has no
    running trial left); final runs still RUNNING without a checkpoint to resume, and held by no
    live process, are dead too."""
    client = ctx.tracker.client
    resumable = resumable_runs(ctx)
    runs = retrying(
        client.search_runs,
        [ctx.tracker.experiment_id],
        filter_string=f"tags.`{tc.STUDY}` = '{ctx.study.name}' and attributes.status = 'RUNNING'",
        max_results=50000,
    )
    count = 0
    for run in runs:
        kind = run.data.tags.get(tc.KIND)
        if kind == tc.KIND_FINAL and ctx.claims.held_elsewhere(run.data.tags.get(FINAL_KEY)):
            continue
        if kind == tc.KIND_TRIAL or (kind == tc.KIND_FINAL and run.info.run_id not in resumable):
            ctx.tracker.set_tags(run.info.run_id, {tc.FAILURE_TAG: "interrupted: its process stopped"})
            ctx.tracker.end_run(run.info.run_id, "KILLED")
            count += 1
    return count


def queue(studies: list[tuple[StudyContext, list[Job]]]) -> list[Queued]:
    """Several studies' final jobs as one queue, in rounds: the first seed of every configuration of
    every study (in the order the studies were given), then every second seed, ... so a queue of long
    studies stopped part-way has one result of each configuration of each study before it has a
    second of any (jobs_for's order, extended across studies)."""
    queued = [Queued(ctx, job, i + 1, len(jobs)) for ctx, jobs in studies for i, job in enumerate(jobs)]
    return sorted(queued, key=lambda q: q.job.round)  # stable: study order, then jobs_for's, per round


def run_queue(queued: list[Queued], progress: bool = False, log=print, log_to=None) -> int:
    """Run, in order, every final job that is not FINISHED in MLflow and that no other process holds;
    returns how many this process ran. With claims that hosts share (Leases), keep going until every
    job is finished: a run held elsewhere may be left by a dead worker, to be taken over here.
    `log_to(ctx)`, when given, is a context manager that sends output to that study's log while
    one of its jobs runs."""
    from harness.studies.claims import Leases
    from harness.train import RunTakenOver

    ran = 0
    waits = any(isinstance(q.ctx.claims, Leases) for q in queued)
    while True:
        studies = {id(q.ctx): q.ctx for q in queued}
        done = {key: finished_keys(ctx) for key, ctx in studies.items()}  # one store query per study
        held = 0
        for q in queued:
            ctx, job = q.ctx, q.job
            if job.key in done[id(ctx)]:
                continue
            with ctx.claims.take(job.key, job.run_name) as claim:
                if claim is None:  # only a shared claim may come back to this worker (a dead holder's)
                    held += isinstance(ctx.claims, Leases)
                    continue
                # re-read after claiming: another worker may have finished it since the last look
                if job.key in finished_keys(ctx):
                    continue
                with log_to(ctx) if log_to else contextlib.nullcontext():
                    try:
                        log(f"final {q.number}/{q.of}: {job.run_name}")
                        run_final(ctx, job, progress=progress, claim=claim)
                        claim.done()
                        ran += 1
                    except RunTakenOver as err:  # its claim lapsed: the run is another worker's now
                        log(f"{job.run_name} stopped here: {err}")
        if not (waits and held):
            return ran
        time.sleep(min(5.0, min(q.ctx.claims.interval for q in queued if isinstance(q.ctx.claims, Leases))))


@contextlib.contextmanager
def claim(directory: Path, key: str, wait: float = 0.0) -> Iterator[bool]:
    """The lock-file claim on the final run `key` (one host): yields whether this process holds it."""
    from harness.studies.claims import LockFiles

    with LockFiles(directory).take(key, wait=wait) as mine:
        yield mine is not None


def held_elsewhere(directory: Path, key: str | None) -> bool:
    """Whether a live process on this host holds the lock-file claim on the final run `key`."""
    from harness.studies.claims import LockFiles

    return LockFiles(directory).held_elsewhere(key)


def run_final(ctx: StudyContext, job: Job, progress: bool = False, claim=None):
    from harness.train import Trainer, run_key

    item, cell = job.selected, job.selected.cell
    data = ctx.data_for(job.config)
    name = f"{run_key(job.config, data.fingerprint)}.pt"
    checkpoint = shared.checkpoint_for(ctx, name)
    if isinstance(checkpoint, shared.ServerCheckpoint):  # the last epoch of a worker that died
        checkpoint.fetch(shared.unfinished_runs(ctx, job.key))
    target = checkpoint.path
    reused = None
    if ctx.keep_trial_checkpoints and item.trial is not None and not target.exists():
        source = ctx.trial_checkpoints(cell, item.trial) / name
        if source.is_file():
            reused = _adopt_checkpoint(source, target)
    tags = {
        tc.KIND: tc.KIND_FINAL,
        tc.STUDY: ctx.study.name,
        tc.SEED: str(job.seed),
        tc.SELECT: item.select,
        tc.TRIAL: str(item.trial) if item.trial is not None else "none",
        tc.OPTUNA_STUDY: cell.optuna_name,
        tc.DATASET: cell.dataset,
        tc.MODEL: cell.name,
        FINAL_KEY: job.key,
        tc.PARETO: str(item.pareto).lower(),
    }
    if reused:
        tags[tc.REUSED_TRIAL] = str(item.trial)
    trainer = Trainer(
        job.config,
        data=data,
        tracker=ctx.tracker,
        checkpoint=checkpoint,
        still_owner=claim.check if claim is not None else None,
        parent_run_id=ctx.parent_run_id,
        run_name=job.run_name,
        extra_tags=tags,
        progress=progress,
    )
    result = trainer.fit(evaluate_test=True)
    if result.run_id:
        extra = {tc.selected_objective_key(i): v for i, v in enumerate(item.values or [])}
        if reused:  # the per-epoch curve of the reused training, for completeness
            for row in result.history:
                ctx.tracker.log_metrics(
                    result.run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
                )
        ctx.tracker.log_metrics(result.run_id, extra)
    return result


def _adopt_checkpoint(source, target) -> bool:
    """Copy a finished trial's checkpoint as a final run's, without the trial's MLflow run. A
    corrupt one is not adopted (the final run trains); one that asks to run code stops the study."""
    from harness import checkpoints

    trial = checkpoints.Checkpoint(source)
    try:
        if not trial.read().get("finished"):
            return False
        trial.rewrite(target, run_id=None)
    except checkpoints.CheckpointCorrupt as err:
        warn(f"warning: trial checkpoint {err.path} is {err.reason}; the final run trains instead")
        return False
    return True


def drop_trial_checkpoints(ctx: StudyContext, keep: set[tuple[str, int]] | None = None) -> None:
    import shutil

    base = ctx.root / "checkpoints" / "trials"
    if not base.is_dir():
        return
    for cell_dir in base.iterdir():
        for trial_dir in cell_dir.glob("t*"):
            if keep and (cell_dir.name, int(trial_dir.name[1:])) in keep:
                continue
            shutil.rmtree(trial_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- summary
def summary_rows(ctx: StudyContext, chosen: list[Selected], missing) -> list[dict]:
    """Per selected configuration: validation objective(s) of its trial and test metrics over
    the final seeds, read back from MLflow."""
    from harness.metrics import metric_key

    by_key: dict[str, Any] = {}
    for run in final_runs(ctx):
        if run.info.status == "FINISHED":
            by_key[run.data.tags.get(FINAL_KEY)] = run
    jobs = jobs_for(ctx, chosen)
    grouped: dict[int, list] = defaultdict(list)
    for job in jobs:
        if job.key in by_key:
            grouped[id(job.selected)].append(by_key[job.key])
    test_key = metric_key("ndcg", 10, "test")
    valid_key = metric_key("ndcg", 10, "valid")
    rows = []
    for item in chosen:
        runs = grouped.get(id(item), [])
        tests = [r.data.metrics[test_key] for r in runs if test_key in r.data.metrics]
        valids = [r.data.metrics.get(tc.BEST_PREFIX + valid_key) for r in runs]
        valids = [v for v in valids if v is not None]
        rows.append(
            {
                "dataset": item.cell.dataset,
                "model": item.cell.name,
                "select": item.select,
                "trial": item.trial,
                "params": item.params,
                "objectives": item.values,
                "final_valid_ndcg_at_10": statistics.fmean(valids) if valids else math.nan,
                "test_ndcg_at_10_mean": statistics.fmean(tests) if tests else math.nan,
                "test_ndcg_at_10_sd": statistics.stdev(tests) if len(tests) > 1 else math.nan,
                "seeds_done": len(tests),
                "seeds": len(item.cell.seeds),
                "pareto": item.pareto,
            }
        )
    for cell, group in missing:
        rows.append(
            {
                "dataset": cell.dataset,
                "model": cell.name,
                "select": group,
                "trial": None,
                "params": {},
                "objectives": None,
                "final_valid_ndcg_at_10": math.nan,
                "test_ndcg_at_10_mean": math.nan,
                "test_ndcg_at_10_sd": math.nan,
                "seeds_done": 0,
                "seeds": len(cell.seeds),
                "pareto": False,
                "note": "no completed trial",
            }
        )
    return rows


def trial_counts(ctx: StudyContext) -> dict[str, dict[str, int]]:
    out = {}
    for cell in ctx.study.cells:
        trials = ctx.trials(cell)
        counts: dict[str, int] = defaultdict(int)
        for t in trials:
            counts[t.state.name] += 1
        counts["retried"] = len(acc.retried_numbers(trials))
        out[cell.label] = dict(counts)
    return out


def warn(message: str) -> None:
    print(message, file=sys.stderr)
