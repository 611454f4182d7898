"""Multi-host mode (issue 25): workers that share nothing but PostgreSQL (the Optuna storage) and an
MLflow tracking server (PostgreSQL backend store, artifacts served by the server).

Three workers, each in its own working directory with its own results/ and cache, run one tiny
study with the command docs/multi-host.md gives (`run STUDY --storage ... --tracking-uri ...`). One
is killed with SIGKILL in the middle of a final run, once the server holds a checkpoint of it; the
others take the run over when its claim expires and resume it from its last epoch into the same
MLflow run. Every trial and final run happens exactly once, and the report built from the server
has the same tables as a single-host run of the same study (journal file, SQLite, local
checkpoints). The server and the schemas are this module's own; PostgreSQL is CI's
(HARNESS_TEST_POSTGRES_URL, .ci/postgres.sh); without it the module is skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from harness.store import contract as tc
from tests.test_studies_workers import postgres_schema  # noqa: F401 -- a fresh schema per test

pytestmark = pytest.mark.postgres

POSTGRES_URL = os.environ.get("HARNESS_TEST_POSTGRES_URL")
EPOCHS = 6
STUDY = {
    "name": "hosts",
    "datasets": ["ml-latest-small"],
    "models": {"sasrec": {"params": {"n_heads": 1}}},
    "train": {
        "max_len": 10,
        "epochs": EPOCHS,
        "patience": EPOCHS,
        "protocol": "all_positions",
        "min_user_inter": 20,
        "min_item_inter": 100,
        "batch_size": 1024,
        "threads": 1,
    },
    "space": {"hidden_size": [8, 16]},
    "sampler": "grid",
    "pruner": "none",
    "select_per": ["hidden_size"],
    "final": {"seeds": 2},
    "storage": {"stale_after": 6},  # a dead worker's claim expires after 6 s
}


def _schema_url(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def services():
    """(storage URL, tracking URI): two fresh schemas in CI's PostgreSQL, one for Optuna and one for
    an MLflow server started here, on 127.0.0.1, serving its artifacts from a temporary folder."""
    if not POSTGRES_URL:
        pytest.skip("HARNESS_TEST_POSTGRES_URL is not set (CI sets it with .ci/postgres.sh)")
    import requests
    import sqlalchemy

    suffix = uuid.uuid4().hex[:10]
    schemas = [f"optuna_{suffix}", f"mlflow_{suffix}"]
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        for schema in schemas:
            conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    folder = Path(tempfile.mkdtemp(prefix="harness-mlflow-server-"))
    port = _free_port()
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            _schema_url(POSTGRES_URL, schemas[1]),
            "--serve-artifacts",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # the server's own workers go with it at the end
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{uri}/health", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        yield _schema_url(POSTGRES_URL, schemas[0]), uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        with engine.begin() as conn:
            for schema in schemas:
                conn.execute(sqlalchemy.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test():
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _host(directory: Path, *args: str) -> subprocess.Popen:
    """`python -m harness ARGS` as on a host of its own: its own working directory, results/,
    cache and study file; the output goes to directory/log.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "study.yaml").write_text(yaml.safe_dump(STUDY, sort_keys=False))
    env = {
        **os.environ,
        "HARNESS_RESULTS_DIR": str(directory / "results"),
        "HARNESS_CACHE_DIR": str(directory / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(directory / "log.txt", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness", *args], cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    _STARTED.append(proc)
    return proc


def _log(directory: Path) -> str:
    return (directory / "log.txt").read_text()


def _wait(proc: subprocess.Popen, directory: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{directory.name} did not end:\n{_log(directory)[-3000:]}") from None


def _runs(client, kind: str) -> list:
    experiment = client.get_experiment_by_name(STUDY["name"])
    runs = client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
    return [r for r in runs if r.data.tags.get(tc.KIND) == kind]


def _checkpoint_epoch(client, run_id: str, folder: Path) -> int | None:
    """The epoch of the checkpoint the server holds for a final run, None without one."""
    from harness.checkpoints import Checkpoint

    try:
        listed = client.list_artifacts(run_id, tc.CHECKPOINT_ARTIFACT)
        if not listed:
            return None
        local = client.download_artifacts(run_id, listed[0].path, dst_path=str(folder))
        return int(Checkpoint(local).read()["epoch"])
    except Exception:  # finished (and deleted) or being replaced: look again
        return None


def _claims(storage) -> list:
    import optuna

    return optuna.load_study(study_name="hosts/final-claims", storage=storage).get_trials()


def _kill_a_worker_mid_final_run(client, storage, workers: dict, scratch: Path, deadline: float):
    """SIGKILL the worker that trains a final run of which the server holds a checkpoint after epoch
    1 or later, before its last epoch; returns (its directory, the run id, that epoch). The worker
    is stopped (SIGSTOP) while the checkpoint is read, so that it uploads no later one meanwhile."""
    pids = {str(p.pid): d for d, p in workers.items()}
    while time.time() < deadline:
        assert any(p.poll() is None for p in workers.values()), "every worker ended before one was killed"
        running = {r.data.tags[tc.FINAL_KEY]: r for r in _runs(client, tc.KIND_FINAL) if r.info.status == "RUNNING"}
        for claim in _claims(storage) if running else []:
            run = running.get(claim.user_attrs.get(tc.FINAL_KEY))
            pid = claim.user_attrs.get(tc.CLAIM_HOLDER, "").partition(" pid ")[2].split(" ")[0]
            if claim.state.name != "RUNNING" or run is None or pid not in pids:
                continue
            epoch = _checkpoint_epoch(client, run.info.run_id, scratch)
            if epoch is None or not 1 <= epoch < EPOCHS - 1:
                continue
            os.kill(int(pid), signal.SIGSTOP)
            epoch = _checkpoint_epoch(client, run.info.run_id, scratch)
            if epoch is None or epoch >= EPOCHS:  # it just finished: let it go on
                os.kill(int(pid), signal.SIGCONT)
                continue
            os.kill(int(pid), signal.SIGKILL)
            return pids[pid], run.info.run_id, epoch
        time.sleep(0.2)
    raise AssertionError("no final run was caught in the middle")


def _tables(directory: Path) -> dict[str, str]:
    """The report's CSV tables, less the wall-clock cost column (seconds per epoch differ between any
    two trainings of the same run; everything the runs computed must be equal)."""
    import pandas as pd

    tables = {}
    for path in sorted(directory.glob("*/tables/*.csv")):
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        tables[path.name] = table.drop(columns=["seconds_per_epoch"], errors="ignore").to_csv(index=False)
    return tables


def test_three_hosts_one_killed_mid_final_run(tmp_path, services):
    from mlflow.tracking import MlflowClient

    storage_url, tracking_uri = services
    shared = ["--storage", storage_url, "--tracking-uri", tracking_uri, "--no-live"]
    # the single-host reference: journal file, SQLite, local checkpoints (the defaults)
    reference = _host(tmp_path / "single", "run", "study.yaml", "--no-live")
    hosts = [tmp_path / f"host{i}" for i in range(3)]
    workers = {host: _host(host, "run", "study.yaml", *shared) for host in hosts}

    import optuna

    from harness.studies.storage import StudyStorage

    client = MlflowClient(tracking_uri)
    storage = StudyStorage(storage_url).open()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    killed, run_id, epoch = _kill_a_worker_mid_final_run(client, storage, workers, scratch, time.time() + 600)
    assert workers[killed].wait(timeout=30) == -signal.SIGKILL
    for host in hosts:
        if host != killed:
            assert _wait(workers[host], host) == 0, _log(host)[-3000:]
    assert _wait(reference, tmp_path / "single") == 0, _log(tmp_path / "single")[-3000:]

    # every trial once: the grid's two points, completed, none failed or retried
    trials = optuna.load_study(study_name="hosts/ml-latest-small/sasrec", storage=storage).get_trials()
    assert sorted((t.state.name, t.params["hidden_size"]) for t in trials) == [("COMPLETE", 8), ("COMPLETE", 16)]
    assert [r.info.status for r in _runs(client, tc.KIND_TRIAL)] == ["FINISHED"] * 2

    # every final run once: four runs (2 configurations x 2 seeds), each finished, one claim completed each
    finals = _runs(client, tc.KIND_FINAL)
    keys = Counter(r.data.tags[tc.FINAL_KEY] for r in finals)
    assert len(keys) == 4 and set(keys.values()) == {1}, keys
    assert all(r.info.status == "FINISHED" for r in finals)
    claims = _claims(storage)
    completed = Counter(c.user_attrs[tc.FINAL_KEY] for c in claims if c.state.name == "COMPLETE")
    assert completed == Counter(set(keys)), completed
    assert not [c for c in claims if c.state.name == "RUNNING"]

    # the killed run went on in the same MLflow run, on another host, from its last checkpoint
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    entries = resumed.data.tags.get("resumed", "").split("; ")
    assert len(entries) == 1, entries
    restart_epoch = int(entries[0].split()[1])
    assert restart_epoch == epoch + 1 >= 2, (epoch, entries)  # from its last checkpoint, not from epoch 1
    losses = client.get_metric_history(run_id, tc.TRAIN_LOSS)
    steps = Counter(m.step for m in losses)
    assert all(steps[s] == 1 for s in range(1, restart_epoch)), steps  # epochs before it never ran twice
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    # ... and bit-identical to the uninterrupted single-host run of the same configuration and seed
    from mlflow.tracking import MlflowClient as Local

    local = Local(f"sqlite:///{tmp_path / 'single' / 'results' / 'mlflow.db'}")
    twin = [r for r in _runs(local, tc.KIND_FINAL) if r.data.tags[tc.FINAL_KEY] == resumed.data.tags[tc.FINAL_KEY]]
    assert len(twin) == 1
    expected = {m.step: m.value for m in local.get_metric_history(twin[0].info.run_id, tc.TRAIN_LOSS)}
    assert {m.step: m.value for m in losses} == expected
    assert {k: v for k, v in resumed.data.metrics.items() if k.startswith("test_")} == {
        k: v for k, v in twin[0].data.metrics.items() if k.startswith("test_")
    }

    # the report from the server: the single-host run's tables
    report_args = ["report", "hosts", "--n-resamples", "200", "--out"]
    from_server = _host(
        tmp_path / "report", *report_args, str(tmp_path / "server-report"), "--tracking-uri", tracking_uri
    )
    single = _host(tmp_path / "single", *report_args, str(tmp_path / "single-report"))
    assert _wait(from_server, tmp_path / "report") == 0, _log(tmp_path / "report")
    assert _wait(single, tmp_path / "single") == 0, _log(tmp_path / "single")
    tables = _tables(tmp_path / "server-report")
    assert tables and tables == _tables(tmp_path / "single-report")


def test_workers_that_cannot_share_stop_before_any_work(tmp_path, services):
    """One `error:` line and exit 2, nothing written to the server: an unreachable server; a
    journal file (this host's) for a study whose trials are in a database; a database for a study
    whose runs go to the server, with a local tracking store."""
    from mlflow.tracking import MlflowClient

    storage_url, tracking_uri = services
    study = {**STUDY, "name": "refused", "final": {"seeds": 1}, "space": {"hidden_size": [8]}}
    first = tmp_path / "first"
    first.mkdir()
    (first / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    with open(first / "log.txt", "w") as log:  # sets the study up: trials in the database, runs on the server
        assert (
            subprocess.run(
                [sys.executable, "-m", "harness", "worker", "study.yaml", "--storage", storage_url]
                + ["--tracking-uri", tracking_uri, "--no-live"],
                cwd=first,
                env={**os.environ, "HARNESS_RESULTS_DIR": str(first / "results")},
                stdout=log,
                stderr=subprocess.STDOUT,
            ).returncode
            == 0
        ), _log(first)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("refused").experiment_id
    before = len(client.search_runs([experiment]))

    cases = [
        (["--tracking-uri", f"http://127.0.0.1:{_free_port()}"], "cannot reach the MLflow tracking server"),
        (["--tracking-uri", tracking_uri], "keeps its trials in a database server, not in this worker's journal file"),
        (["--storage", storage_url], "records its runs in a tracking server, not in this worker's tracking store"),
    ]
    for index, (args, message) in enumerate(cases):
        directory = tmp_path / f"other{index}"
        directory.mkdir()
        (directory / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
        done = subprocess.run(
            [sys.executable, "-m", "harness", "run", "study.yaml", "--no-live", *args],
            cwd=directory,
            env={**os.environ, "HARNESS_RESULTS_DIR": str(directory / "results")},
            capture_output=True,
            text=True,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert message in lines[0], lines[0]
    assert len(client.search_runs([experiment])) == before


def test_a_claim_without_heartbeat_is_taken_over_and_its_holder_told(postgres_schema):  # noqa: F811
    from optuna.trial import TrialState

    from harness.studies.claims import Leases
    from harness.studies.storage import StudyStorage
    from harness.train import RunTakenOver

    mine, theirs = (Leases(StudyStorage(postgres_schema), "lease", stale_after=2) for _ in range(2))
    with mine.take("run-a", "first") as held:
        assert held is not None
        held.check()  # the live holder may write
        with theirs.take("run-a") as other:
            assert other is None  # a live claim is never taken
        assert theirs.held_elsewhere("run-a") and not theirs.held_elsewhere("run-b")
        held.stop()  # the holder freezes: no heartbeat any more
        deadline = time.time() + 60
        while theirs.held_elsewhere("run-a"):
            assert time.time() < deadline
            time.sleep(0.5)
        with theirs.take("run-a", "second") as other:
            assert other is not None
            assert held.storage.get_trial(held.trial_id).state == TrialState.FAIL
            with pytest.raises(RunTakenOver):
                held.check()  # the old holder learns before its next write
            other.done()
    states = sorted((t.state.name, t.user_attrs[tc.CLAIM_HOLDER].split()[-1]) for t in _claims_of(mine))
    assert states == [("COMPLETE", "second"), ("FAIL", "first")]


def _claims_of(leases) -> list:
    return leases._claims().get_trials()


def test_a_holder_that_cannot_renew_its_claim_stops_mid_epoch(postgres_schema):  # noqa: F811
    """Cut off from the database (its heartbeat fails), a holder stops by itself within half of
    stale_after -- before another worker may take its run over -- even in the middle of work."""
    from harness.studies.claims import Leases
    from harness.studies.storage import StudyStorage
    from harness.train import RunTakenOver

    leases = Leases(StudyStorage(postgres_schema), "cut-off", stale_after=2)
    with leases.take("run-c") as held:

        def unreachable(trial_id):
            raise ConnectionError("the database is unreachable")

        held.storage.record_heartbeat = unreachable
        with pytest.raises(RunTakenOver, match="could not be renewed"):
            for _ in range(1200):  # a long epoch, as far as the claim knows
                time.sleep(0.05)
