"""`run --dry-run`: the resolved plan of a study, without training or writing anything."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from harness.data.catalogue import shown_name, tie_order_note
from harness.metrics import metric_key, parse_metric
from harness.store import contract as tc
from harness.store.contract import ADDED_LATER
from harness.studies import space as sp
from harness.studies.estimate import (
    RunState,
    Timed,
    describe,
    describe_range,
    describe_timed,
    estimate_time_left,
    time_configuration,
)
from harness.studies.resolved import Study, StudyCell


def _dataset_line(name: str) -> str:
    from harness.data.catalogue import CATALOGUE, find_local

    if name in CATALOGUE:
        found = find_local(CATALOGUE[name])
        if found:
            return f"{name}: {found.path} ({found.origin})"
        return f"{name}: not local yet, will download from {CATALOGUE[name].url}"
    return f"{name}: file {name}"


def groups(cell: StudyCell) -> int:
    """How many select_per groups a cell's space can produce (each gets its own final runs)."""
    if cell.n_trials == 0:
        return sp.grid_size(cell.space)
    if not cell.study.select_per:
        return 1
    labels = set()
    for point in sp.check_points(cell.space):
        try:
            config, _ = cell.resolve(point)
        except Exception:
            continue
        labels.add(cell.select_label(config))
    searched = [k for k in cell.study.select_per if k in cell.searchable]
    if all(sp.is_discrete(cell.searchable[k]) for k in searched):
        return len(labels)
    return max(1, len(labels))


def cell_costs(study: Study, cell: StudyCell) -> dict[str, int]:
    """A cell's trials (0 when the search runs until a timeout), final runs, final runs that reuse
    their trial's training, and trainings in all."""
    trials = cell.n_trials if cell.n_trials < 10**9 else 0
    n_groups = groups(cell)
    finals = n_groups * len(cell.seeds)
    reused = 0
    if study.spec.final.reuse_trial and cell.n_trials > 0:
        reused = n_groups if int(cell.train.get("seed", 2020)) in cell.seeds else 0
    return {"trials": trials, "finals": finals, "reused": reused, "trainings": trials + finals - reused}


def costs(study: Study) -> dict[str, int]:
    total = {"trials": 0, "finals": 0, "reused": 0, "epochs": 0}
    for cell in study.cells:
        cost = cell_costs(study, cell)
        for key in ("trials", "finals", "reused"):
            total[key] += cost[key]
        total["epochs"] += cost["trainings"] * int(cell.train.get("epochs", 300))
    return total


def print_plan(study: Study, ctx, console: Console | None = None) -> None:
    console = console or Console()
    spec = study.spec
    console.print(f"[bold]study {study.name}[/]" + (f": {spec.description}" if spec.description else ""))
    if study.path:
        console.print(f"file: {study.path}")
    for dataset in spec.datasets:
        console.print(f"dataset {_dataset_line(dataset)}")
    console.print(
        f"storage: {ctx.storage.describe()}"
        + (" (exists; a run resumes it)" if ctx.storage.kind == "journal" and ctx.storage.exists() else "")
    )
    from harness.store.location import default_tracking_uri

    console.print(f"tracking: {ctx.tracking_uri or default_tracking_uri()} (experiment {study.name!r})")
    console.print(
        "objectives: "
        + ", ".join(o.label() for o in study.objectives)
        + (" (Pareto front)" if study.multi_objective else "")
    )
    budget = []
    if spec.n_trials is not None:
        budget.append(f"n_trials {spec.n_trials}")
    if spec.timeout:
        budget.append(f"timeout {spec.timeout:g} s of trial time")
    console.print(
        f"sampler: {study.sampler_type}; pruner: {study.pruner_type}; budget per "
        f"(dataset, model): {', '.join(budget) or 'the whole grid'}"
    )
    distinct = sorted({tuple(c.seeds) for c in study.cells})
    seeds = list(distinct[0]) if len(distinct) == 1 else "per model (below)"
    if not study.search:
        selection = "no search: every configuration of the space runs the final seeds"
    else:
        selection = (
            f"select per: {', '.join(spec.select_per) or '(one per model and dataset)'}; "
            f"final: {spec.final.select}"
            + (" (every trial on the Pareto front)" if spec.final.select == "pareto" else "")
        )
    console.print(
        f"{selection}; seeds {seeds}" + ("; the trial's own seed reuses its training" if spec.final.reuse_trial else "")
    )

    console.print("cells (one Optuna study each):")
    for cell in study.cells:
        trials = (
            "no search"
            if cell.n_trials == 0
            else (f"{cell.n_trials} trials" if cell.n_trials < 10**9 else "trials until timeout")
        )
        variant = f" ({cell.model})" if cell.name != cell.model else ""
        console.print(
            f"  [bold]{cell.name}[/]{variant} on {shown_name(cell.dataset)}: {trials}, finals {groups(cell)} "
            f"configuration(s) x {len(cell.seeds)} seed(s) {cell.seeds}",
            highlight=False,
        )
        training = ", ".join(f"{k} {v}" for k, v in cell.train.items()) or "defaults"
        console.print(f"    training: {training}", highlight=False)
        note = tie_order_note(cell.dataset, cell.train.get("tie_order", ADDED_LATER["tie_order"]))
        if note:
            console.print(f"    {note}", highlight=False)
        fixed = [f"{k}={v}" for k, v in cell.params.items()]
        fixed += [f"{k}={s.value}" for k, s in cell.space.items() if isinstance(s, sp.FixedParam)]
        if fixed:
            console.print(f"    fixed: {', '.join(fixed)}", highlight=False)
        searched = [f"{k} {s.describe()}" for k, s in cell.space.items() if not isinstance(s, sp.FixedParam)]
        if searched:
            console.print(f"    space: {'; '.join(searched)}", highlight=False)
    cost = costs(study)
    at_least = "at least " if spec.final.select == "pareto" else ""
    reuse = f" ({cost['reused']} reuse their trial's training)" if cost["reused"] else ""
    console.print(
        f"expected cost: {cost['trials']} trials + {at_least}{cost['finals']} final runs{reuse}; at most "
        f"{cost['trials'] + cost['finals'] - cost['reused']}{'+' if at_least else ''} trainings and {cost['epochs']} epochs "
        "(early stopping and pruning cut this)"
        + (f"; the search stops after {spec.timeout:g} s of trial time per (dataset, model)" if spec.timeout else "")
    )


