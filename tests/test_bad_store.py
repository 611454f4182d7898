"""The store rows of the bad-input table (issue 24): a wrong tracking URI or a damaged store file is
one `error:` line and exit 2 before any work, and the file is left byte for byte as it was (an
empty file is not turned into an MLflow database); a store named elsewhere keeps its artifacts beside
it; a copied store reads its own artifacts; an import that would lose per-user ranks is refused.
Stores: the committed reports/bench_cpu and reports/low_dim stores (real MLflow SQLite databases)
and a small one written with the harness's own Tracker."""

import hashlib
import os
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
BENCH_STORE = REPO / "reports" / "bench_cpu" / "store" / "mlflow.db"
LOW_DIM_STORE = REPO / "reports" / "low_dim" / "store"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not Path(os.environ["HARNESS_RESULTS_DIR"]).exists(), "bad input wrote into results/"
    return lines[0]


@pytest.fixture
def small_store(tmp_path) -> Path:
    """A real store folder (mlflow.db + mlartifacts/) with two tested final runs and their ranks."""
    from harness.store.writer import Tracker

    folder = tmp_path / "small"
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}", "tiny")
    for seed in (1, 2):
        run_id = tracker.start_run(f"sasrec-s{seed}", {"model": "sasrec"}, {"harness.kind": "final"})
        tracker.log_metrics(run_id, {"test_ndcg_at_10": 0.1 * seed})
        tracker.log_per_user(
            run_id, pd.DataFrame({"user": [1, 2], "user_token": [1, 2], "target": [3, 4], "rank": [1, 9]})
        )
        tracker.end_run(run_id)
    return folder


def test_report_on_a_tracking_uri_with_an_unknown_scheme(tmp_path, capsys):
    line = _one_error_line(capsys, ["report", "--tracking-uri", "foo://bar", "--out", str(tmp_path / "reports")])
    assert line.startswith("error: tracking URI 'foo://bar': MLflow has no store for the scheme 'foo'")
    assert not (tmp_path / "reports").exists()


def _junk(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _truncated(path: Path) -> None:
    whole = BENCH_STORE.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _not_mlflow(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as connection:
        connection.execute("create table songs (title text)")
    connection.close()


DAMAGED = [
    (_junk, "is not a SQLite database (it lacks SQLite's header)"),
    (_truncated, "is truncated: 620,544 of the 1,241,088 bytes its header records"),
    (_empty, "is empty (0 bytes): no runs to read"),
    (_not_mlflow, "is a SQLite database but not an MLflow tracking store (it has no experiments and runs table)"),
]


@pytest.mark.parametrize("damage, problem", DAMAGED, ids=["junk", "truncated", "empty", "not-mlflow"])
def test_report_on_a_damaged_store_file(tmp_path, capsys, damage, problem):
    database = tmp_path / "store.db"
    damage(database)
    before = _digest(database)
    for uri in (f"sqlite:///{database}", str(database)):  # a plain path is a SQLite store too
        line = _one_error_line(capsys, ["report", "--tracking-uri", uri, "--out", str(tmp_path / "reports")])
        assert line.startswith(f"error: tracking store {database} {problem}") or line.startswith(
            f"error: {database} {problem}"
        ), line
    assert _digest(database) == before  # an empty file stays empty: no MLflow tables written into it
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("damage, problem", DAMAGED, ids=["junk", "truncated", "empty", "not-mlflow"])
def test_import_of_a_damaged_store_file(tmp_path, capsys, damage, problem):
    store = tmp_path / "store"
    store.mkdir()
    damage(store / "mlflow.db")
    before = _digest(store / "mlflow.db")
    line = _one_error_line(capsys, ["import", str(store)])
    assert problem in line and str(store / "mlflow.db") in line
    assert _digest(store / "mlflow.db") == before


def test_training_into_a_damaged_store_file_is_refused_before_it_starts(tmp_path, capsys):
    database = tmp_path / "store.db"
    _junk(database)
    before = _digest(database)
    line = _one_error_line(
        capsys, ["train", "--epochs", "1", "--no-progress", "--tracking-uri", f"sqlite:///{database}"]
    )
    assert "is not a SQLite database" in line and "epoch" not in capsys.readouterr().out
    assert _digest(database) == before


def test_a_study_into_a_damaged_store_file_is_refused_before_it_starts(tmp_path, capsys):
    import yaml

    database = tmp_path / "store.db"
    _truncated(database)
    before = _digest(database)
    study = tmp_path / "tiny.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "datasets": ["ml-latest-small"],
                "models": {"sasrec": {"params": {"n_heads": 1}}},
                "space": {"hidden_size": [8]},
                "n_trials": 0,
                "tracking_uri": f"sqlite:///{database}",
            }
        )
    )
    assert "is truncated" in _one_error_line(capsys, ["run", str(study), "--no-live"])
    assert _digest(database) == before


