"""The search stage: a worker pulls trials from the cells' Optuna studies until every budget is
spent, trains each with evaluate_test=False and tells Optuna its validation-only objectives.

Failures never stop a study: NaN loss (FloatingPointError), out-of-memory, impossible shapes
(ConfigError) and any other exception mark the trial FAIL with the reason in the user attributes
`harness.failure` / `harness.failure_kind` and the MLflow tags `failure` / `harness.failure_kind`;
a pruned trial is PRUNED (MLflow status KILLED, tag harness.state=pruned).
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable

from harness.data.catalogue import shown_name
from harness.store import contract as tc
from harness.studies import accounting as acc
from harness.studies import objectives as obj
from harness.studies import space as sp
from harness.studies.context import RecordingTracker, StudyContext
from harness.studies.resolved import StudyCell

Event = Callable[[str, StudyCell, dict], None]


def classify(err: BaseException) -> str:
    """nan | oom | config | error."""
    import torch

    from harness.config import ConfigError
    from models.base import ModelConfigError

    text = str(err).lower()
    if isinstance(err, FloatingPointError):
        return "nan"
    if (
        isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError))
        or "out of memory" in text
        or "can't allocate memory" in text
    ):
        return "oom"
    if isinstance(err, (ConfigError, ModelConfigError)):
        return "config"
    if isinstance(err, (RuntimeError, ValueError)) and any(
        s in text for s in ("shape", "size mismatch", "must match the size", "dimension")
    ):
        return "config"
    return "error"


def run_trial(ctx: StudyContext, cell: StudyCell, trial, on_event: Event | None = None) -> str:
    """Train one trial and tell Optuna; returns its final state name."""
    import optuna
    from optuna.trial import TrialState

    from harness.train import Trainer, resolve_device

    study = ctx.optuna_study(cell)
    storage = study._storage
    acc.stamp(storage, trial._trial_id)
    retry_of = trial.user_attrs.get(tc.RETRY_OF)
    tags = {
        tc.KIND: tc.KIND_TRIAL,
        tc.STUDY: ctx.study.name,
        tc.TRIAL: str(trial.number),
        tc.OPTUNA_STUDY: cell.optuna_name,
        tc.DATASET: cell.dataset,
        tc.MODEL: cell.name,
    }
    if retry_of is not None:
        tags[tc.RETRY_OF] = str(retry_of)
    tracker = RecordingTracker(ctx.tracker, lambda run_id: trial.set_user_attr(tc.MLFLOW_RUN_ID, run_id))
    prune_key = ctx.study.objectives[0].key if ctx.study.pruner_type != "none" else None
    sampled: dict = {}
    measured: dict = {}
    memory_source = ""
    values: list[float] | None = None
    state, reason, kind = TrialState.COMPLETE, "", ""
    if on_event:
        on_event("start", cell, {"number": trial.number})

    def epoch_callback(epoch: int, row: dict) -> None:
        if prune_key and prune_key in row:
            trial.report(float(row[prune_key]), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({prune_key} {row[prune_key]:.4f})")

    with acc.Heartbeat(storage, trial._trial_id, acc.heartbeat_interval(ctx.stale_after)):
        try:
            sampled = {name: sp.suggest(trial, name, spec) for name, spec in cell.searchable.items()}
            config, derived = cell.resolve(sampled)
            select = cell.select_label(config)
            trial.set_user_attr(tc.SELECT, select)
            if derived:
                trial.set_user_attr(tc.DERIVED, derived)
            tags.update({tc.SELECT: select, tc.SEED: str(config.seed)})
            probe = obj.MemoryProbe(resolve_device(config.device))
            with probe:
                trainer = Trainer(
                    config,
                    data=ctx.data_for(config),
                    tracker=tracker,
                    checkpoint_dir=ctx.trial_checkpoints(cell, trial.number) if ctx.keep_trial_checkpoints else None,
                    parent_run_id=ctx.parent_run_id,
                    run_name=f"{cell.name}-{shown_name(cell.dataset)}-t{trial.number}",
                    extra_tags=tags,
                    progress=False,
                )
                result = trainer.fit(
                    epoch_callback=epoch_callback,
                    evaluate_test=False,
                    keep_checkpoint=ctx.keep_trial_checkpoints,
                )
            memory_source = probe.source
            measured = obj.measurements(result, trainer, probe)
            values = obj.values(ctx.study.objectives, measured)
            bad = [o.key for o, v in zip(ctx.study.objectives, values) if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"objective {bad[0]} is not finite")
        except optuna.TrialPruned as err:
            state, reason, kind = TrialState.PRUNED, str(err) or "pruned", "pruned"
        except KeyboardInterrupt:
            _interrupted(ctx, cell, trial, tracker)
            raise
        except Exception as err:  # recorded, never fatal to the study
            state, reason, kind = TrialState.FAIL, f"{type(err).__name__}: {err}"[:1000], classify(err)
            if kind == "oom":
                _free_cuda()
            if kind == "error":
                print(f"[{cell.label}] trial {trial.number} failed:\n{traceback.format_exc()}", file=sys.stderr)

    _record(ctx, cell, trial, tracker, tags, sampled, state, reason, kind, values, measured, memory_source)
    if on_event:
        on_event("end", cell, {"number": trial.number, "state": state.name, "values": values, "reason": reason})
    return state.name


def _record(ctx, cell, trial, tracker, tags, sampled, state, reason, kind, values, measured, memory_source):
    from optuna.trial import TrialState

    if measured:
        trial.set_user_attr(tc.MEASURED, {k: v for k, v in measured.items() if math.isfinite(v)})
    if memory_source:
        trial.set_user_attr(tc.MEMORY_SOURCE, memory_source)
    if reason:
        trial.set_user_attr(tc.FAILURE, reason)
        trial.set_user_attr(tc.FAILURE_KIND, kind)
    run_id = tracker.run_id
    try:
        if run_id is None:  # failed before the trainer opened a run: record it anyway
            run_id = tracker.start_run(
                f"{cell.name}-{shown_name(cell.dataset)}-t{trial.number}",
                {f"optuna.{k}": v for k, v in sampled.items()},
                tags,
                parent_run_id=ctx.parent_run_id,
            )
        else:
            tracker.log_params(run_id, {f"optuna.{k}": v for k, v in sampled.items()})
        state_tag = {TrialState.COMPLETE: tc.STATE_COMPLETE, TrialState.PRUNED: tc.STATE_PRUNED}.get(
            state, tc.STATE_FAILED
        )
        run_tags = {tc.STATE: state_tag}
        if memory_source:
            run_tags[tc.MEMORY_SOURCE] = memory_source
        if reason:
            run_tags.update({tc.FAILURE_TAG: reason[:500], tc.FAILURE_KIND: kind})
        tracker.set_tags(run_id, run_tags)
        if values is not None and state == TrialState.COMPLETE:
            metrics = {tc.objective_key(i): v for i, v in enumerate(values)}
            metrics.update({k: v for k, v in measured.items() if not k.startswith("valid_")})
            tracker.log_metrics(run_id, metrics)
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(state, "FAILED")
        tracker.end_run(run_id, status)
    except Exception as err:  # tracking trouble must not lose the Optuna result
        print(f"[{cell.label}] trial {trial.number}: MLflow logging failed: {err}", file=sys.stderr)
    study = ctx.optuna_study(cell)
    try:
        if state == TrialState.COMPLETE:
            study.tell(trial, values)
        else:
            study.tell(trial, state=state)
    except Exception as err:  # reaped as dead by another worker meanwhile: its retry will rerun it
        print(f"[{cell.label}] trial {trial.number}: could not record the result ({err})", file=sys.stderr)


def _interrupted(ctx, cell, trial, tracker) -> None:
    """Ctrl-C / SIGTERM: fail the trial with the reason and enqueue its retry right away."""
    from optuna.trial import TrialState

    study = ctx.optuna_study(cell)
    try:
        with ctx.storage.lock():
            trial.set_user_attr(tc.FAILURE, "interrupted: the worker was stopped")
            trial.set_user_attr(tc.FAILURE_KIND, "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(
                acc.trial_params(study._storage.get_trial(trial._trial_id)), user_attrs={tc.RETRY_OF: trial.number}
            )
        if tracker.run_id:
            tracker.set_tags(tracker.run_id, {tc.STATE: tc.STATE_FAILED, tc.FAILURE_TAG: "interrupted"})
    except Exception:  # the next run reaps it instead
        pass


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def search(ctx: StudyContext, on_event: Event | None = None, stop: Callable[[], bool] | None = None) -> int:
    """Run trials until no cell has budget left; returns how many this worker ran. Workers
    start on different cells (rotated by worker index) and then share every queue."""
    cells = list(ctx.study.cells)
    if ctx.worker_index:
        shift = ctx.worker_index % len(cells)
        cells = cells[shift:] + cells[:shift]
    ran = 0
    while not (stop and stop()):
        for cell in cells:
            trial = ctx.next_trial(cell)
            if trial is not None:
                run_trial(ctx, cell, trial, on_event)
                ran += 1
                break
        else:
            return ran
    return ran


def wait_until_searched(ctx: StudyContext, on_wait: Callable[[int], None] | None = None, poll: float = 2.0) -> None:
    """Block until no trial of the study is running or waiting anywhere (other workers, other
    machines), running retries of dead trials here; the final stage starts after this."""
    while True:
        search(ctx)
        running = 0
        for cell in ctx.study.cells:
            counts = ctx.search_pending(cell)
            running += counts["running"] + counts["waiting"]
        if running == 0:
            return
        if on_wait:
            on_wait(running)
        time.sleep(poll)
