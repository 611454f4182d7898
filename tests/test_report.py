"""The report generator against a fixture MLflow store built with the project's Tracker.

The store holds, in two studies:
- "low_dim": final runs of sasrec / ssd4rec / tim4rec x hidden 32, 64 x seeds 0, 1, 2 on "ml-1m" with the
  prefix protocol (group A), per-user test ranks drawn from known distributions (tim4rec best, hidden 64
  better than 32), a study parent run and 12 single-objective trial runs;
- "ap_study": final runs of sasrec (2 seeds) and ssd4rec (1 seed) with the all_positions protocol (group B,
  no tim4rec: the reference is absent), and 10 two-objective trial runs;
- "bench": benchmark cells logged through harness.bench.present.log_rows.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import stats
from harness.metrics import per_user_metric, summarise
from harness.pareto import non_dominated
from harness.report import ReportOptions, generate_report
from harness.report import figures as fg
from harness.report import results as rs
from harness.store import contract as tc
from harness.store.reader import Run
from harness.train import protocol_id

N_USERS = 240
N_ITEMS = 3416
TOPK = (10, 20, 50)
SHIFT = {"sasrec": 0.25, "ssd4rec": 0.1, "tim4rec": -0.35}
HIDDEN_SHIFT = {32: 0.2, 64: 0.0}


def protocol(train_protocol: str) -> dict[str, str]:
    return {
        "split": "leave-one-out(valid,test)",
        "eval_mode": "full-ranking",
        "mask_seen": "false",
        "max_len": "200",
        "loss": "softmax-ce(tied,all-items)",
        "train_protocol": train_protocol,
        "dataset": "ml-1m",
        "dataset_fingerprint": "fixture0000fp",
        "kcore": "5/5",
    }


def draw_ranks(model: str, hidden: int, seed: int, base: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([zlib.crc32(model.encode()), hidden, seed])  # stable across processes
    log_rank = base + SHIFT[model] + HIDDEN_SHIFT[hidden] + rng.normal(0, 0.6, base.size) + rng.normal(0, 0.05)
    return np.clip(np.floor(np.exp(log_rank)), 0, N_ITEMS - 1).astype(np.int64)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from harness.bench.present import log_rows
    from harness.store.writer import Tracker

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    users = np.arange(N_USERS)
    base = np.random.default_rng(7).normal(3.0, 1.5, N_USERS)  # per-user difficulty shared by all models
    truth: dict = {"ranks": {}, "uri": uri, "root": root}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_RESULTS_DIR", str(root))

        def final_run(tracker, parent, model, hidden, seed, proto):
            ranks = draw_ranks(model, hidden, seed, base)
            truth["ranks"][(proto["train_protocol"], model, hidden, seed)] = ranks
            tags = {
                "harness.kind": "final",
                "harness.seed": str(seed),
                "harness.select": f"hidden_size={hidden}",
                "model": model,
                "dataset": "ml-1m",
                "protocol_id": protocol_id(proto),
                **{f"protocol.{k}": v for k, v in proto.items()},
            }
            params = {
                "model": model,
                "dataset": "ml-1m",
                "seed": seed,
                "lr": 0.001,
                "batch_size": 2048,
                "protocol": proto["train_protocol"],
                "model.hidden_size": hidden,
                "model.dropout": 0.2,
                "n_parameters": 1000 * hidden,
                "device": "cpu",
            }
            run_id = tracker.start_run(f"{model}-h{hidden}-s{seed}", params, tags, parent_run_id=parent)
            tracker.log_metrics(run_id, summarise(ranks, TOPK, "test"))
            tracker.log_per_user(
                run_id,
                pd.DataFrame({"user": users, "user_token": users + 1000, "target": users % 50 + 1, "rank": ranks}),
            )
            tracker.end_run(run_id)

        # study A: single objective, group A (prefix)
        tracker = Tracker(uri, "low_dim")
        # the studies runner's layout: objectives "direction key", sampled params as optuna.*, one
        # Optuna study per dataset x model cell named in harness.optuna_study
        parent = tracker.start_run(
            "low_dim",
            {"study": "low_dim", "objectives": "maximize valid_ndcg_at_10"},
            {"harness.kind": "study", "harness.study": "low_dim"},
        )
        rng = np.random.default_rng(3)
        for number in range(12):
            hidden = int(rng.choice([16, 32, 64, 128]))
            lr = float(10 ** rng.uniform(-4, -2))
            value = 0.05 + 0.01 * math.log2(hidden) + rng.normal(0, 0.002)
            run_id = tracker.start_run(
                f"trial-{number}",
                {
                    "model.hidden_size": hidden,
                    "lr": lr,
                    "seed": 2020,
                    "model.dropout": 0.2,
                    "optuna.hidden_size": hidden,
                    "optuna.lr": lr,
                },
                {
                    "harness.kind": "trial",
                    "harness.trial": str(number),
                    "harness.optuna_study": "low_dim/ml-1m/tim4rec",
                },
                parent_run_id=parent,
            )
            tracker.log_metrics(run_id, {"objective_0": value})
            tracker.end_run(run_id)
            truth.setdefault("objective_a", []).append(value)
        for model in ("sasrec", "ssd4rec", "tim4rec"):
            for hidden in (32, 64):
                for seed in (0, 1, 2):
                    final_run(tracker, parent, model, hidden, seed, protocol("prefix"))
        tracker.end_run(parent)

        # study B: two objectives, group B (all_positions), no tim4rec
        tracker = Tracker(uri, "ap_study")
        parent = tracker.start_run(
            "ap_study",
            {"directions": "maximize,minimize", "objectives": "valid_ndcg@10,seconds_per_epoch"},
            {"harness.kind": "study"},
        )
        for number in range(10):
            hidden = int(rng.choice([32, 64, 128]))
            run_id = tracker.start_run(
                f"trial-{number}",
                {"model.hidden_size": hidden, "seed": 2020},
                {"harness.kind": "trial", "harness.trial": str(number)},
                parent_run_id=parent,
            )
            tracker.log_metrics(
                run_id,
                {
                    "objective_0": 0.05 + 0.01 * math.log2(hidden) + rng.normal(0, 0.003),
                    "objective_1": hidden * (1 + rng.uniform(0, 0.5)),
                },
            )
            tracker.end_run(run_id)
        for model, seeds in (("sasrec", (0, 1)), ("ssd4rec", (0,))):
            for seed in seeds:
                final_run(tracker, parent, model, 64, seed, protocol("all_positions"))
        tracker.end_run(parent)

        # benchmarks
        rows = []
        for model, chunks in (("sasrec", [None]), ("ssd4rec", [32, 64])):
            for hidden in (32, 64):
                for seq_len in (50, 200):
                    for chunk in chunks:
                        cost = hidden * seq_len * (1.0 if chunk is None else 0.5 + chunk / 128)
                        row = dict(
                            model=model,
                            backend="torch",
                            hidden=hidden,
                            seq_len=seq_len,
                            batch_size=256,
                            chunk_size=chunk,
                            protocol="prefix",
                            compile=False,
                            kernel_backends="torch",
                            infer_batch_size=256,
                            n_items=N_ITEMS,
                            data="synthetic",
                            device="cpu",
                            repeats=3,
                            warmup=1,
                            memory_source="torch.profiler.cpu-allocations+state",
                            model_params={"hidden_size": hidden},
                        )
                        row.update(
                            {
                                m: 1.0
                                for m in (
                                    "train_step_ms",
                                    "train_step_ms_q1",
                                    "train_step_ms_q3",
                                    "train_step_ms_min",
                                    "train_step_ms_max",
                                    "infer_latency_ms_q1",
                                    "infer_latency_ms_q3",
                                    "infer_latency_ms_min",
                                    "infer_latency_ms_max",
                                    "train_tokens_per_s",
                                    "n_parameters",
                                )
                            }
                        )
                        row.update(
                            train_seqs_per_s=1e6 / cost,
                            train_positions_per_s=1e6 / cost,
                            infer_users_per_s=4e6 / cost,
                            infer_latency_ms=cost / 1e3,
                            peak_memory_mb=cost / 100,
                            infer_peak_memory_mb=cost / 400,
                        )
                        rows.append(row)
        log_rows(rows, {"device_name": "Fixture CPU", "device": "cpu"}, uri, "bench")
    return truth


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    return generate_report(ReportOptions(tracking_uri=store["uri"], out=out, name="fixture", n_resamples=500))


def read_csv(path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def group_slug(report, train_protocol: str) -> str:
    (group,) = [g for g in report.groups if g.comparability["train_protocol"] == train_protocol]
    return group.slug


# ----------------------------------------------------------------------------- tables


def test_results_table_values_and_emphasis(store, report):
    slug = group_slug(report, "prefix")
    rows = read_csv(report.directory / "tables" / f"results_{slug}.csv")
    assert [(r["model"], r["hidden"]) for r in rows] == [
        (m, h) for m in ("sasrec", "ssd4rec", "tim4rec") for h in ("32", "64")
    ]
    for r in rows:
        assert r["n_seeds"] == "3" and r["seeds"] == "0;1;2"
        for metric, k in (("hit", 10), ("ndcg", 10), ("mrr", 50)):
            per_seed = [
                per_user_metric(store["ranks"][("prefix", r["model"], int(r["hidden"]), s)], metric, k).mean()
                for s in (0, 1, 2)
            ]
            assert r[f"{metric}@{k}_mean"] == f"{np.mean(per_seed):.6f}"
            assert r[f"{metric}@{k}_std"] == f"{np.std(per_seed, ddof=1):.6f}"
    # tim4rec h64 is the best by construction, tim4rec h32 second (on ndcg@10 here)
    marks = {(r["model"], r["hidden"]): r["ndcg@10_mark"] for r in rows}
    assert marks[("tim4rec", "64")] == "best"
    assert list(marks.values()).count("best") == 1
    table = report.tables[f"results_{slug}"]
    column = table.columns.index("ndcg@10")
    best_row = [row for row in table.rows if row[0].text == "tim4rec" and row[1].text == "64"][0]
    assert best_row[column].bold and not best_row[column].underline
    assert sum(row[column].underline for row in table.rows) >= 1
    md = report.markdown.read_text()
    assert f"**{best_row[column].text}**" in md
    tex = (report.directory / "tables" / f"results_{slug}.tex").read_text()
    assert r"\textbf{" in tex and r"\underline{" in tex and r"\pm" in tex
    assert "Holm-adjusted" in table.caption and "seed-and-user t-test" in table.caption
    assert "alpha = 0.05" in table.caption and "retraining is in the null" in table.caption


def test_significance_matches_harness_stats(store, report):
    """Default test: the seed test (seeds and users in the null), Holm over the table, and beside it
    the per-user t-test of the trained networks, Holm over the same comparisons."""
    slug = group_slug(report, "prefix")
    rows = read_csv(report.directory / "tables" / f"significance_{slug}.csv")
    metrics = rs.DEFAULT_METRICS
    expected = []
    for metric in metrics:  # the table's order: metric, then model and hidden
        name, k = metric.split("@")
        for model in ("sasrec", "ssd4rec"):
            for hidden in (32, 64):
                a = [per_user_metric(store["ranks"][("prefix", model, hidden, s)], name, int(k)) for s in (0, 1, 2)]
                b = [per_user_metric(store["ranks"][("prefix", "tim4rec", hidden, s)], name, int(k)) for s in (0, 1, 2)]
                expected.append(
                    (
                        metric,
                        model,
                        hidden,
                        stats.seed_user_test(a, b),
                        stats.paired_test_over_seeds(a, b, test="ttest", confidence=0.95),
                        stats.prob_a_beats_b([v.mean() for v in a], [v.mean() for v in b]),
                    )
                )
    assert len(rows) == len(expected) == 36
    adjusted = stats.holm([e[3].p_value for e in expected])
    adjusted_users = stats.holm([e[4].p_value for e in expected])
    by_key = {(r["metric"], r["model"], int(r["hidden"])): r for r in rows}
    for (metric, model, hidden, seeds, users, beats), p_adj, p_users in zip(expected, adjusted, adjusted_users):
        r = by_key[(metric, model, hidden)]
        assert r["reference_model"] == "tim4rec" and r["reference_hidden"] == str(hidden)
        assert int(r["n_users"]) == N_USERS and r["test"] == "seeds" and r["testable"] == "true"
        assert float(r["mean_diff"]) == pytest.approx(seeds.mean_diff, abs=1e-6)
        assert float(r["p_value"]) == pytest.approx(seeds.p_value, rel=1e-3, abs=1e-300)
        assert float(r["p_holm"]) == pytest.approx(p_adj, rel=1e-3, abs=1e-300)
        assert float(r["ci_low"]) == pytest.approx(seeds.ci_low, abs=1e-6)
        assert float(r["df"]) == pytest.approx(seeds.df, abs=1e-6)
        assert float(r["p_a_beats_b"]) == pytest.approx(beats, abs=1e-6)
        assert (r["significant"] == "true") == (p_adj <= 0.05)
        assert float(r["user_p_value"]) == pytest.approx(users.p_value, rel=1e-3, abs=1e-300)
        assert float(r["user_p_holm"]) == pytest.approx(p_users, rel=1e-3, abs=1e-300)
        assert float(r["user_ci_low"]) == pytest.approx(users.ci_low, abs=1e-6)
        assert float(r["effect_size_dz"]) == pytest.approx(users.effect_size, abs=1e-6)
    # stars in the results table are exactly the significant comparisons of the seed test
    results = {(r["model"], r["hidden"]): r for r in read_csv(report.directory / "tables" / f"results_{slug}.csv")}
    for (metric, model, hidden, *_), p_adj in zip(expected, adjusted):
        assert results[(model, str(hidden))][f"{metric}_significant"] == ("true" if p_adj <= 0.05 else "false")
    assert results[("tim4rec", "64")]["ndcg@10_significant"] == ""  # the reference itself
    caption = report.tables[f"significance_{slug}"].caption
    assert "unadjusted" in caption and "these trained networks" in caption
    assert "95% CI (unadjusted)" in report.tables[f"significance_{slug}"].columns


def test_a_pre_declared_family_has_its_own_table_and_its_own_holm(store, report, tmp_path):
    """`--confirm ssd4rec`: ssd4rec against the reference at each hidden size on the primary metric,
    the same tests as the significance table's rows, Holm over those comparisons alone; every other
    table stays as it was."""
    options = ReportOptions(tracking_uri=store["uri"], out=tmp_path, name="fixture", n_resamples=500)
    focused = generate_report(dataclasses.replace(options, confirm=["ssd4rec"]))
    slug = group_slug(focused, "prefix")
    rows = read_csv(focused.directory / "tables" / f"confirm_{slug}.csv")
    assert [(r["metric"], r["model"], r["hidden"], r["reference_model"]) for r in rows] == [
        ("ndcg@10", "ssd4rec", h, "tim4rec") for h in ("32", "64")
    ]
    table = {
        (r["metric"], r["model"], r["hidden"]): r
        for r in read_csv(report.directory / "tables" / f"significance_{slug}.csv")
    }
    family = stats.holm([float(r["p_value"]) for r in rows])
    family_users = stats.holm([float(r["user_p_value"]) for r in rows])
    for r, p_adj, p_users in zip(rows, family, family_users):
        wide = table[(r["metric"], r["model"], r["hidden"])]
        assert r["p_value"] == wide["p_value"] and r["mean_diff"] == wide["mean_diff"]
        assert r["user_p_value"] == wide["user_p_value"]
        assert float(r["p_holm"]) == pytest.approx(p_adj, rel=1e-3, abs=1e-300)
        assert float(r["user_p_holm"]) == pytest.approx(p_users, rel=1e-3, abs=1e-300)
        assert (r["significant"] == "true") == (p_adj <= 0.05)
    # two comparisons instead of the table's 36: the adjustment is far milder
    assert float(rows[0]["p_holm"]) < float(table[("ndcg@10", "ssd4rec", "32")]["p_holm"])
    caption = focused.tables[f"confirm_{slug}"].caption
    assert "family named by --confirm alone" in caption and "this table's 2 rows" in caption
    for name in report.tables:
        if name in focused.tables:
            assert (focused.directory / "tables" / f"{name}.csv").read_bytes() == (
                report.directory / "tables" / f"{name}.csv"
            ).read_bytes(), name
    added = set(focused.tables) - set(report.tables)
    assert set(report.tables) <= set(focused.tables) and f"confirm_{slug}" in added
    assert all(name.startswith("confirm_") for name in added)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--confirm", "tim4rec"], "--confirm tim4rec: the reference model"),  # tested against itself
        (["--confirm", ","], "--confirm takes comma-separated model names; got ','"),
        (["--confirm", "sasrec,,ssd4rec"], "--confirm takes comma-separated model names"),
        (["--confirm", "sasrec,sasrec"], "--confirm takes distinct model names"),
        (["--confirm", "sasrec", "--metrics", "hit@10"], "--confirm tests the primary metric ndcg@10, which --metrics"),
    ],
)
def test_a_family_that_cannot_be_tested_is_one_error_line_before_any_work(store, tmp_path, capsys, option, message):
    from harness.cli import main

    args = ["report", "low_dim", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--no-all-pairs"]
    assert main([*args, *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "low_dim").exists()


def test_a_family_names_the_models_it_lacks_and_tests_the_rest(store, tmp_path):
    from harness.cli import main

    args = ["report", "low_dim", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--no-all-pairs"]
    assert main([*args, "--confirm", "mamba4rec"]) == 0  # no such model: no family at all
    directory = tmp_path / "low_dim"
    assert not list((directory / "tables").glob("confirm_*"))
    assert "--confirm mamba4rec: no such model in this group" in (directory / "report.md").read_text()
    assert main([*args, "--confirm", "mamba4rec,sasrec"]) == 0  # a typo does not silently shrink it
    (table,) = (directory / "tables").glob("confirm_*.csv")
    assert {r["model"] for r in read_csv(table)} == {"sasrec"}
    md = (directory / "report.md").read_text()
    assert "--confirm mamba4rec: no such model in this group, left out of its family" in md
    assert "Family of sasrec vs tim4rec on ndcg@10" in md


def test_a_cell_shows_its_csv_value_rounded_half_away_from_zero():
    """What docs/findings.md relies on: a cell's digits follow from the CSV's text alone."""
    from harness.report import tables as tb

    assert tb.raw(0.0350502) == "0.035050" and tb.num(0.0350502) == "0.0351"  # the binary 0.03505 gives 0.0350
    assert tb.num(0.0350497) == "0.0351"  # its CSV form is the same 0.035050: the cell follows the CSV
    assert tb.num(-0.0350502, sign=True) == "-0.0351" and tb.num(0.0052, sign=True) == "+0.0052"
    assert tb.num(-0.00004) == "0.0000" and tb.num(12.25, 1) == "12.3" and tb.num(None) == "-"
    assert tb.num(-0.00004, sign=True) == "0.0000" and tb.num(np.float32(0.25)) == "0.2500" and tb.num(1e24) != ""
    # best and second follow the printed digits: two cells that print alike share the mark
    assert rs.rank_marks([0.0350502, 0.0350497, 0.0349]) == ["best", "best", "second"]
    assert rs.rank_marks([0.03505, 0.0350]) == ["best", "second"]  # 0.0351 and 0.0350 as printed
    for value in np.random.default_rng(0).normal(0, 0.05, 500).tolist():
        assert tb.num(value) == tb.shown(tb.raw(value)) == f"{float(tb.raw(value)) + 1e-12 * np.sign(value):.4f}"


def test_one_seed_rows_get_no_star_and_keep_their_per_user_test():
    """A model with one seed is never starred by the default test, however large its difference: the
    results table says 'not tested', the companion table keeps its per-user test, labelled."""
    users = np.arange(300)
    rng = np.random.default_rng(1)
    ranks = {f"r{s}": pd.Series(rng.integers(0, 40, 300), index=users) for s in (0, 1, 2)}
    ranks["a0"] = pd.Series(rng.integers(0, 4, 300), index=users)  # far better, one seed
    group = rs.Group(
        "pid",
        {"dataset": "d"},
        [
            rs.Row("a", 64, "", [_run("a0", "a", 0)]),
            rs.Row("r", 64, "", [_run(f"r{s}", "r", s) for s in (0, 1, 2)]),
        ],
    )
    sig = rs.compare_to_reference(group, ["ndcg@10"], "r", rs.PerUser(_FakeStore(ranks)), "seeds", 0.05)
    (c,) = sig.comparisons
    assert not c.testable and c.seeds is None and not c.significant and math.isnan(c.p_adjusted)
    assert c.result.p_value < 1e-10 and c.significant_users  # the trained network is clearly better
    per_user = rs.compare_to_reference(group, ["ndcg@10"], "r", rs.PerUser(_FakeStore(ranks)), "ttest", 0.05)
    assert per_user.comparisons[0].testable and per_user.comparisons[0].significant  # the named option


def test_committed_reports_state_the_test_and_star_no_one_seed_row():
    """The regenerated paper_beauty and low_dim_beauty reports: no star on a one-seed row, the test
    named in the caption."""
    root = Path(__file__).resolve().parents[1] / "reports"
    for name in ("paper_beauty", "low_dim_beauty"):
        tables = root / name / "tables"
        if not tables.is_dir():
            pytest.skip(f"reports/{name} is not committed")
        for path in tables.glob("results_*.csv"):
            for r in read_csv(path):
                flags = {v for k, v in r.items() if k.endswith("_significant")}
                if r["n_seeds"] == "1":
                    assert "true" not in flags and flags <= {"untested", ""}, (name, r["model"], r["hidden"])
        md = (root / name / "report.md").read_text()
        assert "seed-and-user t-test" in md and "retraining is in the null" in md


def test_protocol_guard_separates_groups(report):
    assert sorted(g.comparability["train_protocol"] for g in report.groups) == ["all_positions", "prefix"]
    a, b = group_slug(report, "prefix"), group_slug(report, "all_positions")
    assert a != b
    rows_b = read_csv(report.directory / "tables" / f"results_{b}.csv")
    assert [(r["model"], r["n_seeds"]) for r in rows_b] == [("sasrec", "2"), ("ssd4rec", "1")]
    assert f"significance_{b}" not in report.tables
    assert "reference model tim4rec is absent" in report.tables[f"results_{b}"].caption
    groups = read_csv(report.directory / "tables" / "protocol_groups.csv")
    assert {g["group"] for g in groups} == {a, b}
    assert {g["train_protocol"] for g in groups} == {"prefix", "all_positions"}
    md = report.markdown.read_text()
    assert "train_protocol all_positions vs prefix" in md or "train_protocol prefix vs all_positions" in md
    # no run of one group appears in the other's table
    rows_a = read_csv(report.directory / "tables" / f"results_{a}.csv")
    assert all(r["n_seeds"] == "3" for r in rows_a)


def test_paper_comparison(report):
    rows = read_csv(report.directory / "tables" / "paper_comparison.csv")
    tim = [r for r in rows if r["model"] == "tim4rec" and r["hidden"] == "64" and r["metric"] == "hit@10"]
    assert len(tim) == 1 and tim[0]["paper_value"] == "0.3310" and tim[0]["paper_tag"] == "SEC"
    assert tim[0]["ci_over"].startswith("seeds")
    low, high, value = float(tim[0]["ci_low"]), float(tim[0]["ci_high"]), 0.3310
    assert tim[0]["inside_ci"] == ("true" if low <= value <= high else "false")
    # the paper's single run is held against a prediction interval for one run, wider than the CI
    pi_low, pi_high = float(tim[0]["pi_low"]), float(tim[0]["pi_high"])
    assert (pi_low, pi_high) == pytest.approx(
        stats.prediction_interval(_seed_values(report, "tim4rec", 64, "hit@10")), abs=1e-6
    )
    assert pi_low < low and pi_high > high
    assert tim[0]["inside_pi"] == ("true" if pi_low <= value <= pi_high else "false")
    assert "prediction interval for one run" in report.tables["paper_comparison"].caption
    assert float(tim[0]["diff"]) == pytest.approx(float(tim[0]["ours_mean"]) - value, abs=1e-6)
    # SSD4Rec* (derived) maps to ssd4rec; the one-seed all_positions row gets a CI over users
    ssd_b = [r for r in rows if r["model"] == "ssd4rec" and r["group"].startswith("ml-1m_all_positions")]
    assert ssd_b and all(r["ci_over"].startswith("users") for r in ssd_b)
    assert all(r["pi_low"] == "" and r["inside_pi"] == "" for r in ssd_b)  # no prediction interval from one seed
    assert {r["paper_tag"] for r in rows if r["model"] == "ssd4rec"} == {"DERIVED"}
    # hidden 32 has no published number
    assert not [r for r in rows if r["hidden"] == "32"]


def _seed_values(report, model, hidden, metric):
    (group,) = [g for g in report.groups if g.comparability["train_protocol"] == "prefix"]
    (row,) = [r for r in group.rows if r.model == model and r.hidden == hidden]
    return rs.row_summary(row, metric).values


# ----------------------------------------------------------------------------- figures


def test_figures_open_and_have_expected_series(report):
    from PIL import Image

    for info in report.figures.values():
        with Image.open(info.path) as image:
            assert image.format == "PNG" and image.size[0] > 100
    slug = group_slug(report, "prefix")
    hidden = report.figures[f"hidden_{slug}"]
    assert hidden.labels == [["sasrec", "ssd4rec", "tim4rec"]] * 3  # hit@10, ndcg@10, mrr@10 panels
    history = report.figures["history_low_dim-ml-1m-tim4rec"]
    assert history.labels == [["trial objective", "best so far (maximize)"]]
    assert "importance_low_dim-ml-1m-tim4rec" in report.figures
    importance = read_csv(report.directory / "tables" / "importance_low_dim-ml-1m-tim4rec.csv")
    assert sorted(r["parameter"] for r in importance) == ["hidden_size", "lr"]  # the optuna.* params
    assert math.isclose(sum(float(r["importance"]) for r in importance), 1.0, abs_tol=1e-5)
    assert importance[0]["parameter"] == "hidden_size"  # the objective depends on it by construction
    md = report.markdown.read_text()
    assert "objective_0 = valid_ndcg_at_10 (maximize)" in md and "directions recorded" in md
    assert report.figures["pareto_ap_study"].labels == [["dominated trials", "Pareto front"]]
    assert not [f for f in report.figures if f.startswith("pareto_low_dim")]  # single objective
    seq = report.figures["bench_seq_len_m1_h64"]
    assert seq.labels[0] == ["sasrec torch prefix", "ssd4rec torch prefix chunk 32"]
    chunk = report.figures["bench_chunk_m1_h64"]
    assert chunk.labels[0] == ["ssd4rec torch prefix L=50", "ssd4rec torch prefix L=200"]
    assert "bench_hidden_m1_L200" in report.figures
    html = report.html.read_text()
    assert html.count("data:image/png;base64,") == len(report.figures)
    assert "<b>" in html and "<u>" in html


def test_plot_functions_return_figures(store):
    colours = fg.ModelColours(["sasrec", "tim4rec", "othermodel"])
    assert colours("tim4rec") == fg.FIXED_COLOURS["tim4rec"] and colours("othermodel") == fg.SPARE_COLOURS[0]
    frame = pd.DataFrame(
        [
            dict(model=m, variant="", hidden=h, metric="ndcg@10", mean=0.1 + 0.01 * i + h / 1000, std=0.01, n=3)
            for i, m in enumerate(("sasrec", "tim4rec"))
            for h in (16, 32, 64)
        ]
    )
    fig = fg.metric_vs_hidden(frame, ["ndcg@10"], colours, "t")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and "hidden" in ax.get_xlabel() and "NDCG@10" in ax.get_ylabel()
    assert ax.get_legend_handles_labels()[1] == ["sasrec", "tim4rec"]
    lines = ax.get_lines()  # one mean line per model, in the legend's order
    assert [line.get_label() for line in lines] == ["sasrec", "tim4rec"]
    assert list(lines[1].get_xdata()) == [16, 32, 64] and lines[1].get_color() == fg.FIXED_COLOURS["tim4rec"]
    band = ax.collections[2]  # tim4rec's band (each model adds its band, then its lone-seed markers)
    (path,) = band.get_paths()
    assert np.isclose(path.vertices[:, 1].max(), frame["mean"].max() + 0.01)
    lone = frame.assign(n=[3, 1, 3, 3, 3, 3])  # sasrec's hidden-32 row has one seed: no band there, a hollow marker
    ax = fg.metric_vs_hidden(lone, ["ndcg@10"], colours, "t").axes[0]
    assert ax.collections[1].get_offsets().tolist() == [[32.0, lone["mean"][1]]]
    assert len(ax.collections[3].get_offsets()) == 0  # tim4rec: 3 seeds everywhere, nothing hollow
    trials = pd.DataFrame({"number": range(len(store["objective_a"])), "value": store["objective_a"]})
    fig = fg.optimisation_history(trials, "maximize", "valid ndcg@10", "t")
    best = fig.axes[0].get_lines()[1].get_ydata()
    assert list(best) == list(np.maximum.accumulate(store["objective_a"]))
    values = np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 9.0], [0.5, 1.0]])
    assert non_dominated(values, ["maximize", "minimize"]).tolist() == [True, True, True, True]
    assert non_dominated(values, ["maximize", "maximize"]).tolist() == [False, False, True, False]


# ----------------------------------------------------------------------------- determinism and CLI


def test_tables_are_byte_identical_across_runs(store, report, tmp_path):
    again = generate_report(ReportOptions(tracking_uri=store["uri"], out=tmp_path, name="fixture", n_resamples=500))
    first = sorted(p.name for p in (report.directory / "tables").iterdir())
    second = sorted(p.name for p in (again.directory / "tables").iterdir())
    assert first == second and len(first) >= 10
    for name in first:
        assert (report.directory / "tables" / name).read_bytes() == (again.directory / "tables" / name).read_bytes(), (
            name
        )
    assert report.markdown.read_text() == again.markdown.read_text()


def test_cli_report_and_errors(store, tmp_path, capsys):
    from harness.cli import main

    code = main(
        [
            "report",
            "low_dim",
            "--tracking-uri",
            store["uri"],
            "--out",
            str(tmp_path),
            "--metrics",
            "hit@10,ndcg@10",
            "--reference",
            "sasrec",
            "--test",
            "wilcoxon",
            "--no-all-pairs",
        ]
    )
    assert code == 0
    directory = tmp_path / "low_dim"
    assert (directory / "report.md").is_file() and (directory / "report.html").is_file()
    tables = sorted(p.name for p in (directory / "tables").glob("results_*.csv"))
    assert len(tables) == 1  # only study low_dim: one protocol group
    header = (directory / "tables" / tables[0]).read_text().splitlines()[0]
    assert "hit@10_mean" in header and "mrr@10_mean" not in header
    assert "Wilcoxon" in (directory / "report.md").read_text()
    assert main(["report", "no_such_study", "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 2
    assert "unknown study" in capsys.readouterr().err
    assert main(["report", "--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}", "--out", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------- pairing rules


class _FakeStore:
    def __init__(self, ranks):
        self.ranks = ranks

    def per_user_ranks(self, run):
        return self.ranks[run.run_id]


def _run(run_id, model, seed):
    return Run(
        run_id,
        "x",
        run_id,
        "FINISHED",
        0,
        {"seed": str(seed), "model.hidden_size": "64"},
        {"model": model},
        {"test_ndcg_at_10": 0.1},
    )


def test_refuses_different_user_sets_and_averages_seeds_first():
    users = np.arange(50)
    rng = np.random.default_rng(0)
    ranks = {f"{m}{s}": pd.Series(rng.integers(0, 40, 50), index=users) for m in ("a", "r") for s in (0, 1)}
    ranks["b0"] = pd.Series(rng.integers(0, 40, 49), index=np.arange(1, 50))  # a different user set
    group = rs.Group(
        "pid",
        {"dataset": "d"},
        [
            rs.Row("a", 64, "", [_run("a0", "a", 0), _run("a1", "a", 1)]),
            rs.Row("b", 64, "", [_run("b0", "b", 0)]),
            rs.Row("r", 64, "", [_run("r0", "r", 0), _run("r1", "r", 1)]),
        ],
    )
    sig = rs.compare_to_reference(group, ["ndcg@10"], "r", rs.PerUser(_FakeStore(ranks)), "ttest", 0.05)
    assert [c.row.model for c in sig.comparisons] == ["a"]
    assert any("user sets differ" in n for n in sig.notes)
    a = [per_user_metric(ranks[f"a{s}"].to_numpy(), "ndcg", 10) for s in (0, 1)]
    r = [per_user_metric(ranks[f"r{s}"].to_numpy(), "ndcg", 10) for s in (0, 1)]
    expected = stats.paired_test(np.mean(a, axis=0), np.mean(r, axis=0))
    assert sig.comparisons[0].result.p_value == pytest.approx(expected.p_value)
    assert sig.comparisons[0].result.n == 50  # users, not users x seeds
    absent = rs.compare_to_reference(group, ["ndcg@10"], "tim4rec", rs.PerUser(_FakeStore(ranks)), "ttest", 0.05)
    assert not absent.reference_present and not absent.comparisons


def _final(run_id, status, tags, metrics):
    return Run(
        run_id, "s", run_id, status, 0, {"seed": "1"}, {tc.KIND: tc.KIND_FINAL, "model": "tim4rec", **tags}, metrics
    )


def test_a_named_variant_is_its_own_row_and_never_the_reference():
    """`tim4rec-causal: {model: tim4rec, ...}` in a study is not the paper's TiM4Rec: its rows carry
    the study's name for it, so `--reference tim4rec` finds no TiM4Rec to test against."""
    tags = {tc.PROTOCOL_ID: "p", tc.MODEL: "tim4rec-causal"}
    runs = [_final(f"r{s}", "FINISHED", {**tags, tc.SEED: str(s)}, {"test_ndcg_at_10": 0.1}) for s in (1, 2)]
    runs.append(_final("s1", "FINISHED", {tc.PROTOCOL_ID: "p", "model": "sasrec"}, {"test_ndcg_at_10": 0.1}))
    (group,), _ = rs.group_runs(runs)
    assert [row.model for row in group.rows] == ["sasrec", "tim4rec-causal"]
    sig = rs.compare_to_reference(group, ["ndcg@10"], "tim4rec", rs.PerUser(_FakeStore({})), "seeds", 0.05)
    assert not sig.reference_present and not sig.comparisons
    assert rs.model_sort_key("tim4rec") < rs.model_sort_key("tim4rec-causal") < rs.model_sort_key("zzz")


