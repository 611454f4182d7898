"""Copy studies between tracking stores: out into a small, self-contained store that can be
committed (`export`), and back from such a store into the local one (`import`).

A report is regenerated from its store alone, so committed evidence is a store: a folder in the text
format of harness.store.records (one record per run, per-user test ranks compressed beside it), which
git stores by the runs that changed. `import` and `report` also read the form exported before it,
`<out>/mlflow.db` (SQLite) with the ranks under `<out>/mlartifacts/`. Every run of the chosen
experiments is copied with its status, start/end times, params, tags, full metric histories and
per-user ranks; checkpoints and other artifacts stay behind unless the caller names a study's
checkpoint folder, whose unfinished runs' checkpoints are then carried (harness.store.checkpoints).
Parent links are rewritten to the copies.

A run keeps one identity through any number of copies: the tag SOURCE_RUN_ID names the
run id it was first recorded under, and a copy of a copy keeps it. `import` uses it to skip runs the
local store already has, so importing the same store twice, or two stores that share a study (the
low-dimension store holds paper_beauty's runs too), copies each run once.

The export is rebuilt from scratch each time (in a temporary folder, swapped in at the end), so a
failed export never leaves a half-written store where a good one was. In the older SQLite form the
artifact paths recorded in the database are absolute; `Store` finds them beside the database when
the folder has moved (a fresh clone elsewhere).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from harness.store import checkpoints as ck
from harness.store import records
from harness.store.contract import (
    FINAL_KEY,
    KIND_FINAL,
    KIND_TRAIN,
    PARENT_RUN_ID,
    PER_USER_ARTIFACT,
    SOURCE_RUN_ID,
)
from harness.store.reader import Run, Store, StoreError, select_experiments

# (target run id, source ranks file) -> None: puts a copied run's per-user ranks where its store keeps them
PlaceRanks = Callable[[str, Path], None]


@dataclasses.dataclass
class Copied:
    """One experiment's copy: source run id -> target run id for every run copied or already
    there, which source runs were copied (not found already there), and the checkpoints carried."""

    runs: dict[str, str] = dataclasses.field(default_factory=dict)
    copied: set[str] = dataclasses.field(default_factory=set)
    checkpoints: list[Path] = dataclasses.field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.runs) - len(self.copied)


def origin_of(run: Run) -> str:
    """The id the run was first recorded under, however many copies ago."""
    return run.tags.get(SOURCE_RUN_ID) or run.run_id


def export_studies(
    source_uri: str | None, studies: list[str], out: Path, checkpoints: Mapping[str, Path] | None = None
) -> dict[str, Copied]:
    """Write `studies` (experiment names) from `source_uri` as a fresh text-format store at `out`
    (harness.store.records), with the checkpoints of the exported runs found in
    `checkpoints[study]` (a study's checkpoint folder). Copied.runs maps each run to its origin."""
    source = Store(source_uri)
    experiments = select_experiments(source, studies)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    copies: dict[str, Copied] = {}
    try:
        records.write_experiments(staging, list(experiments))
        for name, experiment_id in sorted(experiments.items()):
            runs = source.runs({name: experiment_id})
            origins = {run.run_id: origin_of(run) for run in runs}
            for run in runs:
                _record_run(source, run, staging, name, origins)
            copies[name] = Copied(runs=origins, copied=set(origins))
            if checkpoints and name in checkpoints:
                carried = ck.carry(checkpoints[name], ck.in_store(staging, name), origins)
                copies[name].checkpoints = [ck.in_store(out, name) / path.name for path in carried]
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return copies


def _record_run(source: Store, run: Run, folder: Path, experiment: str, origins: dict[str, str]) -> None:
    client = source.client
    original = client.get_run(run.run_id)
    metrics = [
        (m.key, m.value, m.timestamp, m.step)
        for key in sorted(original.data.metrics)
        for m in client.get_metric_history(run.run_id, key)
    ]
    parent = original.data.tags.get(PARENT_RUN_ID)
    records.write_run(
        folder,
        experiment,
        origins[run.run_id],
        original.info,
        dict(original.data.params),
        dict(original.data.tags),
        metrics,
        origins.get(parent),
        source.per_user_file(run),
    )


def import_studies(
    store_dir: Path,
    studies: list[str],
    target_uri: str | None = None,
    checkpoint_dir: Callable[[str], Path] | None = None,
    without_ranks: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Copied]:
    """Copy `studies` (all when empty) from the exported store in `store_dir` into the tracking store
    at `target_uri` (default: the local one), skipping runs it already has: the same origin, or a
    final run of a configuration and seed (its FINAL_KEY) that has finished here. The checkpoints the
    store carries for the imported runs go to `checkpoint_dir(study)`, when given.

    A tested run whose per-user ranks the store lacks (a copy made without its mlartifacts/ or
    ranks/ folder) would arrive without the per-user statistics the report tests with: the import
    refuses before copying anything (StoreError), unless `without_ranks`."""
    from harness.store.writer import Tracker

    store_dir = Path(store_dir)
    database = store_dir / "mlflow.db"  # the form exported before the text format
    if records.is_records(store_dir):
        source = Store(str(store_dir), log=log)
    elif database.is_file():
        source = Store(f"sqlite:///{database.resolve()}")
    else:
        raise StoreError(f"no exported store at {store_dir} (expected {store_dir / records.EXPERIMENTS} or {database})")
    experiments = select_experiments(source, studies)
    runs_of = {name: source.runs({name: experiment_id}) for name, experiment_id in experiments.items()}
    if not without_ranks:
        _require_ranks(source, store_dir, [run for runs in runs_of.values() for run in runs])
    copies: dict[str, Copied] = {}
    for name, runs in sorted(runs_of.items()):
        if not runs and not studies:  # MLflow's empty "Default" experiment: nothing to bring
            continue
        tracker = Tracker(target_uri, name)  # creates the experiment with the local artifact root
        client = tracker.client
        present = Store(tracker.uri).runs({name: tracker.experiment_id})
        known = {origin_of(r): r.run_id for r in present}
        # a configuration and seed already finished here has its result: another copy would count twice
        known.update(
            {
                (KIND_FINAL, r.tags[FINAL_KEY]): r.run_id
                for r in present
                if r.kind == KIND_FINAL and r.status == "FINISHED" and FINAL_KEY in r.tags
            }
        )

        def place(run_id: str, ranks: Path, client=client) -> None:
            client.log_artifact(run_id, str(ranks), artifact_path=str(Path(PER_USER_ARTIFACT).parent))

        copies[name] = copy_runs(source, runs, client, tracker.experiment_id, place, known)
        if checkpoint_dir is not None:
            imported = {run: copies[name].runs[run] for run in copies[name].copied}
            if source.origins:  # a text-format store's checkpoints name their runs by origin
                imported = {origin: imported[run] for origin, run in source.origins.items() if run in imported}
            copies[name].checkpoints = ck.carry(ck.in_store(store_dir, name), checkpoint_dir(name), imported)
    return copies


def tested(run: Run) -> bool:
    """A run that was tested, and so wrote per-user ranks (harness/train.py logs both together)."""
    return run.kind in (KIND_FINAL, KIND_TRAIN) and any(key.startswith("test_") for key in run.metrics)


def _require_ranks(source: Store, store_dir: Path, runs: list[Run]) -> None:
    with_test = [run for run in runs if tested(run)]
    missing = [run for run in with_test if source.per_user_file(run) is None]
    if missing:
        where = store_dir / (records.RANKS if records.is_records(store_dir) else "mlartifacts")
        raise StoreError(
            f"{len(missing)} of the {len(with_test)} tested runs in {store_dir} have no per-user ranks "
            f"(nothing for them under {where}; was the store copied without it?): the report could not "
            "test them per user. Copy the whole store folder, or import with --without-ranks to accept that"
        )


def copy_runs(
    source: Store, runs: list[Run], target, experiment_id: str, place: PlaceRanks, known: dict | None = None
) -> Copied:
    """Copy `runs` (start-time order, so parents come before their children) into `target` (an
    MlflowClient); a run whose origin or final key is in `known` is mapped to that run, not copied."""
    known = known or {}
    result = Copied()
    for run in runs:
        existing = known.get(origin_of(run))
        if existing is None and run.kind == KIND_FINAL and FINAL_KEY in run.tags:
            existing = known.get((KIND_FINAL, run.tags[FINAL_KEY]))
        if existing is not None:
            result.runs[run.run_id] = existing
            continue
        result.runs[run.run_id] = _copy_run(source, target, experiment_id, run, result.runs, place)
        result.copied.add(run.run_id)
    return result


def _copy_run(source: Store, target, experiment_id: str, run: Run, id_map: dict[str, str], place: PlaceRanks) -> str:
    from mlflow.entities import Metric, Param, RunTag

    source_client = source.client
    original = source_client.get_run(run.run_id)
    tags = {k: v for k, v in original.data.tags.items() if k != PARENT_RUN_ID}
    tags[SOURCE_RUN_ID] = origin_of(run)
    parent = original.data.tags.get(PARENT_RUN_ID)
    if parent in id_map:
        tags[PARENT_RUN_ID] = id_map[parent]
    created = target.create_run(experiment_id, start_time=original.info.start_time, run_name=original.info.run_name)
    run_id = created.info.run_id
    params = [Param(k, v) for k, v in sorted(original.data.params.items())]
    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in sorted(original.data.metrics)
        for m in source_client.get_metric_history(run.run_id, key)
    ]
    tag_list = [RunTag(k, v) for k, v in sorted(tags.items())]
    records.log_all(target, run_id, metrics, params, tag_list)
    ranks = source.per_user_file(run)
    if ranks is not None:
        place(run_id, ranks)
    if original.info.status != "RUNNING":
        target.set_terminated(run_id, status=original.info.status, end_time=original.info.end_time)
    return run_id
