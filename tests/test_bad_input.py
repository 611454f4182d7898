"""The bad-input table (issue 24): each reproducer run as a user would, in process through the CLI,
ends in one `error:` line and exit 2 before any work, and leaves no results folder behind (no
store, no checkpoint). Data: the embedded ml-latest-small and files cut from it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.data.catalogue import EMBEDDED_DIR

RATINGS = EMBEDDED_DIR / "ml-latest-small" / "ratings.csv"
FAST = [
    "--epochs",
    "1",
    "--no-progress",
    "--set",
    "max_len=10",
    "--set",
    "hidden_size=8",
    "--set",
    "n_heads=2",
    "--set",
    "n_layers=1",
]


@pytest.fixture
def ratings() -> pd.DataFrame:
    """The first 60 users of ml-latest-small (9,196 ratings): real ids, real timestamps."""
    frame = pd.read_csv(RATINGS, dtype=str)
    return frame[frame["userId"].isin(frame["userId"].unique()[:60])]


def _files(results: Path) -> list[Path]:
    return sorted(p for p in results.rglob("*") if p.is_file()) if results.exists() else []


def _one_error_line(capsys, argv: list[str]) -> str:
    results = Path(os.environ["HARNESS_RESULTS_DIR"])
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not results.exists(), f"bad input wrote into results/: {_files(results)}"
    return lines[0]


def test_kcore_filter_that_removes_every_user(tmp_path, capsys):
    tiny = tmp_path / "tiny.inter"
    tiny.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n1\t2\t2\n2\t1\t3\n3\t3\t4\n")
    line = _one_error_line(capsys, ["train", "--dataset", str(tiny), *FAST])
    assert "'tiny' has no interactions left after the k-core filter" in line
    assert "3 users, 3 items, 4 interactions" in line and "min_user_inter=5" in line


def test_kcore_threshold_larger_than_any_user(capsys):
    line = _one_error_line(capsys, ["train", "--set", "min_user_inter=100000", *FAST])
    assert "'ml-latest-small' has no interactions left" in line and "min_user_inter=100000" in line


def test_users_too_short_for_leave_one_out(tmp_path, capsys):
    tiny = tmp_path / "tiny.inter"
    tiny.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n1\t2\t2\n2\t1\t3\n3\t3\t4\n")
    line = _one_error_line(
        capsys, ["train", "--dataset", str(tiny), "--set", "min_user_inter=1", "--set", "min_item_inter=1", *FAST]
    )
    assert "cannot be split" in line and "4 or more" in line


def test_missing_config_file(tmp_path, capsys):
    line = _one_error_line(capsys, ["train", "--config", str(tmp_path / "missing.yaml"), *FAST])
    assert line == f"error: config file {tmp_path / 'missing.yaml'} does not exist"


def test_config_file_with_a_yaml_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\ntopk: [10, 20\n")
    line = _one_error_line(capsys, ["train", "--config", str(bad), *FAST])
    assert f"config file {bad}: YAML syntax error at line 3" in line


def test_config_file_that_is_not_a_mapping(tmp_path, capsys):
    bad = tmp_path / "list.yaml"
    bad.write_text("- lr\n- 0.001\n")
    assert "must be a mapping" in _one_error_line(capsys, ["train", "--config", str(bad), *FAST])


def test_topk_without_the_early_stopping_cutoff(capsys):
    line = _one_error_line(capsys, ["train", "--set", "topk=[20]", *FAST])
    assert "valid_metric ndcg@10 needs K=10 in topk [20]" in line


def test_early_stopping_cutoff_checked_in_config_files_too(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("valid_metric: hit@5\n")
    assert "needs K=5" in _one_error_line(capsys, ["train", "--config", str(config), *FAST])


@pytest.mark.parametrize("value, problem", [("inf", "not finite"), ("-inf", "not finite"), ("1e39", "out of range")])
def test_timestamps_that_are_not_finite_or_too_large(tmp_path, capsys, ratings, value, problem):
    ratings = ratings.copy()
    ratings.iloc[5, ratings.columns.get_loc("timestamp")] = value
    path = tmp_path / "stamps.csv"
    ratings.to_csv(path, index=False)
    line = _one_error_line(capsys, ["train", "--dataset", str(path), *FAST])
    assert f"timestamp '{value}' in data row 6 is {problem}" in line


def test_cached_timestamps_out_of_range_are_rebuilt(tmp_path, ratings):
    # a processed entry cached before the range check may hold inf: it is treated as damaged and
    # rebuilt from the file, never trained on
    import numpy as np

    from harness.data.catalogue import load

    path = tmp_path / "stamps.csv"
    ratings.to_csv(path, index=False)
    reference = load(str(path))
    [cached] = (Path(os.environ["HARNESS_CACHE_DIR"]) / "processed").glob("*.npz")
    with np.load(cached) as arrays:
        saved = {name: arrays[name] for name in arrays.files}
    saved["timestamps"] = saved["timestamps"].copy()
    saved["timestamps"][0] = np.inf
    np.savez(cached, **saved)
    again = load(str(path))
    assert np.isfinite(again.timestamps).all() and again.fingerprint == reference.fingerprint
    with np.load(cached) as arrays:
        assert np.isfinite(arrays["timestamps"]).all()


def test_unknown_columns_hint_names_an_option_that_exists(tmp_path, capsys, ratings):
    path = tmp_path / "renamed.csv"
    ratings.rename(columns={"userId": "who", "movieId": "what", "timestamp": "when"}).to_csv(path, index=False)
    line = _one_error_line(capsys, ["train", "--dataset", str(path), *FAST])
    assert "no user column found" in line and "--columns USER,ITEM,TIMESTAMP" in line


def test_unknown_suffix_hint_names_an_option_that_exists(tmp_path, capsys, ratings):
    path = tmp_path / "ratings.txt"
    ratings.to_csv(path, index=False)
    line = _one_error_line(capsys, ["train", "--dataset", str(path), *FAST])
    assert "cannot tell the format from the file name; name it with --format" in line


def test_the_hinted_options_read_the_file(tmp_path, ratings):
    # what the two hints point to works: --columns and --format give the same data as the plain file
    from harness.config import make_config
    from harness.data.catalogue import load_for
    from harness.train import Trainer

    plain, renamed, suffix = tmp_path / "plain.csv", tmp_path / "renamed.csv", tmp_path / "ratings.txt"
    ratings.to_csv(plain, index=False)
    ratings.rename(columns={"userId": "who", "movieId": "what", "timestamp": "when"}).to_csv(renamed, index=False)
    ratings.to_csv(suffix, index=False)
    reference = load_for(make_config({"dataset": str(plain)}))
    by_columns = load_for(make_config({"dataset": str(renamed), "data_columns": ["who", "what", "when"]}))
    by_format = load_for(make_config({"dataset": str(suffix), "data_format": "csv"}))
    assert by_columns.fingerprint == by_format.fingerprint == reference.fingerprint
    # the run's recorded params keep the settings when they are given, and leave them out when not
    config = make_config(
        {"dataset": str(suffix), "data_format": "csv", "max_len": 10, "model_params": {"hidden_size": 8, "n_heads": 2}}
    )
    assert Trainer(config, data=by_format, progress=None).params()["data_format"] == "csv"
    assert "data_format" not in Trainer(make_config({"dataset": str(plain)}), data=reference, progress=None).params()


def test_columns_for_a_format_without_names_and_format_for_a_named_dataset(tmp_path, capsys, ratings):
    path = tmp_path / "ratings.txt"
    ratings.to_csv(path, index=False)
    line = _one_error_line(capsys, ["train", "--dataset", str(path), "--format", "tsv", "--columns", "a,b,c", *FAST])
    assert "a tsv file has no column names to choose from" in line
    line = _one_error_line(capsys, ["train", "--dataset", "ml-latest-small", "--format", "csv", *FAST])
    assert "data_format is for a dataset file given by path" in line


def test_cli_format_choices_are_the_parsers(capsys):
    from harness.commands.train import FORMATS as CLI_FORMATS
    from harness.data.parsers import FORMATS

    assert CLI_FORMATS == FORMATS


def test_results_folder_that_cannot_take_files(tmp_path, monkeypatch, capsys):
    # a file where results/ should be: nothing can be created under it (the same check as a
    # read-only folder, which the next test makes with real permissions)
    blocker = tmp_path / "results-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(blocker))
    for argv in (["train", *FAST], ["train", "--no-track", *FAST]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: the checkpoint folder {blocker}/checkpoints is not writable")
        assert "\n" not in err
    assert blocker.read_text() == "not a folder"


def _without_root_override() -> list[str] | None:
    """A prefix that runs a command without the power to write into read-only folders: nothing for
    a normal user, setpriv dropping CAP_DAC_OVERRIDE for root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return None
    caps = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", caps, "--inh-caps", caps]