def test_an_interrupted_run_with_a_finished_rerun_is_not_reported_as_stopped():
    done = {"test_ndcg_at_10": 0.1}
    runs = [
        _final("old", "KILLED", {tc.FINAL_KEY: "k1", tc.FAILURE_TAG: "interrupted"}, {}),
        _final("new", "FINISHED", {tc.FINAL_KEY: "k1"}, done),
        _final("gone", "KILLED", {tc.FINAL_KEY: "k2"}, {}),  # never rerun: a gap in the tables
        # stopped, as older stores recorded it
        _final("paused", "KILLED", {tc.FINAL_KEY: "k3", tc.FAILURE_TAG: "KeyboardInterrupt: "}, {}),
    ]
    chosen, kind, notes = rs.select_result_runs(runs, "auto")
    assert [r.run_id for r in chosen] == ["new"] and kind == "final"
    assert notes == [
        "2 run(s) stopped before their test, not in the tables: gone (KILLED), "
        "paused (KILLED: stopped by Ctrl-C or SIGTERM)",
        "1 run(s) interrupted and rerun to the end as another run, not in the tables: old (KILLED: interrupted)",
    ]


# ----------------------------------------------------------------------------- committed stores


def test_exported_store_moved_elsewhere_regenerates_the_same_tables(store, report, tmp_path):
    """`export` copies the studies into a folder that can be committed; a clone at another path
    (here: the folder renamed) regenerates byte-identical tables, per-user significance included."""
    from harness.cli import main
    from harness.store.contract import SOURCE_RUN_ID
    from harness.store.reader import Store

    exported = tmp_path / "export"
    assert main(["export", "low_dim", "ap_study", "bench", "--tracking-uri", store["uri"], "--out", str(exported)]) == 0
    moved = tmp_path / "elsewhere" / "store"
    moved.parent.mkdir()
    exported.rename(moved)
    uri = str(moved)
    copy = Store(uri)
    runs = copy.runs(copy.experiments())
    assert runs and all(SOURCE_RUN_ID in r.tags for r in runs)
    finals = [r for r in runs if r.kind == "final"]
    assert finals and all(copy.per_user_ranks(r) is not None for r in finals)
    again = generate_report(ReportOptions(tracking_uri=uri, out=tmp_path / "out", name="fixture", n_resamples=500))
    names = sorted(p.name for p in (report.directory / "tables").iterdir())
    assert names == sorted(p.name for p in (again.directory / "tables").iterdir())
    for name in names:
        assert (report.directory / "tables" / name).read_bytes() == (again.directory / "tables" / name).read_bytes(), (
            name
        )
    # an unknown study is one error line, and the previous export is left as it was
    before = _files(moved)
    assert main(["export", "nope", "--tracking-uri", store["uri"], "--out", str(moved)]) == 2
    assert _files(moved) == before


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_reexport_rewrites_only_the_runs_that_changed(store, tmp_path):
    """The committed store format grows git by the runs that changed: exporting the same runs again
    (from the store or from the export itself) gives the same bytes, and a run with one more metric
    value changes its own record only."""
    from mlflow.tracking import MlflowClient

    from harness.cli import main
    from harness.store import records

    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    assert main(["export", "low_dim", "--tracking-uri", store["uri"], "--out", str(first)]) == 0
    assert main(["export", "low_dim", "--tracking-uri", store["uri"], "--out", str(second)]) == 0
    assert main(["export", "low_dim", "--tracking-uri", str(first), "--out", str(third)]) == 0
    exported = _files(first)
    assert exported == _files(second) == _files(third)
    assert any(name.startswith(f"{records.RANKS}/low_dim/") for name in exported)
    # a copy of the fixture store, so the fixture stays as it was; with its artifacts, which a copied
    # store reads from its own folder, never from the original's
    shutil.copytree(store["root"] / "mlartifacts", tmp_path / "mlartifacts")
    scratch = tmp_path / "scratch.db"
    scratch.write_bytes((store["root"] / "mlflow.db").read_bytes())
    client = MlflowClient(f"sqlite:///{scratch}")
    run = client.search_runs(
        [client.get_experiment_by_name("low_dim").experiment_id], max_results=1, order_by=["attributes.start_time DESC"]
    )[0]
    client.log_metric(run.info.run_id, "extra", 1.0)
    changed = tmp_path / "changed"
    assert main(["export", "low_dim", "--tracking-uri", f"sqlite:///{scratch}", "--out", str(changed)]) == 0
    after = _files(changed)
    assert sorted(after) == sorted(exported)
    assert [name for name in exported if exported[name] != after[name]] == [
        f"{records.RUNS}/low_dim/{run.info.run_id}.json"
    ]


