"""docs/findings.md is rendered from the committed reports' tables (scripts/findings.py and its
template docs/findings.md.j2): the committed page must be what the committed reports give, and its
numbers must follow the tables, not the template."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import findings  # noqa: E402

LOW_DIM_RESULTS = "low_dim_beauty/tables/results_amazon-beauty_prefix_9438e598aff5.csv"


def test_the_committed_findings_page_is_what_the_committed_reports_give():
    check = subprocess.run([sys.executable, "scripts/findings.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.fixture
def reports_copy(tmp_path):
    """the tables the page reads, copied so that a test may change a cell"""
    for name in ("low_dim_beauty", "time_encoding_beauty", "chunk_size"):
        shutil.copytree(ROOT / "reports" / name / "tables", tmp_path / name / "tables")
    shutil.copytree(ROOT / "reports" / "bench_cpu" / "epochs", tmp_path / "bench_cpu" / "epochs")
    return tmp_path


def _edit_cell(path: Path, model: str, hidden: str, column: str, value: str) -> None:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["model"] == model and row["hidden"] == hidden and row["variant"] == "":
            row[column] = value
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_number_on_the_page_follows_its_table_cell(reports_copy):
    row = findings.Report("low_dim_beauty", reports_copy).row("tim4rec", 32)  # TiM4Rec at hidden 32
    before = findings.render(reports_copy)
    assert f"HR@10 {row.pm('hit@10')} v " in before
    _edit_cell(reports_copy / LOW_DIM_RESULTS, "tim4rec", "32", "hit@10_mean", "0.091234")
    after = findings.render(reports_copy)
    assert "HR@10 0.0912" in after and f"HR@10 {row.pm('hit@10')} v " not in after


def test_a_row_the_page_needs_but_the_tables_lack_is_an_error_naming_it(reports_copy):
    path = reports_copy / LOW_DIM_RESULTS
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if not (r["model"] == "ssd4rec" and r["hidden"] == "64")]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(LookupError, match="reports/low_dim_beauty"):
        findings.render(reports_copy)


def _edit_rows(path: Path, match: dict[str, str], changes: dict[str, str]) -> None:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    hits = [row for row in rows if all(row[k] == v for k, v in match.items())]
    assert hits, match
    for row in hits:
        row.update(changes)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


LOW_DIM_CONFIRM = "low_dim_beauty/tables/confirm_amazon-beauty_prefix_9438e598aff5.csv"
ENCODING_SIGNIFICANCE = "time_encoding_beauty/tables/significance_amazon-beauty_prefix_9438e598aff5.csv"


def test_the_words_follow_the_named_familys_verdicts(reports_copy):
    """A width that turns significant in the named family moves from 'cannot decide' to the verdict."""
    page = findings.render(reports_copy)
    assert "Not significant at hidden 8, 16." in page and "compare at hidden 8, 16:" in page
    match = dict(metric="ndcg@10", model="tim4rec", hidden="8")
    _edit_rows(reports_copy / LOW_DIM_CONFIRM, match, dict(p_holm="1.000e-02", significant="true"))
    page = findings.render(reports_copy)
    assert "TiM4Rec behind, significant in this family, at hidden 8." in page
    assert "Not significant at hidden 16." in page and "compare at hidden 16:" in page


def test_an_untested_comparison_reads_not_tested_and_leaves_the_lists(reports_copy):
    """A variant with one seed has no interval and no p-value: the page says so instead of failing."""
    log = findings.Report("time_encoding_beauty", reports_copy).vs("ndcg@10", "tim4rec-log")
    untested = dict(testable="false", ci_low="", ci_high="", p_value="", p_holm="", significant="", n_seeds="1")
    _edit_rows(reports_copy / ENCODING_SIGNIFICANCE, dict(model="tim4rec-log"), untested)
    page = findings.render(reports_copy)
    assert f"Against the official TiM4Rec, NDCG@10 {log.diff}: not tested (1 v 3 seeds)." in page
    assert (
        "Whether the tim4rec-causal time encoding differs" in page and f"tim4rec-log NDCG@10 {log.diff} (" not in page
    )


def test_spans_and_signs_as_the_page_prints_them():
    assert findings.span([801.2, 1149.4, 950.0]) == "801-1149"
    assert findings.span([289.4, 288.6]) == "289"
    assert findings.signed("-0.003920") == "\N{MINUS SIGN}0.0039" and findings.signed("0.005200") == "+0.0052"
    assert findings.signed("-0.000010") == "0.0000" and findings.signed("0.000040", negate=True) == "0.0000"
    # half away from zero, from the CSV's text, as the table's cell (the binary 0.03505 would give 0.0350)
    assert (
        findings.signed("0.035050") == "+0.0351" and findings.signed("0.035050", negate=True) == "\N{MINUS SIGN}0.0351"
    )
    assert findings.p_value("1.327e-02") == "0.013" and findings.p_value("4.200e-04") == "4.2e-04"
    assert findings.p_value("1.025e-01") == "0.103" and findings.p_value("4.250e-04") == "4.3e-04"  # half up
    # a value that 3 decimals would print as the significance level keeps the digits that tell it apart
    assert findings.p_value("5.002e-02") == "0.05002" and findings.p_value("4.998e-02") == "0.04998"
    assert findings.p_value("5.000e-02") == "0.050" and findings.p_value("5.060e-02") == "0.051"


LOW_DIM_PAIRS = "low_dim_beauty/tables/allpairs_amazon-beauty_prefix_9438e598aff5.csv"
LOW_DIM_SIGNIFICANCE = "low_dim_beauty/tables/significance_amazon-beauty_prefix_9438e598aff5.csv"
ENCODING_PAIRS = "time_encoding_beauty/tables/allpairs_amazon-beauty_prefix_9438e598aff5.csv"
CHUNK_RESULTS = "chunk_size/tables/results_amazon-beauty_prefix_9438e598aff5.csv"


def test_the_short_answer_to_question_one_follows_the_cells(reports_copy):
    page = findings.render(reports_copy)
    assert "**In short: no sign of it.** SSD4Rec\\* loses only at hidden 8" in page
    # TiM4Rec significantly above SSD4Rec* where SSD loses, but only in the named family: not settled
    lift = dict(mean_diff="0.004000", p_holm="1.000e-02", significant="true")
    _edit_rows(reports_copy / LOW_DIM_CONFIRM, dict(metric="ndcg@10", model="tim4rec", hidden="8"), lift)
    page = findings.render(reports_copy)
    assert "**In short: not settled.**" in page
    assert (
        "TiM4Rec is higher than SSD4Rec\\* (NDCG@10 +0.0040, significant by Holm 0.010 in the narrower family, not by"
        in page
    )
    # ... and in every family that tests the pair: yes
    _edit_rows(reports_copy / LOW_DIM_SIGNIFICANCE, dict(metric="ndcg@10", model="tim4rec", hidden="8"), lift)
    _edit_rows(
        reports_copy / LOW_DIM_PAIRS, dict(metric="ndcg@10", a="ssd4rec h=8", b="tim4rec h=8"), dict(significant="true")
    )
    assert "**In short: yes.**" in findings.render(reports_copy)
    # SSD4Rec* losing nothing significant at any width leaves nothing to recover
    pair = dict(metric="ndcg@10", a="ssd4rec h=8", b="ssd4rec h=64")
    _edit_rows(reports_copy / LOW_DIM_PAIRS, pair, dict(significant="false"))
    page = findings.render(reports_copy)
    assert "**In short:** SSD4Rec\\* loses nothing significant at any width measured" in page


def test_an_untested_row_where_ssd_loses_leaves_question_one_undecided(reports_copy):
    untested = dict(testable="false", ci_low="", ci_high="", p_value="", p_holm="", significant="", n_seeds="1")
    _edit_rows(reports_copy / LOW_DIM_CONFIRM, dict(metric="ndcg@10", model="tim4rec", hidden="8"), untested)
    page = findings.render(reports_copy)
    assert (
        "**In short: not decided.**" in page
        and "At hidden 8 TiM4Rec is not tested against SSD4Rec\\* (1 v 3 seeds)." in page
    )


def test_a_verdict_that_depends_on_the_family_is_said_to(reports_copy):
    """TiSASRec against SASRec is tested by two reports' all-pairs tables: the page says which says what."""
    pair = dict(metric="ndcg@10", a="sasrec h=64", b="tisasrec h=64")
    _edit_rows(reports_copy / LOW_DIM_PAIRS, pair, dict(significant="true"))
    _edit_rows(reports_copy / ENCODING_PAIRS, pair, dict(significant="false"))
    page = findings.render(reports_copy)
    assert "significant in one report's family and not in the other's" in page
    assert "in time_encoding_beauty not significant by Benjamini-Hochberg" in page
    assert "all-pairs table; in low_dim_beauty significant by Benjamini-Hochberg" in page
    # the other way round: the words follow which report's family says what
    _edit_rows(reports_copy / LOW_DIM_PAIRS, pair, dict(significant="false"))
    _edit_rows(reports_copy / ENCODING_PAIRS, pair, dict(significant="true"))
    page = findings.render(reports_copy)
    assert "in time_encoding_beauty significant by Benjamini-Hochberg" in page
    assert "all-pairs table; in low_dim_beauty not significant by Benjamini-Hochberg" in page
    # agreeing families: no caveat
    _edit_rows(reports_copy / LOW_DIM_PAIRS, pair, dict(significant="true"))
    page = findings.render(reports_copy)
    assert "in one report's family" not in page and "Whether TiSASRec is less accurate" not in page
    assert "TiSASRec's against none is \N{MINUS SIGN}0.0021 NDCG@10, significant in every family that tests it" in page


