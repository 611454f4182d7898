"""Read-only access to the MLflow tracking store: runs as plain records, per-user ranks.

The report never touches the trainer or the datasets: everything it shows comes from here. What a
run's tags and metrics are called is harness.store.contract.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from harness.store import contract as tc
from harness.store import records
from harness.store.checks import StoreError, checked_uri, quiet_schema_messages
from harness.store.liveness import why_dead
from harness.store.location import default_tracking_uri, sqlite_database

__all__ = ["Run", "Store", "StoreError", "artifact_file", "select_experiments"]


@dataclasses.dataclass(frozen=True)
class Run:
    run_id: str
    experiment: str
    name: str
    status: str
    start_time: int
    params: dict
    tags: dict
    metrics: dict
    artifact_uri: str = ""

    @property
    def interrupted(self) -> str | None:
        """Why a run still RUNNING in the store cannot be training any more (its process on this
        machine is gone: harness.store.liveness), or None. The report says so instead of "still
        training"; the next writer to open the store marks it KILLED."""
        return why_dead(self.tags) if self.status == "RUNNING" else None

    @property
    def kind(self) -> str:
        return self.tags.get(tc.KIND, "")

    @property
    def model(self) -> str:
        return self.tags.get(tc.MODEL_TAG) or self.params.get("model", "")

    @property
    def dataset(self) -> str:
        return self.tags.get(tc.DATASET_TAG) or self.params.get("dataset", "")

    @property
    def hidden(self) -> int | None:
        for key in ("model.hidden_size", "hidden_size", "hidden"):
            value = self.params.get(key)
            if value not in (None, ""):
                try:
                    return int(float(value))
                except ValueError:
                    return None
        return None

    @property
    def seed(self) -> str:
        return self.tags.get(tc.SEED) or self.params.get("seed", "")

    @property
    def comparability(self) -> dict[str, str]:
        """The protocol.* tags: what makes this run's result comparable with another's."""
        return tc.with_late_defaults(
            {
                k.removeprefix(tc.PROTOCOL_PREFIX): v
                for k, v in sorted(self.tags.items())
                if k.startswith(tc.PROTOCOL_PREFIX)
            }
        )

    def objectives(self) -> dict[int, float]:
        out = {}
        for key, value in self.metrics.items():
            match = tc.OBJECTIVE_METRIC.fullmatch(key)
            if match:
                out[int(match.group(1))] = float(value)
        return out


def seed_sort_key(seed: str):
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


