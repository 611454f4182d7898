"""Copy studies out of a tracking store into a small, self-contained one that can be committed.

A report is regenerated from its store alone, so committed evidence is a store: `<out>/mlflow.db`
(SQLite) with the report's artifacts (per-user test ranks) under `<out>/mlartifacts/`. Every run of
the chosen experiments is copied with its status, start/end times, params, tags, full metric
histories and per-user ranks; checkpoints and other artifacts stay behind. The source run id is kept
in the tag `harness.source_run_id` and parent links are rewritten to the copies.

The export is rebuilt from scratch each time (in a temporary folder, swapped in at the end), so a
failed export never leaves a half-written store where a good one was. The artifact paths recorded in
the database are absolute; `Store` finds them beside the database when the folder has moved (a fresh
clone elsewhere).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from harness.report.store import Store, select_experiments
from harness.tracking import PER_USER_ARTIFACT

SOURCE_RUN_TAG = "harness.source_run_id"
PARENT_TAG = "mlflow.parentRunId"


def export_studies(source_uri: str | None, studies: list[str], out: Path) -> dict[str, int]:
    """Copy `studies` (experiment names) from `source_uri` into a fresh store at `out`; returns the
    number of runs copied per experiment."""
    from mlflow.tracking import MlflowClient

    source = Store(source_uri)
    experiments = select_experiments(source, studies)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    counts: dict[str, int] = {}
    try:
        final_root = out.resolve()
        target = MlflowClient(f"sqlite:///{staging / 'mlflow.db'}")
        for name, experiment_id in sorted(experiments.items()):
            # recorded where the store will live once swapped in, not in the staging folder
            new_experiment = target.create_experiment(
                name, artifact_location=(final_root / "mlartifacts" / name).as_uri())
            runs = source.runs({name: experiment_id})
            id_map: dict[str, str] = {}
            for run in runs:  # start-time order, so parents (studies) come before their children
                id_map[run.run_id] = _copy_run(source, target, new_experiment, run, id_map,
                                               staging / "mlartifacts" / name)
            counts[name] = len(runs)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return counts


def _copy_run(source: Store, target, experiment_id: str, run, id_map: dict[str, str], artifacts: Path) -> str:
    from mlflow.entities import Metric, Param, RunTag

    source_client = source.client
    original = source_client.get_run(run.run_id)
    tags = {k: v for k, v in original.data.tags.items() if k != PARENT_TAG}
    tags[SOURCE_RUN_TAG] = run.run_id
    parent = original.data.tags.get(PARENT_TAG)
    if parent in id_map:
        tags[PARENT_TAG] = id_map[parent]
    created = target.create_run(experiment_id, start_time=original.info.start_time,
                                run_name=original.info.run_name)
    run_id = created.info.run_id
    params = [Param(k, v) for k, v in sorted(original.data.params.items())]
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in sorted(original.data.metrics)
               for m in source_client.get_metric_history(run.run_id, key)]
    tag_list = [RunTag(k, v) for k, v in sorted(tags.items())]
    for begin in range(0, max(len(params), len(metrics), len(tag_list)), 100):
        target.log_batch(run_id, metrics=metrics[begin:begin + 100], params=params[begin:begin + 100],
                         tags=tag_list[begin:begin + 100])
    ranks = source.per_user_file(run)
    if ranks is not None:
        # written straight into the store's artifact folder (the URI MLflow holds points at `out`)
        destination = artifacts / run_id / "artifacts" / PER_USER_ARTIFACT
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ranks, destination)
    if original.info.status != "RUNNING":
        target.set_terminated(run_id, status=original.info.status, end_time=original.info.end_time)
    return run_id

