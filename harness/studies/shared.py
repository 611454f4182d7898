"""What workers on several hosts share: the final runs' checkpoints, kept in the MLflow runs'
artifacts, and the checks that every worker writes to the same places.

On one host a final run's checkpoint is a file under results/studies/<study>/checkpoints/final/.
When the study's runs go to a tracking server (an http(s) tracking URI, artifacts served by the
server), workers on other hosts cannot read that folder, so every checkpoint write is also uploaded
to the run's artifacts (`checkpoint/<run key>.pt`), and a worker that takes over the run of a dead
one (harness/studies/claims.py) downloads it first: the run resumes from its last epoch, into the
same MLflow run, wherever it continues. The local file stays the working copy; the server's copy
wins when both exist, since the last worker to train the run may have been another host.

Uploads go through the server's artifact proxy (`--serve-artifacts`), which writes each file under
a temporary name and renames it, so a reader never sees half a checkpoint. A finished run's
checkpoint is deleted from the server, as the local one is.

Before any work (`preflight`), a worker makes sure it can share the study as set up: the storage
and the tracking server answer, the server keeps artifacts where every host reads them, and the
places recorded by the first worker are its own -- a study whose trials are in a journal file on
one host, or whose runs go to a tracking store on one host, cannot take workers from another
(docs/multi-host.md). Two database or server URLs are not compared: one server has many names.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from harness.checkpoints import Checkpoint, CheckpointCorrupt, UnsafeCheckpointError
from harness.errors import UserError
from harness.store import contract as tc

ARTIFACT_DIR = tc.CHECKPOINT_ARTIFACT


def is_remote(tracking_uri: str | None) -> bool:
    """A tracking server reached over the network (shared by hosts), not a file on this one."""
    return bool(tracking_uri) and urlsplit(tracking_uri).scheme in ("http", "https")


class ServerCheckpoint(Checkpoint):
    """A final run's local checkpoint mirrored into its MLflow run's artifacts."""

    def __init__(self, path: Path, client):
        super().__init__(path)
        self.client = client  # MlflowClient of the tracking server

    def write(self, state: dict) -> None:
        super().write(state)
        if state.get("run_id"):
            self.client.log_artifact(state["run_id"], str(self.path), artifact_path=ARTIFACT_DIR)

    def remove(self) -> None:
        run_id = self._run_id()
        super().remove()
        if run_id:
            _delete_artifacts(self.client, run_id, ARTIFACT_DIR)

    def _run_id(self) -> str | None:
        try:
            return self.read().get("run_id") if self.exists() else None
        except (CheckpointCorrupt, UnsafeCheckpointError):
            return None

    def fetch(self, runs) -> int | None:
        """Bring the newest server copy among `runs` (a final run's unfinished MLflow runs) here,
        replacing the local file; returns its epoch, or None when the server holds none."""
        for run in sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True):
            with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=".fetch-") as folder:
                try:
                    local = self.client.download_artifacts(
                        run.info.run_id, f"{ARTIFACT_DIR}/{self.path.name}", dst_path=folder
                    )
                except Exception:  # no checkpoint uploaded for this run (killed before epoch 0's)
                    continue
                try:
                    epoch = int(Checkpoint(local).read().get("epoch", 0))
                except CheckpointCorrupt:
                    continue
                os.replace(local, self.path)
                return epoch
        return None


def checkpoint_for(ctx, name: str) -> Checkpoint:
    """The checkpoint of the final run whose file is `name` in the study's final folder."""
    path = ctx.final_checkpoints / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(ctx.tracking_uri):
        return ServerCheckpoint(path, ctx.tracker.client)
    return Checkpoint(path)


def unfinished_runs(ctx, key: str) -> list:
    """The final run `key`'s MLflow runs that did not finish (at most one, unless a start raced)."""
    from harness.studies.context import retrying

    return retrying(
        ctx.tracker.client.search_runs,
        [ctx.tracker.experiment_id],
        filter_string=f"tags.`{tc.FINAL_KEY}` = '{key}' and tags.`{tc.STUDY}` = '{ctx.study.name}' "
        "and attributes.status != 'FINISHED'",
        max_results=100,
    )


def has_checkpoint(client, run_id: str) -> bool:
    try:
        return bool(client.list_artifacts(run_id, ARTIFACT_DIR))
    except Exception:
        return False


def _delete_artifacts(client, run_id: str, path: str) -> None:
    """Best effort: a checkpoint left on the server costs space, not correctness."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        repository = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
        repository.delete_artifacts(path)
    except Exception:
        pass


# ---------------------------------------------------------------------------- sharing checks
class SharingError(UserError):
    """Workers that would not share what they must: one line, before any work."""


def where(uri: str, server: bool) -> str:
    """How a storage or tracking store is recorded for the checks below: a server as such (any
    host reaches it), a file with the host it is on."""
    import socket

    return "server" if server else f"{uri} on {socket.gethostname()}"


def tracking_place(ctx) -> str:
    from harness.store.location import default_tracking_uri

    uri = ctx.tracking_uri or default_tracking_uri()
    return where(uri, is_remote(uri))


def storage_place(ctx) -> str:
    return where(ctx.storage.describe(), ctx.storage.multi_machine)


def preflight(ctx) -> None:
    """Fail with one line (SharingError, or StudySpecError from the storage) before any work when
    this worker cannot share the study: see the module's docstring."""
    if ctx.storage.multi_machine:
        ctx.storage.open()  # an unreachable database: "storage: cannot open ..."
    if not is_remote(ctx.tracking_uri):
        return
    _probe(ctx.tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        location = ctx.tracker.client.get_experiment(ctx.tracker.experiment_id).artifact_location or ""
        parent = ctx.find_parent_run()
        recorded = ctx.tracker.client.get_run(parent).data.tags.get(tc.STORAGE_TAG) if parent else None
    except MlflowException as err:  # e.g. a host name the server does not allow (--allowed-hosts)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SharingError(f"the MLflow tracking server {ctx.tracking_uri} refused: {reason[:200]}") from None
    if urlsplit(location).scheme in ("", "file"):
        raise SharingError(
            f"the tracking server {ctx.tracking_uri} keeps experiment {ctx.study.name!r}'s artifacts at "
            f"{location}, a folder on each host: start it with --serve-artifacts (docs/multi-host.md)"
        )
    if recorded and recorded != storage_place(ctx) and not (recorded == "server" and ctx.storage.multi_machine):
        shared_by = "a database server" if recorded == "server" else recorded
        raise SharingError(
            f"study {ctx.study.name!r} on {ctx.tracking_uri} keeps its trials in {shared_by}, not in this "
            f"worker's {ctx.storage.describe()}: give every worker the same --storage, a database server "
            "for several hosts (docs/multi-host.md)"
        )


def check_tracking(ctx, recorded: str | None) -> None:
    """A cell's Optuna study records where the study's runs go (tc.TRACKING); a worker sharing the
    database must write them there too."""
    if recorded and recorded != tracking_place(ctx) and not (recorded == "server" and is_remote(ctx.tracking_uri)):
        shared_by = "a tracking server" if recorded == "server" else recorded
        raise SharingError(
            f"study {ctx.study.name!r} in {ctx.storage.describe()} records its runs in {shared_by}, not in "
            "this worker's tracking store: give every worker the same --tracking-uri (docs/multi-host.md)"
        )


def _probe(uri: str) -> None:
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except requests.RequestException as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SharingError(f"cannot reach the MLflow tracking server {uri} ({reason[:200]})") from None