class Store:
    """A tracking store opened for reading: an MLflow tracking URI (a sqlite file must already
    exist), or the folder of an exported store: in the text format (harness.store.records), loaded
    into a temporary MLflow database first (`log` hears that it is, the one slow step), or in the
    older form holding mlflow.db. `origins` maps each run's origin id to its id here for a loaded
    folder (empty otherwise)."""

    def __init__(self, uri: str | None = None, log: Callable[[str], None] | None = None):
        from mlflow.tracking import MlflowClient

        # remote artifact stores are downloaded through MLflow: without its progress bars
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        quiet_schema_messages()
        self.uri = uri or default_tracking_uri()
        self.origins: dict[str, str] = {}
        if records.is_records(self.uri):
            self._loaded = tempfile.TemporaryDirectory(prefix="harness-store-")
            loaded_uri, self.origins = records.materialise(Path(self.uri), Path(self._loaded.name), log=log)
            self.client = MlflowClient(loaded_uri)
            self.directory = Path(self._loaded.name)
            self._per_user: dict[str, pd.DataFrame | None] = {}
            return
        if Path(self.uri, "mlflow.db").is_file():  # an exported store folder in the older form
            self.uri = f"sqlite:///{Path(self.uri, 'mlflow.db')}"
        # before MLflow opens it: a wrong URI or a damaged file is one line, and an empty file
        # stays empty (MLflow would write its tables into it)
        self.uri = checked_uri(self.uri, reading=True)
        self.client = MlflowClient(self.uri)
        database = sqlite_database(self.uri)
        self.directory = database.parent if database is not None else None
        self._per_user: dict[str, pd.DataFrame | None] = {}

    def experiments(self) -> dict[str, str]:
        """Active experiments: name -> id."""
        from mlflow.entities import ViewType

        found = self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50000)
        return {e.name: e.experiment_id for e in found}

    def runs(self, experiment_ids: dict[str, str]) -> list[Run]:
        """Every active run of these experiments (name -> id), in a deterministic order."""
        out: list[Run] = []
        for name, experiment_id in sorted(experiment_ids.items()):
            token = None
            while True:
                page = self.client.search_runs([experiment_id], max_results=1000, page_token=token)
                for r in page:
                    out.append(
                        Run(
                            run_id=r.info.run_id,
                            experiment=name,
                            name=r.info.run_name or r.data.tags.get(tc.RUN_NAME, ""),
                            status=r.info.status,
                            start_time=int(r.info.start_time or 0),
                            params=dict(r.data.params),
                            tags=dict(r.data.tags),
                            metrics={k: float(v) for k, v in r.data.metrics.items()},
                            artifact_uri=r.info.artifact_uri or "",
                        )
                    )
                token = page.token
                if not token:
                    break
        out.sort(key=lambda r: (r.experiment, r.start_time, r.run_id))
        return out

    def per_user_file(self, run: Run) -> Path | None:
        """The run's per-user ranks file (read in place from a local store, else downloaded), or
        None when the run has none (older run, failed upload, a trial or a parent)."""
        local = artifact_file(run.artifact_uri, tc.PER_USER_ARTIFACT, self.directory)
        if local is not None:
            return local if local.is_file() else None
        try:
            return Path(self.client.download_artifacts(run.run_id, tc.PER_USER_ARTIFACT))
        except Exception:
            return None

    def per_user_ranks(self, run: Run) -> pd.Series | None:
        """The run's test ranks indexed by user id (sorted), or None without the artifact."""
        if run.run_id not in self._per_user:
            path = self.per_user_file(run)
            try:
                table = pd.read_csv(path) if path is not None else None
            except Exception:  # unreadable artifact: no per-user statistics
                table = None
            self._per_user[run.run_id] = table
        table = self._per_user[run.run_id]
        if table is None or not {"user", "rank"} <= set(table.columns):
            return None
        series = pd.Series(table["rank"].to_numpy(dtype=np.int64), index=table["user"].to_numpy())
        if series.index.has_duplicates:
            return None
        return series.sort_index()


def artifact_file(artifact_uri: str, path: str, store_directory: Path | None = None) -> Path | None:
    """The artifact's file for a local (file://) artifact store, read in place; None otherwise.

    MLflow records absolute artifact paths, and the harness keeps a SQLite store's artifacts
    beside its database, under mlartifacts/. A store folder that was copied or moved (a committed
    store on a fresh clone, a backup beside the original) is read from its own mlartifacts/: the
    recorded path below the last "mlartifacts" is looked up there, never at the recorded location,
    which belongs to the original (reading it would pass the original's files off as the copy's,
    or show them only until the original is deleted). Artifacts recorded outside any mlartifacts/
    folder were put elsewhere on purpose and are read where recorded."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme != "file":
        return None
    recorded = Path(unquote(parsed.path)) / path
    if store_directory is None or "mlartifacts" not in recorded.parts:
        return recorded
    parts = recorded.parts
    below = parts[len(parts) - parts[::-1].index("mlartifacts") :]  # after the last "mlartifacts"
    return Path(store_directory, "mlartifacts", *below)


def select_experiments(store: Store, studies: Iterable[str]) -> dict[str, str]:
    available = store.experiments()
    studies = list(studies)
    if not studies:
        return available
    missing = [s for s in studies if s not in available]
    if missing:
        raise StoreError(
            f"unknown stud{'y' if len(missing) == 1 else 'ies'} {missing}; experiments in "
            f"{store.uri}: {', '.join(sorted(available)) or 'none'}"
        )
    return {s: available[s] for s in studies}
