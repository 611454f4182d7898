"""What a person waits through says what it is doing, and what it prints fits (issue 24): log lines
stay whole when stdout is not a terminal, the datasets table fits a terminal and shows whole paths,
--list-options explains each option."""

from harness.cli import main
from harness.data.catalogue import EMBEDDED_DIR


def test_log_lines_are_not_wrapped_at_80_columns_when_stdout_is_not_a_terminal(capsys):
    from harness.cli import output_console

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
