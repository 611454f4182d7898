"""Studies across processes: kill -9 in the middle of `run` and resume; 2 and 4 worker processes
on the journal file storage and on PostgreSQL (HARNESS_TEST_POSTGRES_URL, set by CI through
.ci/postgres.sh; skipped without it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.test_studies import ROOT, journal_trials, mlflow_runs, write_study

POSTGRES_URL = os.environ.get("HARNESS_TEST_POSTGRES_URL")
pytestmark = pytest.mark.slow  # every test here starts and waits for several worker processes


def _env(directory: Path) -> dict[str, str]:
    env = {**os.environ, "HARNESS_RESULTS_DIR": str(directory / "results"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _harness(directory: Path, *args: str, **kwargs) -> subprocess.Popen:
    log_path = directory / f"log-{uuid.uuid4().hex[:6]}.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness", *args],
            cwd=ROOT,
            env=_env(directory),
            stdout=log,
            stderr=subprocess.STDOUT,
            **kwargs,
        )
    proc.log_path = log_path  # Popen.stdout is None when the output goes to a file
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _log_of(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def _check_trials(trials, n_expected: int) -> None:
    """Unique numbers, nothing left running, exactly n_expected completed, every failure retried."""
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    states = Counter(t.state.name for t in trials)
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, states
    assert states["COMPLETE"] == n_expected, states
    retried = {t.user_attrs["harness.retry_of"] for t in trials if "harness.retry_of" in t.user_attrs}
    for trial in trials:
        if trial.state.name == "FAIL":
            assert trial.number in retried and trial.user_attrs["harness.failure_kind"] == "interrupted"


def test_kill_9_in_the_middle_then_resume(tmp_path):
    sizes = [8, 12, 16, 20, 24, 28]
    path = write_study(
        tmp_path,
        name="killed",
        space={"hidden_size": sizes},
        train={
            "max_len": 10,
            "epochs": 2,
            "protocol": "all_positions",
            "min_user_inter": 20,
            "min_item_inter": 100,
            "batch_size": 256,
            "threads": 1,
        },
    )
    proc = _harness(tmp_path, "run", str(path), "--no-live")
    journal = tmp_path / "results" / "studies" / "killed.journal"
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if not journal.exists():
            continue
        trials = next(iter(journal_trials(tmp_path, "killed").values()), [])
        states = Counter(t.state.name for t in trials)
        if states["COMPLETE"] >= 2 and states["RUNNING"] == 1:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=30)
    assert killed, f"the study ended before it could be killed:\n{_log_of(proc)}"
    (before,) = journal_trials(tmp_path, "killed").values()
    assert Counter(t.state.name for t in before)["RUNNING"] == 1

    rerun = _harness(tmp_path, "run", str(path), "--no-live")
    assert _finish(rerun) == 0, _log_of(rerun)
    (after,) = journal_trials(tmp_path, "killed").values()
    _check_trials(after, len(sizes))
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert sorted(t.params["hidden_size"] for t in complete) == sizes  # none lost, none twice
    # trials completed before the kill were kept, not redone
    kept = {t.number for t in before if t.state.name == "COMPLETE"}
    assert kept <= {t.number for t in complete}
    interrupted = [t for t in after if t.state.name == "FAIL"]
    assert len(interrupted) == 1 and "stopped while the trial ran" in interrupted[0].user_attrs["harness.failure"]

    runs = mlflow_runs(tmp_path, "killed")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finals = [r for r in runs if r.data.tags.get("harness.kind") == "final"]
    assert sorted(r.data.tags["harness.select"] for r in finals) == sorted(f"hidden_size={s}" for s in sizes)
    assert all(r.info.status == "FINISHED" for r in finals)
    # the kill may land before the interrupted trial opened its MLflow run (data loading); if it
    # had one, that run was closed as killed/failed and belongs to the interrupted trial
    dead = [r for r in runs if r.data.tags.get("harness.kind") == "trial" and r.info.status in ("KILLED", "FAILED")]
    assert len(dead) <= 1
    assert all(r.data.tags["harness.trial"] == str(interrupted[0].number) for r in dead)

    # a third run finds everything done: no new runs, no new trials
    again = _harness(tmp_path, "run", str(path), "--no-live")
    assert _finish(again) == 0
    assert len(mlflow_runs(tmp_path, "killed")) == len(runs)
    assert len(next(iter(journal_trials(tmp_path, "killed").values()))) == len(after)


def _random_study(directory: Path, name: str, n_trials: int, **changes) -> Path:
    return write_study(
        directory,
        name=name,
        sampler={"type": "random", "seed": 5},
        n_trials=n_trials,
        space={"hidden_size": [8, 16], "lr": {"low": 1e-3, "high": 1e-2, "log": True}},
        **changes,
    )


def test_run_with_two_workers_on_the_journal(tmp_path):
    path = _random_study(tmp_path, "two", 6, final={"seeds": 2})
    proc = _harness(tmp_path, "run", str(path), "--workers", "2", "--no-live")
    assert _finish(proc) == 0, _log_of(proc)
    (trials,) = journal_trials(tmp_path, "two").values()
    _check_trials(trials, 6)
    assert not [t for t in trials if t.state.name == "FAIL"]
    runs = mlflow_runs(tmp_path, "two")
    kinds = Counter(r.data.tags.get("harness.kind") for r in runs)
    assert kinds["study"] == 1 and kinds["trial"] == 6
    groups = {r.data.tags["harness.select"] for r in runs if r.data.tags.get("harness.kind") == "final"}
    assert kinds["final"] == 2 * len(groups)
    assert all(r.info.status == "FINISHED" for r in runs)
    logs = sorted((tmp_path / "results" / "studies" / "two" / "logs").glob("search-worker-*.log"))
    assert len(logs) == 2


def _workers(tmp_path: Path, name: str, storage: str | None, count: int, finals: bool = True) -> None:
    """`count` worker processes started at once on a fresh storage (racing to create the study),
    then `run` for the final stage."""
    n_trials = 2 * count
    path = _random_study(tmp_path, name, n_trials)
    extra = ["--storage", storage] if storage else []
    procs = [_harness(tmp_path, "worker", str(path), "--no-live", "--threads", "1", *extra) for _ in range(count)]
    for proc in procs:
        assert _finish(proc) == 0, _log_of(proc)
    import optuna

    from harness.studies.storage import StudyStorage

    if storage is None:
        (trials,) = journal_trials(tmp_path, name).values()
    else:
        trials = optuna.load_study(
            study_name=f"{name}/ml-latest-small/sasrec", storage=StudyStorage(storage).open()
        ).get_trials()
    _check_trials(trials, n_trials)  # the budget is exact: the check and the ask run under one lock
    assert not [t for t in trials if t.state.name == "FAIL"]
    assert all(t.system_attrs.get("harness:pid") for t in trials)  # every trial stamped by its worker
    runs = mlflow_runs(tmp_path, name)
    assert Counter(r.data.tags.get("harness.kind") for r in runs) == {"study": 1, "trial": n_trials}
    if not finals:
        return
    final = _harness(tmp_path, "run", str(path), "--no-live", *extra)
    assert _finish(final) == 0, _log_of(final)
    runs = mlflow_runs(tmp_path, name)
    kinds = Counter(r.data.tags.get("harness.kind") for r in runs)
    assert kinds["trial"] == n_trials and kinds["final"] >= 1 and kinds["study"] == 1
    assert all(r.info.status == "FINISHED" for r in runs)


def test_four_workers_on_the_journal(tmp_path):
    _workers(tmp_path, "four", None, 4, finals=False)  # the 2-worker `run` test covers the finals


@pytest.fixture
def postgres_schema():
    """A fresh schema per test in the CI database: the workers race on creating Optuna's tables."""
    if not POSTGRES_URL:
        pytest.skip("HARNESS_TEST_POSTGRES_URL is not set (CI sets it with .ci/postgres.sh)")
    import sqlalchemy

    schema = f"harness_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


