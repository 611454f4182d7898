"""What a person waits through says what it is doing, and what it prints fits (issue 24): log lines
stay whole when stdout is not a terminal, the datasets table fits a terminal and shows whole paths,
a report names its stages, --list-options explains each option."""

import os
from pathlib import Path

import pandas as pd

from harness.cli import main, output_console
from harness.data.catalogue import EMBEDDED_DIR


def test_log_lines_are_not_wrapped_at_80_columns_when_stdout_is_not_a_terminal(capsys):
    long_line = "resuming " + "x" * 300  # any line the harness prints: a path, a plan line
    output_console().print(long_line)
    assert capsys.readouterr().out == long_line + "\n"


def test_datasets_table_fits_a_terminal_and_shows_whole_paths(capsys, monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    assert main(["datasets", "ml-latest-small", "steam"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= 120
    assert f"ml-latest-small: {EMBEDDED_DIR / 'ml-latest-small' / 'ratings.csv'}" in out.splitlines()
    assert "steam: not local; source https://github.com/RUCAIBox/RecSysDatasets (Steam, not-merged)" in out
    assert "loading ml-latest-small for its statistics ..." in out


def test_report_says_what_it_is_doing(tmp_path, capsys):
    # an exported store is loaded into a temporary database first: the long wait is named, and so
    # is each stage after it; the new database is a copy of a cached empty one, not rebuilt
    from harness.store.writer import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'live' / 'mlflow.db'}", "tiny")
    run_id = tracker.start_run("sasrec-s1", {"model": "sasrec"}, {"harness.kind": "final", "protocol_id": "p"})
    tracker.log_metrics(run_id, {"test_ndcg_at_10": 0.1})
    tracker.log_per_user(run_id, pd.DataFrame({"user": [1], "user_token": [1], "target": [2], "rank": [0]}))
    tracker.end_run(run_id)
    assert main(["export", "tiny", "--out", str(tmp_path / "store"), "--tracking-uri", str(tmp_path / "live")]) == 0
    capsys.readouterr()
    assert main(["report", "tiny", "--tracking-uri", str(tmp_path / "store"), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        f"loading the exported store {tmp_path / 'store'} (1 run(s) of tiny) into a temporary database ...",
        f"reading the runs of {tmp_path / 'store'} ...",
        "results tables and significance tests of 1 final run(s) ...",
    ]
    assert list((Path(os.environ["HARNESS_CACHE_DIR"]) / "mlflow").glob("empty-*.db"))


def test_list_options_says_what_each_option_does_and_allows(capsys):
    assert main(["train", "--model", "tim4rec", "--list-options"]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("│ time_encoding ")]
    assert "│ str " in row and "'official'" in row and "official, log, causal" in row
    assert "official: raw gaps, the paper's model" in row


def test_every_model_option_has_a_description():
    import models

    for name in models.available():
        missing = [o.name for o in models.model_class(name).config_class.options() if not o.help]
        assert not missing, f"{name}: options without a line of HELP: {missing}"