def test_report_on_a_path_that_is_no_store(tmp_path, capsys):
    line = _one_error_line(capsys, ["report", "--tracking-uri", str(tmp_path / "nowhere")])
    assert line.startswith(f"error: no tracking store at {tmp_path / 'nowhere'}")
    line = _one_error_line(capsys, ["report", "--tracking-uri", str(tmp_path)])
    assert line == f"error: {tmp_path} is a folder but not a tracking store (no experiments.json or mlflow.db in it)"


def test_a_store_named_elsewhere_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    # the working directory's results/ is not where a store named by --tracking-uri puts its files
    from harness.store.reader import Store
    from harness.store.writer import Tracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HARNESS_RESULTS_DIR")
    elsewhere = tmp_path / "elsewhere" / "runs.db"
    tracker = Tracker(f"sqlite:///{elsewhere}", "tiny")
    run_id = tracker.start_run("one", {}, {"harness.kind": "train"})
    tracker.log_per_user(run_id, pd.DataFrame({"user": [1], "user_token": [1], "target": [2], "rank": [3]}))
    tracker.end_run(run_id)
    assert not (tmp_path / "results").exists()
    store = Store(str(elsewhere))
    [run] = store.runs(store.experiments())
    assert store.per_user_file(run).is_relative_to(tmp_path / "elsewhere" / "mlartifacts")


def test_a_copied_store_reads_its_own_artifacts_not_the_originals(tmp_path):
    from harness.store.reader import Store

    copy = tmp_path / "copy"
    shutil.copytree(LOW_DIM_STORE, copy)
    store = Store(str(copy))
    runs = store.runs(store.experiments())
    files = [store.per_user_file(run) for run in runs]
    assert sum(f is not None for f in files) == 40
    assert all(f.is_relative_to(copy / "mlartifacts") for f in files if f is not None)
    # without its artifacts, the copy has none: it never falls back to the original's folder
    shutil.rmtree(copy / "mlartifacts")
    bare = Store(str(copy))
    assert [bare.per_user_file(run) for run in bare.runs(bare.experiments())] == [None] * len(runs)


def test_import_of_a_store_without_its_ranks_is_refused(tmp_path, capsys, small_store):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(small_store / "mlflow.db", bare / "mlflow.db")  # the artifacts left behind
    line = _one_error_line(capsys, ["import", str(bare)])
    assert line.startswith(f"error: 2 of the 2 tested runs in {bare} have no per-user ranks")
    assert "--without-ranks" in line
    assert main(["import", str(bare), "--without-ranks"]) == 0
    assert "tiny: 2 run(s) imported" in capsys.readouterr().out


def test_export_prints_a_report_command_that_survives_spaces(tmp_path, capsys, small_store):
    out = tmp_path / "my stores" / "tiny store"
    assert main(["export", "tiny", "--out", str(out), "--tracking-uri", str(small_store / "mlflow.db")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    argv = shlex.split(printed.removeprefix("report: "))
    assert argv == ["python", "-m", "harness", "report", "tiny", "--tracking-uri", str(out)]


def test_report_does_not_replace_a_committed_report_made_from_another_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "reports" / "low_dim"
    (committed / "store").mkdir(parents=True)
    (committed / "report.md").write_text("the committed report\n")
    line = _one_error_line(capsys, ["report", "low_dim"])
    assert line == (
        "error: reports/low_dim is a committed report made from reports/low_dim/store, and this report would "
        "read the local tracking store: regenerate it with --tracking-uri reports/low_dim/store, or write this "
        "one elsewhere with --out DIR (or --name NAME)"
    )
    assert (committed / "report.md").read_text() == "the committed report\n"
    # named explicitly, the folder is the user's: the guard stands aside (here the store is missing)
    assert "no tracking store at" in _one_error_line(capsys, ["report", "low_dim", "--out", "reports"])


def test_harness_experiments_open_on_the_runs_table_of_the_mlflow_ui(tmp_path, small_store):
    # experiment kind "model training": recent MLflow UIs open others on their GenAI views
    from mlflow.tracking import MlflowClient

    from harness.store.writer import Tracker

    uri = f"sqlite:///{small_store / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("older")  # made before the harness tagged experiments
    Tracker(uri, "older")
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def test_report_on_a_retired_mlflow_file_store(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    line = _one_error_line(capsys, ["report", "--tracking-uri", uri, "--out", str(tmp_path / "reports")])
    assert line.startswith(f"error: tracking URI '{uri}': MLflow's file store is retired")
    assert not (tmp_path / "mlruns").exists()