@pytest.mark.parametrize(
    "extra, folder",
    [
        (["--no-track"], "the checkpoint folder {results}/checkpoints"),
        ([], "the checkpoint folder {results}/checkpoints"),
        (["--checkpoint-dir", "{tmp}/ck"], "the tracking store's folder {results}"),
    ],
)
def test_read_only_results_folder(tmp_path, extra, folder):
    prefix = _without_root_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot make a folder read-only for this process")
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    extra = [a.format(tmp=tmp_path) for a in extra]
    try:
        env = {**os.environ, "HARNESS_RESULTS_DIR": str(results)}
        out = subprocess.run(
            [*prefix, sys.executable, "-m", "harness", "train", *FAST, *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    finally:
        results.chmod(0o755)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"error: {folder.format(results=results)} is not writable (Permission denied); make it "
        "writable or point the run elsewhere (HARNESS_RESULTS_DIR, --tracking-uri, --checkpoint-dir)"
    )
    assert "epoch" not in out.stdout  # refused before training
    assert list(results.iterdir()) == []


def test_study_run_with_a_results_folder_that_cannot_take_files(tmp_path, monkeypatch, capsys):
    import yaml

    blocker = tmp_path / "results-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(blocker))
    study = tmp_path / "tiny.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "datasets": ["ml-latest-small"],
                "models": {"sasrec": {"params": {"n_heads": 1}}},
                "train": {"max_len": 10, "epochs": 1},
                "space": {"hidden_size": [8]},
                "sampler": "grid",
                "final": {"seeds": 1},
            }
        )
    )
    assert main(["run", str(study), "--no-live"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: the study folder {blocker.resolve()}/studies/tiny is not writable"), err
    assert "\n" not in err and blocker.read_text() == "not a folder"


def test_ui_on_a_busy_port_is_refused_before_starting(capsys):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"error: port {port} on 127.0.0.1 is not available (Address already in use); "
        "another server holds it: stop that one or choose another with --port"
    )
    assert "MLflow UI on" not in captured.out  # no server was started
    assert not Path(os.environ["HARNESS_RESULTS_DIR"]).exists()


HEAVY = ("torch", "mlflow", "optuna", "pandas", "numpy", "sqlalchemy", "models")


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["train", "--help"], 0),
        (["run", "--help"], 0),
        (["train", "--set", "lr=-1"], 2),
        (["train", "--set", "topk=[20]"], 2),
        (["train", "--config", "/nonexistent/c.yaml"], 2),
    ],
)
def test_help_and_setting_errors_import_no_heavy_library(argv, code):
    # what makes `--help` and a one-line setting error fast: nothing heavy is imported before it
    # is needed (measured by `python -m harness --help` timings, not here)
    probe = (
        "import sys\n"
        "from harness import cli\n"
        "try:\n"
        f"    code = cli.main({argv!r})\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        f"print('CODE', code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == f"CODE {code} []", out.stdout + out.stderr