def _stored_final_runs(client, study_name: str) -> list:
    """The study's final runs in MLflow, read without creating an experiment."""
    from harness.studies import finals as fin

    experiment = client.get_experiment_by_name(study_name)
    return [] if experiment is None else fin.search_final_runs(client, experiment.experiment_id, study_name)


def _epochs(client, run) -> tuple[list, list[float], float]:
    """A run's validation history on its own early-stopping metric, the seconds of each epoch
    (training plus validation) in epoch order, and when its last epoch time was logged (ms)."""
    metric = run.data.params.get("valid_metric", "ndcg@10")
    valid = client.get_metric_history(run.info.run_id, metric_key(*parse_metric(metric), split="valid"))
    spent: dict[int, float] = {}
    logged_at = 0.0
    for key in (tc.TRAIN_SECONDS, tc.VALID_SECONDS):
        # an epoch trained again after a kill (resumed from the checkpoint before it) is logged twice: its
        # last record counts
        last: dict[int, tuple[float, float]] = {}
        for m in client.get_metric_history(run.info.run_id, key):
            last[m.step] = max(last.get(m.step, (-1.0, 0.0)), (float(m.timestamp), m.value))
            logged_at = max(logged_at, float(m.timestamp))
        for step, (_, value) in last.items():
            spent[step] = spent.get(step, 0.0) + value
    return sorted(valid, key=lambda m: m.step), [spent[step] for step in sorted(spent)], logged_at


def _best(valid: list):
    return max(valid, key=lambda m: (m.value, -m.step)) if valid else None  # the first epoch reaching it


def _best_epoch(run, valid: list) -> str:
    """Best validation value of a run so far and its epoch."""
    best = _best(valid)
    if best is None:
        return "-"
    return f"{run.data.params.get('valid_metric', 'ndcg@10')} {best.value:.4f} (epoch {best.step} of {len(valid)})"


def _short_commit(commit: str) -> str:
    """The commit a run started under, shortened; '-dirty': with uncommitted changes."""
    return commit[:8] + ("-dirty" if commit.endswith("-dirty") else "")