# The committed example reports and the command that made each one (reports/<name>/store is the
# exported tracking data they were generated from).
COMMITTED_REPORTS = {
    "low_dim": ["low_dim"],
    "bench_cpu": ["bench", "--name", "bench_cpu"],
    "paper_beauty": ["paper_beauty"],
    "paper_beauty_file_order": ["paper_beauty_file_order"],
    # as scripts/reproduce_beauty.sh --report writes them
    "low_dim_beauty": [
        *("paper_beauty", "low_dim_beauty", "low_dim_beauty_more"),
        *("--name", "low_dim_beauty", "--reference", "ssd4rec", "--confirm", "tim4rec"),
    ],
    "time_encoding_beauty": [
        *("paper_beauty", "time_encoding_beauty", "time_encoding_cost"),
        *("--name", "time_encoding_beauty", "--reference", "tim4rec", "--bench-experiment", "time_encoding_cost"),
    ],
    "chunk_size": [
        *("chunk_size_beauty", "chunk_size_cost"),
        *("--name", "chunk_size", "--bench-experiment", "chunk_size_cost"),
    ],
}


@pytest.mark.parametrize("name", sorted(COMMITTED_REPORTS))
def test_committed_report_regenerates_from_its_committed_store(name, tmp_path):
    from harness.cli import main
    from harness.store import records

    committed = Path(__file__).resolve().parents[1] / "reports" / name
    if records.is_records(committed / "store"):  # the text format
        uri = str(committed / "store")
    elif (committed / "store" / "mlflow.db").is_file():  # the SQLite form exported before it
        uri = f"sqlite:///{committed / 'store' / 'mlflow.db'}"
    else:
        pytest.skip(f"reports/{name} has no committed store yet")
    args = COMMITTED_REPORTS[name]
    assert main(["report", *args, "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    tables = sorted(p.name for p in (committed / "tables").iterdir())
    assert tables == sorted(p.name for p in (tmp_path / name / "tables").iterdir())
    for table in tables:
        assert (committed / "tables" / table).read_bytes() == (tmp_path / name / "tables" / table).read_bytes(), table


def test_the_committed_sqlite_form_and_its_text_export_give_the_same_tables_and_runs(tmp_path):
    """What converting a committed store does: low_dim's SQLite store exported as text regenerates
    the committed tables byte for byte, and `import` reads both forms as the same runs (importing
    the text export after the SQLite store brings nothing new)."""
    from harness.cli import main

    committed = Path(__file__).resolve().parents[1] / "reports" / "low_dim"
    if not (committed / "store" / "mlflow.db").is_file():
        pytest.skip("reports/low_dim is not in the SQLite form")
    text = tmp_path / "store"
    assert (
        main(
            [
                "export",
                "low_dim",
                "--tracking-uri",
                f"sqlite:///{committed / 'store' / 'mlflow.db'}",
                "--out",
                str(text),
            ]
        )
        == 0
    )
    assert main(["report", "low_dim", "--tracking-uri", str(text), "--out", str(tmp_path / "out")]) == 0
    for table in sorted((committed / "tables").iterdir()):
        assert table.read_bytes() == (tmp_path / "out" / "low_dim" / "tables" / table.name).read_bytes(), table.name
    local = f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}"
    from harness.store.reader import Store

    assert main(["import", str(committed / "store"), "--tracking-uri", local]) == 0
    assert main(["import", str(text), "--tracking-uri", local]) == 0
    imported = Store(local)
    assert len(imported.runs(imported.experiments())) == 61


def test_paper_protocol_includes_the_order_of_same_time_interactions():
    from harness.report.paper import protocol_matches_paper

    beauty = {
        "dataset": "amazon-beauty",
        "eval_mode": "full-ranking",
        "mask_seen": "false",
        "max_len": "50",
        "kcore": "5/5",
    }
    # RecBole's amazon-beauty file is grouped by item: the paper's runs saw each day in item order
    matches, why = protocol_matches_paper({**beauty, "tie_order": "file"})
    assert not matches and "file order" in why
    assert protocol_matches_paper({**beauty, "tie_order": "item"}) == (True, "")
    ml1m = {**beauty, "dataset": "ml-1m", "max_len": "200"}
    assert protocol_matches_paper({**ml1m, "tie_order": "file"}) == (True, "")


def test_runs_stored_before_tie_order_existed_share_a_row_with_runs_that_record_it():
    old = _run("old", "sasrec", 2020)  # no tie_order parameter: recorded before the setting existed
    new = _run("new", "sasrec", 2021)
    new.params["tie_order"] = "file"
    for run in (old, new):
        run.tags["protocol_id"] = "pid"
    groups, _ = rs.group_runs([old, new])
    assert len(groups) == 1 and len(groups[0].rows) == 1
    assert {r.run_id for r in groups[0].rows[0].runs} == {"old", "new"}
    assert groups[0].comparability["tie_order"] == "file"


def test_caption_names_the_reference_row_that_stood_in_for_a_missing_size():
    """With one reference row (ssd4rec at 64 only), rows at 16 and 32 are tested against it: the
    caption must say so instead of claiming same-size comparisons."""
    from types import SimpleNamespace as Row

    from harness.report.sections.results import partner_rule as _partner_rule

    def pair(hidden, reference_hidden):
        return Row(row=Row(hidden=hidden), reference=Row(hidden=reference_hidden))

    assert _partner_rule([pair(32, 32), pair(64, 64)]) == "same hidden size"
    assert (
        _partner_rule([pair(16, 64), pair(32, 64), pair(64, 64)])
        == "same hidden size where it has one, else its only row, hidden 64"
    )


def test_a_compiled_bench_cell_is_its_own_row():
    # `harness bench --compile eager,compiled` logs two cells on otherwise equal axes; the report
    # must not let the later one replace the other ("latest run wins" is per cell)
    from harness.report.bench_runs import bench_frame
    from harness.store.reader import Run

    def cell(run_id, start, compiled):
        params = dict(
            model="sasrec",
            backend="torch",
            hidden="64",
            seq_len="50",
            batch_size="256",
            chunk_size="",
            protocol="prefix",
            infer_batch_size="256",
            n_items="100",
            data="x",
            compile=str(compiled),
        )
        return Run(run_id, "bench", run_id, "FINISHED", start, params, {}, {"train_seqs_per_s": 1.0})

    frame = bench_frame([cell("a", 1, False), cell("b", 2, True)])
    assert sorted(frame["backend"]) == ["torch", "torch compiled"]


def test_results_table_puts_each_rows_median_seconds_per_epoch_beside_its_metrics():
    """The cost column of the committed paper_beauty results: the median over a row's final runs of
    the seconds per epoch each run recorded (issue 21: what a model costs beside what it scores)."""
    import csv
    import json
    import statistics

    committed = Path(__file__).resolve().parents[1] / "reports" / "paper_beauty"
    recorded: dict[tuple[str, str], list[float]] = {}
    for path in (committed / "store" / "runs" / "paper_beauty").glob("*.json"):
        run = json.loads(path.read_text())
        if run["tags"].get("harness.kind") != "final" or "seconds_per_epoch" not in run["metrics"]:
            continue
        key = (run["tags"]["harness.model"], str(run["params"]["model.hidden_size"]))
        recorded.setdefault(key, []).append(run["metrics"]["seconds_per_epoch"][-1][2])
    (table,) = (committed / "tables").glob("results_*.csv")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == len(recorded) == 5
    for row in rows:
        expected = statistics.median(recorded[(row["model"], row["hidden"])])
        assert float(row["seconds_per_epoch"]) == pytest.approx(expected, abs=5e-4)