def test_an_all_pairs_row_reads_the_same_whichever_order_the_table_holds_it():
    cells = dict(mean_diff="0.002095", ci_low="0.000748", ci_high="0.003443", n_seeds_a="3", n_seeds_b="2")
    cells.update(testable="true", significant="true", p_value="1.787e-02", p_bh="3.293e-02")
    as_held, flipped = findings.Pair(cells, False), findings.Pair(cells, True)
    assert (as_held.diff, as_held.ci, as_held.seeds) == ("+0.0021", "[+0.0007, +0.0034]", "3 v 2")
    assert (flipped.diff, flipped.ci, flipped.seeds) == (
        "\N{MINUS SIGN}0.0021",
        "[\N{MINUS SIGN}0.0034, \N{MINUS SIGN}0.0007]",
        "2 v 3",
    )
    assert flipped.difference == -as_held.difference < 0 and flipped.significant


def test_a_chunk_size_that_moves_a_metric_is_named(reports_copy):
    assert "the same test value of every one of the 9 metrics" in findings.render(reports_copy)
    _edit_rows(reports_copy / CHUNK_RESULTS, dict(model="tim4rec", variant="chunk_size=8"), {"mrr@20_mean": "0.011111"})
    page = findings.render(reports_copy)
    assert "Whether the chunk size changes a fully trained model" not in page
    assert (
        "TiM4Rec, accuracy:** 6 chunk sizes (8, 16, 32, 64, 128, 256), 3 epochs, seed 2020: MRR@20 differs between"
        in page
    )


def test_extremes_and_fixed_as_the_page_prints_them():
    assert findings.extremes({8: 150.7, 32: 167.0, 64: 167.0, 256: 126.0}) == [32, 64]
    assert findings.extremes({8: 150.7, 32: 167.0, 256: 126.0}, highest=False) == [256]
    assert findings.fixed(0.885, 2) == "0.89" and findings.fixed(2.5) == "3"  # half away from zero
