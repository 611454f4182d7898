"""The model benchmark: one tiny CPU cell, the axes' product and its skip rules, MLflow logging, the CLI.

No timing assertions beyond "positive": timings belong to `python -m harness bench`, not to tests.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import models
from harness.bench.cells import AXES, ModelSpec, cells, parse_model_spec, supports_chunk_size
from harness.bench.measure import BenchResult, run_benchmark
from harness.bench.present import log_rows, render_table
from harness.bench.timing import MEMORY_CPU, MEMORY_NONE
from harness.cli import main
from harness.store.contract import BENCH_METRICS
from models.sasrec import SASRec

TINY = dict(hiddens=[16], seq_lens=[8], batch_size=4, repeats=2, warmup=1, n_items=30, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: keep the tiny cells cheap and steady
    yield
    torch.set_num_threads(threads)


class _NonCausal(SASRec):
    """A stand-in for faithful TiM4Rec: not causal, so all_positions must be skipped."""

    name = "bench_test_noncausal"

    @property
    def is_causal(self) -> bool:
        return False


@pytest.fixture
def noncausal(monkeypatch):
    """Registered for one test only, so other tests never see it in models.available()."""
    from models import registry

    monkeypatch.setitem(registry._REGISTRY, _NonCausal.name, _NonCausal)
    return _NonCausal.name


def test_one_cell_gives_positive_throughput():
    result = run_benchmark(["sasrec"], **TINY)
    assert isinstance(result, BenchResult) and not result.notes
    (row,) = result.rows
    for axis in AXES:
        assert axis in row
    assert (row["model"], row["hidden"], row["seq_len"], row["batch_size"]) == ("sasrec", 16, 8, 4)
    for key in ("train_seqs_per_s", "train_positions_per_s", "infer_users_per_s", "infer_latency_ms", "train_step_ms"):
        assert row[key] > 0 and math.isfinite(row[key]), key
    assert row["train_positions_per_s"] == pytest.approx(row["train_seqs_per_s"])  # prefix: one target each
    assert row["train_step_ms_min"] <= row["train_step_ms"] <= row["train_step_ms_max"]
    assert row["memory_source"] in (MEMORY_CPU, MEMORY_NONE)
    if row["memory_source"] == MEMORY_CPU:
        assert row["peak_memory_mb"] > 0 and row["infer_peak_memory_mb"] > 0
    assert row["train_ratio"] == row["infer_ratio"] == 1.0
    assert result.machine["device"] == "cpu" and result.machine["device_name"]
    table = render_table(result)
    assert len(table.rows) == 1 and result.machine["device_name"] in str(table.caption)


def test_all_positions_counts_every_position_and_ratios():
    result = run_benchmark(["sasrec"], protocols=["prefix", "all_positions"], **TINY)
    prefix, all_positions = result.rows
    assert all_positions["protocol"] == "all_positions"
    # synthetic sequences are full length: seq_len supervised positions per sequence
    assert all_positions["train_positions_per_s"] == pytest.approx(8 * all_positions["train_seqs_per_s"])
    assert all_positions["baseline"] == prefix["baseline"] == "sasrec/auto/prefix"
    assert all_positions["train_ratio"] == pytest.approx(
        all_positions["train_positions_per_s"] / prefix["train_positions_per_s"]
    )


def test_cells_are_timed_round_by_round(monkeypatch):
    """Every cell built and warmed up first, then one timed step of each cell per round: drift of the
    machine during a run falls on every cell alike."""
    import harness.bench.measure as measure

    order = []
    timed = measure.time_round
    monkeypatch.setattr(measure, "time_round", lambda p: (order.append(p.cell.protocol), timed(p)))
    result = run_benchmark(["sasrec"], protocols=["prefix", "all_positions"], **{**TINY, "repeats": 3})
    assert order == ["prefix", "all_positions"] * 3
    assert [(r["protocol"], r["repeats"]) for r in result.rows] == [("prefix", 3), ("all_positions", 3)]


def test_invalid_combinations_are_skipped_with_a_note(noncausal):
    plan, notes = cells(
        ["sasrec", "bench_test_noncausal"], [16, 12], [8], 4, [32, 64], ["torch"], ["prefix", "all_positions"]
    )
    # chunk sizes do not multiply non-SSD models
    assert len(plan) == 2 * 2 * 2 and all(c.chunk_size is None for c in plan)
    assert any("chunk_size applies to SSD models only" in n for n in notes)
    assert not supports_chunk_size("sasrec")
    if "ssd4rec" in models.available():
        assert supports_chunk_size("ssd4rec")
    result = run_benchmark(
        ["sasrec", "bench_test_noncausal"],
        hiddens=[16, 12],
        seq_lens=[8],
        batch_size=4,
        protocols=["prefix", "all_positions"],
        repeats=1,
        warmup=0,
        n_items=30,
        device="cpu",
        backends=["torch"],
    )
    measured = {(r["model"], r["hidden"], r["protocol"]) for r in result.rows}
    assert measured == {
        ("sasrec", 16, "prefix"),
        ("sasrec", 16, "all_positions"),
        ("bench_test_noncausal", 16, "prefix"),
    }
    assert any("bench_test_noncausal" in n and "not causal" in n for n in result.notes)
    assert any("h12" in n and "divisible" in n for n in result.notes)  # 12 is not divisible by 8 heads


def test_rows_are_logged_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    result = run_benchmark(["sasrec"], **{**TINY, "repeats": 1, "warmup": 0})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run_id,) = log_rows(result.rows, result.machine, uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "bench"
    assert run.data.tags["harness.kind"] == "bench"
    assert run.data.tags["memory_source"] == result.rows[0]["memory_source"]
    assert run.data.params["model"] == "sasrec" and run.data.params["seq_len"] == "8"
    assert run.data.params["chunk_size"] == "" and run.data.params["model.hidden_size"] == "16"
    for metric in ("train_seqs_per_s", "train_positions_per_s", "infer_users_per_s", "infer_latency_ms"):
        assert run.data.metrics[metric] > 0
    assert set(run.data.metrics) <= set(BENCH_METRICS)


def test_cli(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        [
            "bench",
            "--models",
            "sasrec",
            "--hidden",
            "16",
            "--seq-len",
            "8",
            "--batch-size",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--n-items",
            "30",
            "--track",
            "--tracking-uri",
            uri,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "train seq/s" in out and "logged 1 run" in out
    assert main(["bench", "--models", "nosuchmodel"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_named_variants_are_measured_with_their_options(tmp_path, capsys):
    """`--models sasrec,sasrec-1layer=sasrec:n_layers=1`: the variant is built with its option, shown and
    logged under its name, with its registered model as the model tag."""
    assert parse_model_spec("sasrec") == ModelSpec("sasrec", "sasrec")
    assert parse_model_spec("tim4rec-log=tim4rec:time_encoding=log") == ModelSpec(
        "tim4rec-log", "tim4rec", (("time_encoding", "log"),)
    )
    assert parse_model_spec("sasrec:n_layers=1:n_heads=1").name == "sasrec-n_layers=1-n_heads=1"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["bench", "--hidden", "16", "--seq-len", "8", "--batch-size", "4", "--repeats", "1", "--warmup", "0"]
    argv += ["--n-items", "30", "--threads", "1", "--track", "--tracking-uri", uri]
    assert main([*argv, "--models", "sasrec,sasrec-1layer=sasrec:n_layers=1"]) == 0
    out = capsys.readouterr().out
    assert "sasrec-1layer" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    by_name = {r.data.params["model"]: r for r in runs}
    assert set(by_name) == {"sasrec", "sasrec-1layer"}
    assert by_name["sasrec-1layer"].data.params["model.n_layers"] == "1"
    assert by_name["sasrec"].data.params["model.n_layers"] == "2"
    assert by_name["sasrec-1layer"].data.tags["model"] == "sasrec"
    # a bad variant: one line, exit 2, nothing measured
    for bad, message in (
        ("sasrec:n_layers", "is not KEY=VALUE"),
        ("sasrec:no_such_option=1", "no_such_option"),
        ("x=sasrec:hidden_size=8", "benchmark axis"),
        ("x=nosuchmodel:n_layers=1", "unknown model"),
        ("a=sasrec:n_layers=1,a=sasrec:n_layers=2", "given twice"),
        ("sasrec=sasrec:n_layers=1", "needs a name of its own"),
    ):
        assert main([*argv, "--models", bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert len(client.search_runs([client.get_experiment_by_name("bench").experiment_id])) == 2


def test_bench_kernels_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "models.kernels.bench", None)  # as if the module were absent
    assert main(["bench-kernels"]) == 2
    assert "kernel benchmark" in capsys.readouterr().err
    monkeypatch.undo()
    try:
        import models.kernels.bench  # noqa: F401
    except ImportError:
        pytest.skip("models.kernels.bench is not importable in this checkout")
    assert main(["bench-kernels", "--help"]) == 0
    assert "--seqlen" in capsys.readouterr().out


def test_kernel_benchmark_ablates_the_scan_row_blocks_and_the_fused_loss():
    from models.kernels import bench

    rows = bench.kernel_benchmark_rows(
        batch=4, seqlen=6, hidden=8, d_state=4, head_dim=4, chunk_size=4, repeats=1, warmup=0, include_reference=False
    )
    scan = {r["backend"]: r for r in rows if r["kernel"] == "selective_scan"}
    assert set(scan) == {"torch", "torch, one row block"}
    assert all(r["median_s"] > 0 and r["ratio"] >= 1 for r in scan.values())
    assert bench.selective_scan_module._ROW_BLOCK_BYTES < 1 << 40  # restored after the ablation row
    loss = {r["backend"]: r for r in rows if r["kernel"] == "tied_cross_entropy"}
    assert set(loss) == {"torch, fused", "torch, unfused"} and min(r["ratio"] for r in loss.values()) == 1


def test_kernel_benchmark_puts_the_cpp_scan_beside_the_torch_twin():
    from models.kernels import bench, describe_backends

    if describe_backends("cpu")["selective_scan"] != "cpp":
        pytest.skip("the C++ selective scan is unavailable here (no toolchain)")
    rows = bench.kernel_benchmark_rows(
        batch=4,
        seqlen=6,
        hidden=8,
        d_state=4,
        head_dim=4,
        chunk_size=4,
        repeats=1,
        warmup=0,
        backends=("torch", "cpp"),
        include_reference=False,
    )
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], set()).add(r["backend"])
    assert by_kernel["selective_scan"] >= {"torch", "cpp"}
    assert by_kernel["ssd_scan"] >= {"torch", "cpp"}
    assert by_kernel["rmsnorm_gated"] >= {"torch", "cpp"}
    assert by_kernel["dropout"] >= {"torch", "cpp"}
    assert by_kernel["activation_dropout"] >= {"torch", "cpp"}
    assert by_kernel["tied_cross_entropy"] == {"torch, fused", "torch, unfused", "cpp, fused"}


def test_kernel_benchmark_feeds_the_scan_mambas_layouts():
    # the selective scan's case is Mamba's layouts (views of time-major storage): the oracle, the torch twin and
    # the C++ twin agree on it, so the benchmark times the same computation on every backend
    from models.kernels import bench, describe_backends
    from models.kernels.selective_scan import selective_scan, selective_scan_reference

    case = bench._selective_scan_case(3, 7, 5, 4, torch.device("cpu"), torch.Generator().manual_seed(0))
    args = bench._mamba_layouts(**case)
    assert args["u"].shape == (3, 5, 7) and args["B"].shape == (3, 4, 7) and args["u"].stride(1) == 1
    expected = selective_scan_reference(**args)
    backends = ["torch"] + (["cpp"] if describe_backends("cpu")["selective_scan"] == "cpp" else [])
    for backend in backends:
        torch.testing.assert_close(selective_scan(**args, backend=backend), expected, atol=1e-5, rtol=1e-5)