@pytest.mark.postgres
def test_four_workers_on_postgres(tmp_path, postgres_schema):
    _workers(tmp_path, "pgfour", postgres_schema, 4)


@pytest.mark.postgres
def test_two_workers_on_postgres(tmp_path, postgres_schema):
    _workers(tmp_path, "pgtwo", postgres_schema, 2, finals=False)


def test_several_studies_share_one_pool_of_final_workers(tmp_path):
    """`run A B --workers 2`: both studies' final runs done by the same two workers, each run's
    epoch lines in its own study's worker logs."""
    first = write_study(tmp_path, name="first", n_trials=0, space={"hidden_size": [8]}, sampler=None)
    second = write_study(tmp_path, name="second", n_trials=0, space={"hidden_size": [8, 16]}, sampler=None)
    proc = _harness(tmp_path, "run", str(first), str(second), "--workers", "2", "--no-live")
    assert _finish(proc) == 0, _log_of(proc)
    for name, expected in (("first", 1), ("second", 2)):
        finals = [r for r in mlflow_runs(tmp_path, name) if r.data.tags.get("harness.kind") == "final"]
        assert len(finals) == expected and all(r.info.status == "FINISHED" for r in finals)
        logs = "".join(
            p.read_text() for p in (tmp_path / "results" / "studies" / name / "logs").glob("final-worker-*.log")
        )
        started = sorted(line.split(": ", 1)[1] for line in logs.splitlines() if line.startswith("final "))
        assert started == sorted(r.info.run_name for r in finals), logs
    assert "study 'first' given twice" in _log_of(_wait(_harness(tmp_path, "run", str(first), str(first), "--dry-run")))


def _wait(proc: subprocess.Popen) -> subprocess.Popen:
    assert _finish(proc) == 2
    return proc