def print_progress(study: Study, ctx, console: Console, workers: int | None = None, timing: bool = True) -> None:
    """What a rerun would find: each final run already stored (best validation value so far, test
    value, the checkpoint it resumes from) and, for a study without search, the runs not started and
    an estimate of the time they and the unfinished ones will take; for a study with a search, the
    range of time its whole plan takes. Epoch times the store does not have yet are measured by a
    timed step (harness.studies.estimate), unless `timing` is off."""
    from harness.store.location import default_tracking_uri
    from harness.store.reader import Store, StoreError
    from harness.studies import finals as fin

    workers = workers or ctx.spec.workers
    console.print(f"opening the tracking store {ctx.tracking_uri or default_tracking_uri()} ...", highlight=False)
    try:
        client = Store(ctx.tracking_uri).client  # read-only: a missing sqlite store stays missing
        runs = _stored_final_runs(client, study.name)
    except StoreError:
        client, runs = None, []
    if runs:
        console.print(f"reading the epochs of {len(runs)} stored final run(s) ...", highlight=False)
    epochs = {run.info.run_id: _epochs(client, run) for run in runs}
    if runs:
        resumable = fin.resumable_runs(ctx)
        table = Table(title="final runs so far", title_justify="left")
        for column in ("run", "status", "best validation so far", "test ndcg@10", "commit"):
            table.add_column(column, justify="left" if column == "run" else "right")
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            status = run.info.status.lower()
            if run.info.status == "RUNNING":  # or its process died and no rerun has marked it yet
                live = ctx.claims.held_elsewhere(run.data.tags.get(tc.FINAL_KEY))
                status = "running now" if live else "interrupted"
            if run.info.status != "FINISHED" and run.info.run_id in resumable:
                status += f" (checkpoint after epoch {resumable[run.info.run_id]})"
            test = run.data.metrics.get(metric_key("ndcg", 10, "test"))
            table.add_row(
                run.info.run_name,
                status,
                _best_epoch(run, epochs[run.info.run_id][0]),
                f"{test:.4f}" if test is not None else "-",
                _short_commit(run.data.tags.get(tc.GIT_COMMIT, "")),
            )
        console.print(table)
    else:
        console.print("final runs so far: none")
    if study.search:  # which configurations run is known only after the search: the whole plan's range
        if timing:
            _print_plan_range(study, ctx, console, workers)
        return
    chosen, _ = fin.select(ctx)
    jobs = fin.jobs_for(ctx, chosen)
    stored = {r.data.tags.get(tc.FINAL_KEY): r for r in sorted(runs, key=lambda r: r.info.start_time or 0)}
    waiting = [job.run_name for job in jobs if job.key not in stored]
    console.print(
        f"not started: {len(waiting)} final run(s)" + (f", in this order: {', '.join(waiting)}" if waiting else ""),
        highlight=False,
    )
    states = []
    for job in jobs:
        state = RunState(job.configuration, job.config.patience, job.config.epochs)
        run = stored.get(job.key)
        if run is not None:
            valid, state.epoch_seconds, state.measured_at = epochs[run.info.run_id]
            best = _best(valid)
            state.epochs, state.best_epoch = len(valid), best.step if best else 0
            state.finished = run.info.status == "FINISHED"
        states.append(state)
    estimate = estimate_time_left(states)
    if estimate.unmeasured and timing:
        timed = _time_unmeasured(ctx, jobs, states, set(estimate.unmeasured), console)
        if timed:
            console.print(describe_timed(timed), highlight=False)
            estimate = estimate_time_left(states)
    console.print(describe(estimate, workers), highlight=False)


def _timed_step(ctx, name: str, config, console: Console) -> Timed | None:
    """One epoch of `config` timed on this machine; None when its dataset is not local (a dry run
    downloads nothing) or the configuration cannot be built (the run itself will say why)."""
    from harness.data.catalogue import load_for
    from harness.errors import UserError

    console.print(f"timing a few training steps of {name} for the estimate ...", highlight=False)
    try:
        seconds, how = time_configuration(config, load_for(config, download=False))
    except (UserError, ValueError) as err:
        console.print(f"  no timing for {name}: {str(err).splitlines()[0]}", highlight=False)
        return None
    return Timed(name, seconds, how)


def _time_unmeasured(ctx, jobs, states: list[RunState], unmeasured: set[str], console: Console) -> list[Timed]:
    """Time one run of each configuration no stored epoch measures; its runs get that epoch time."""
    timed = []
    for configuration in sorted(unmeasured):
        job = next(job for job in jobs if job.configuration == configuration)
        step = _timed_step(ctx, configuration, job.config, console)
        if step is None:
            continue
        timed.append(step)
        for other, state in zip(jobs, states, strict=True):
            if other.configuration == configuration:
                state.epoch_seconds = [step.seconds]
    return timed


def _print_plan_range(study: Study, ctx, console: Console, workers: int) -> None:
    """A study with a search: each cell timed once at the last point of its space (the largest
    values, when the space lists them in increasing order) and its trainings counted from patience
    + 1 epochs up to their maximum."""
    timed, low, high, trainings = [], 0.0, 0.0, 0
    for cell in study.cells:
        try:
            config, _ = cell.resolve(sp.check_points(cell.space)[-1])
        except Exception:  # a point the space cannot build: the run reports it
            continue
        point = ", ".join(f"{k}={v}" for k, v in sp.check_points(cell.space)[-1].items())
        label = cell.label + (f" at {point}" if point else "")
        step = _timed_step(ctx, label, config, console)
        if step is None:
            continue
        timed.append(step)
        count = cell_costs(study, cell)["trainings"]
        trainings += count
        low += count * min(config.patience + 1, config.epochs) * step.seconds
        high += count * config.epochs * step.seconds
    if timed:
        console.print(describe_timed(timed), highlight=False)
        console.print(describe_range(low, high, trainings, workers), highlight=False)
