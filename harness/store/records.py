"""The committed store format: one text record per run, so that git grows with the runs that changed.

An exported SQLite store is one binary file: every re-export commits the whole of it again, even
when no run changed. This format keeps each run in its own files, named by the run's origin id (the
id it was first recorded under, harness.store.contract.SOURCE_RUN_ID), and written byte for byte the
same when the run is the same:

    <store>/runs/<experiment>/<origin>.json      status, times, name, parent (by origin), params,
                                                 tags and full metric histories; keys sorted, one
                                                 metric value per line, so a diff shows what changed
    <store>/ranks/<experiment>/<origin>.csv.gz   the per-user test ranks artifact, gzip without a
                                                 timestamp (the same ranks give the same bytes)
    <store>/experiments.json                     the experiments, including empty ones

Re-exporting a study whose runs have not changed rewrites identical files: git adds nothing. A run
that trained a few more epochs changes its own record only.

Readers do not parse this themselves: `materialise` loads it into a temporary MLflow database (with
the ranks as artifacts), which `Store` then reads as any other store, so the report and `import`
have one code path for both forms (this one and the older `mlflow.db` + `mlartifacts/`).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from harness.store.contract import OWNER_TAGS, PARENT_RUN_ID, PER_USER_ARTIFACT, SOURCE_RUN_ID
from harness.store.template import create_database

RUNS = "runs"
RANKS = "ranks"
EXPERIMENTS = "experiments.json"


def is_records(folder: Path | str) -> bool:
    """Whether `folder` holds a store in this format."""
    return (Path(folder) / EXPERIMENTS).is_file()


def write_run(
    folder: Path,
    experiment: str,
    origin: str,
    info,
    params: dict,
    tags: dict,
    metrics: list,
    parent_origin: str | None,
    ranks: Path | None,
) -> None:
    """One run's record (and ranks) under `folder`. `info` is the MLflow RunInfo; `metrics` every
    logged value as (key, value, timestamp, step)."""
    # the owner process names a machine and a pid: meaningless on another clone, and no part of
    # committed evidence
    tags = {k: v for k, v in tags.items() if k not in (PARENT_RUN_ID, SOURCE_RUN_ID, *OWNER_TAGS)}
    history: dict[str, list] = {}
    for key, value, timestamp, step in sorted(metrics, key=lambda m: (m[0], m[3], m[2], m[1])):
        history.setdefault(key, []).append([step, timestamp, value])
    record = {
        "origin": origin,
        "name": info.run_name,
        "status": info.status,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "parent": parent_origin,
        "params": dict(sorted(params.items())),
        "tags": dict(sorted(tags.items())),
        "metrics": history,
    }
    path = Path(folder) / RUNS / experiment / f"{origin}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(record))
    if ranks is not None:
        target = Path(folder) / RANKS / experiment / f"{origin}.csv.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(ranks, "rb") as source, open(target, "wb") as raw:
            # mtime=0 and no file name: the same ranks compress to the same bytes
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as out:
                shutil.copyfileobj(source, out)


def write_experiments(folder: Path, names: list[str]) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / EXPERIMENTS).write_text(json.dumps(sorted(names), indent=1) + "\n")


def _dumps(record: dict) -> str:
    """Sorted keys, one metric value (and one param or tag) per line: small, stable diffs."""
    lines = ["{"]
    items = list(record.items())
    for index, (key, value) in enumerate(items):
        comma = "," if index < len(items) - 1 else ""
        if isinstance(value, dict) and value:
            lines.append(f" {json.dumps(key)}: {{")
            inner = list(value.items())
            for j, (k, v) in enumerate(inner):
                sep = "," if j < len(inner) - 1 else ""
                if isinstance(v, list):  # a metric history: one [step, timestamp, value] per line
                    rows = ",\n".join(f"   {json.dumps(row)}" for row in v)
                    lines.append(f"  {json.dumps(k)}: [\n{rows}\n  ]{sep}")
                else:
                    lines.append(f"  {json.dumps(k)}: {json.dumps(v)}{sep}")
            lines.append(f" }}{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def log_all(client, run_id: str, metrics: list, params: list, tags: list) -> None:
    """Log a run's metrics, params and tags in as few calls as MLflow allows (per call: 100 params,
    100 tags, 1000 entries in all), each call one transaction."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        batch_params, params = params[:100], params[100:]
        batch_tags, tags = tags[:100], tags[100:]
        room = 1000 - len(batch_params) - len(batch_tags)
        batch_metrics, metrics = metrics[:room], metrics[room:]
        client.log_batch(run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)


def materialise(folder: Path, database_dir: Path, log=None) -> tuple[str, dict[str, str]]:
    """Load the store in `folder` into a new MLflow SQLite database under `database_dir` (its
    ranks as artifacts beside it); returns its tracking URI and origin -> run id of every run.
    Each run gets SOURCE_RUN_ID = its origin, as any copy does. `log` hears what is loaded."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    folder, database_dir = Path(folder), Path(database_dir)
    database_dir.mkdir(parents=True, exist_ok=True)
    database = (database_dir / "mlflow.db").resolve()
    create_database(database)
    uri = f"sqlite:///{database}"
    client = MlflowClient(uri)
    ids: dict[str, str] = {}
    names = json.loads((folder / EXPERIMENTS).read_text())
    if log is not None:
        count = sum(1 for name in names for _ in (folder / RUNS / name).glob("*.json"))
        log(f"loading the exported store {folder} ({count} run(s) of {', '.join(names)}) into a temporary database ...")
    for name in names:
        artifacts = (database_dir / "mlartifacts" / name).resolve()
        found = client.get_experiment_by_name(name)  # "Default" exists in every new database
        experiment_id = (
            found.experiment_id if found else client.create_experiment(name, artifact_location=artifacts.as_uri())
        )
        records = [json.loads(p.read_text()) for p in sorted((folder / RUNS / name).glob("*.json"))]
        # parents before children, as they were recorded
        for record in sorted(records, key=lambda r: (r["start_time"] or 0, r["origin"])):
            origin = record["origin"]
            tags = dict(record["tags"])
            tags[SOURCE_RUN_ID] = origin
            if record["parent"] in ids:
                tags[PARENT_RUN_ID] = ids[record["parent"]]
            run = client.create_run(experiment_id, start_time=record["start_time"], run_name=record["name"])
            run_id = ids[origin] = run.info.run_id
            params = [Param(k, v) for k, v in record["params"].items()]
            tag_list = [RunTag(k, v) for k, v in sorted(tags.items())]
            metrics = [
                Metric(key, value, timestamp, step)
                for key, rows in record["metrics"].items()
                for step, timestamp, value in rows
            ]
            log_all(client, run_id, metrics, params, tag_list)
            ranks = folder / RANKS / name / f"{origin}.csv.gz"
            if ranks.is_file():
                destination = Path(unquote(urlparse(run.info.artifact_uri).path)) / PER_USER_ARTIFACT
                destination.parent.mkdir(parents=True, exist_ok=True)
                with gzip.open(ranks, "rb") as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out)
            if record["status"] != "RUNNING":
                client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    return uri, ids
