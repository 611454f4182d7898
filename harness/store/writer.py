"""Writing to the MLflow tracking store: one run per training, nested under a study's parent run
when there is one. What is written is named in harness.store.contract.

The default store is SQLite under results/ (harness.store.location), with artifacts beside it.
Everything goes through MlflowClient with explicit run ids, so several runs (a study's
parent and its trials) can be open at once and a resumed training reopens its own run.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.store.checks import checked_uri
from harness.store.contract import (
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_KIND_TRAINING,
    FAILURE_TAG,
    PARENT_RUN_ID,
    PER_USER_ARTIFACT,
    RANKING_METRIC,
    RUN_NAME,
)
from harness.store.liveness import end_dead_runs
from harness.store.location import artifact_root, default_tracking_uri, sqlite_database
from harness.store.template import create_database


class NonFiniteMetricError(FloatingPointError):
    """A ranking metric came out NaN or infinite."""


@functools.cache
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "mlflow", "optuna", "mamba-ssm", "triton", "causal-conv1d"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def mark_model_training(client, experiment) -> None:
    """Tag an experiment (one made before the tag was written) as model training for the UI."""
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING)


def retrying(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, tried again (6 tries, waits growing from 0.5 s) while SQLite answers
    'database is locked': several workers write to one store file, and SQLite takes one writer at a
    time. Every store write of a study and a resumed run's reopening go through it."""
    for attempt in range(6):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if "database is locked" not in str(err) or attempt == 5:
                raise
            time.sleep(0.5 * (attempt + 1))


class Tracker:
    def __init__(self, uri: str | None = None, experiment: str = "harness"):
        from mlflow.tracking import MlflowClient

        # before MLflow opens it: a wrong URI or a damaged database is one line, not a traceback
        self.uri = checked_uri(uri or default_tracking_uri(), reading=False)
        database = sqlite_database(self.uri)
        if database is not None:
            create_database(database)  # a copy of a cached empty one: seconds faster than MLflow's
        # a tracking server's client prints a "View run at" line per ended run; logs need none
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # an explicit client, not mlflow.set_tracking_uri: that sets MLFLOW_TRACKING_URI for the
        # whole process, and every later default store (an import's target) would be this one
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment(experiment)
        # runs whose training process was killed on this machine are not left RUNNING for ever
        end_dead_runs(self.client, self.experiment_id)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found:
            mark_model_training(self.client, found)
            return found.experiment_id
        try:
            # beside the database it belongs to, wherever that is (None: the server decides)
            location = artifact_root(self.uri)
            kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING}
            return self.client.create_experiment(name, artifact_location=location, tags=kind)
        except Exception:  # another process created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(
        self,
        name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        all_tags = {RUN_NAME: name, **tags}
        if parent_run_id:
            all_tags[PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        run_id = run.info.run_id
        self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for begin in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[begin : begin + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        """Log finite values; None means "not measured" and is skipped. A non-finite ranking metric
        (NaN/inf Hit, NDCG, MRR: a diverged model) raises NonFiniteMetricError instead of being
        dropped, so the run fails rather than finishing with a metric silently missing; other
        non-finite values (timings, memory not measured on this device) are skipped."""
        from mlflow.entities import Metric

        bad = sorted(k for k, v in metrics.items() if v is not None and not np.isfinite(v) and RANKING_METRIC.match(k))
        if bad:
            raise NonFiniteMetricError(
                f"non-finite ranking metric(s) {', '.join(f'{k}={metrics[k]}' for k in bad)}: "
                "the model has diverged; not logging them"
            )
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_per_user(self, run_id: str, table: pd.DataFrame, path: str = PER_USER_ARTIFACT) -> None:
        self.client.log_text(run_id, table.to_csv(index=False), path)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str, note: str = "", tags: dict[str, str] | None = None) -> bool:
        """A resumed run RUNNING again (its interruption ended it KILLED), with `tags` set (its new
        owner), `note` added to its tag `resumed` (one entry per resume, '; '-separated) and the tag
        `failure` of its interruption removed (a finished run must not carry one); False when
        the run is gone from the store. Retried while SQLite is locked, as the studies' writes are."""
        try:
            run = retrying(self.client.get_run, run_id)
        except Exception:  # the run is gone from the store: nothing to reopen
            return False
        new_tags = dict(tags or {})
        if note:
            new_tags["resumed"] = "; ".join(filter(None, [run.data.tags.get("resumed", ""), note]))
        if new_tags:  # the new owner before the status: a RUNNING run never names a dead process
            retrying(self.set_tags, run_id, new_tags)
        if FAILURE_TAG in run.data.tags:  # what ended it no longer describes it (`resumed` keeps the history)
            retrying(self.client.delete_tag, run_id, FAILURE_TAG)
        if run.info.status != "RUNNING":
            retrying(self.client.update_run, run_id, status="RUNNING")
        return True
