"""scripts/gpu_check.py's verdict, on this CPU machine: where CUDA is present (simulated) but an expected kernel's
library cannot be imported, the check fails instead of skipping."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from models.kernels import backends

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cuda_without_gpu_libraries(monkeypatch):
    """CUDA reported present; mamba_ssm and causal_conv1d unimportable (None in sys.modules fails the import)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "simulated CUDA device")
    # the kernel modules too: on a GPU machine an earlier test may have imported them already
    for name in ("mamba_ssm", *(module for module, _ in backends.GPU_ENTRY.values())):
        monkeypatch.setitem(sys.modules, name, None)
    for probe in (backends._register_bare_mamba_ssm, backends.gpu_backend_problem):
        probe.cache_clear()
    yield
    for probe in (backends._register_bare_mamba_ssm, backends.gpu_backend_problem):
        probe.cache_clear()


@pytest.mark.parametrize("expect", ["all", "ssd_scan", "rmsnorm_gated,ssd_scan"])
def test_missing_mamba_ssm_on_cuda_exits_nonzero(gpu_check, cuda_without_gpu_libraries, tmp_path, expect):
    out = tmp_path / "gpu_check.txt"
    status = gpu_check.main(
        ["--expect", expect, "--out", str(out), "--skip", "models", "--skip", "train", "--skip", "bench"]
    )
    assert status == 1
    table = out.read_text()
    assert "MISSING" in table and "exit status 1" in table
    assert "`from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined` failed" in table


def test_plan_marks_expected_unavailable_kernels_missing(gpu_check):
    problems = {
        "ssd_scan": None,
        "rmsnorm_gated": None,
        "selective_scan": "no selective_scan_cuda",
        "causal_conv1d": "no causal_conv1d",
    }
    to_run, rows = gpu_check.kernel_plan(("ssd_scan", "rmsnorm_gated", "causal_conv1d"), problems)
    assert to_run == ["ssd_scan", "rmsnorm_gated"]
    assert {r["name"]: r["status"] for r in rows} == {"selective_scan": "not expected", "causal_conv1d": "MISSING"}
    assert gpu_check.exit_status(rows) == 1
    assert gpu_check.exit_status([r for r in rows if r["status"] != "MISSING"]) == 0  # listed, not failing


def test_a_model_whose_expected_kernel_did_not_run_is_flagged(gpu_check):
    backends_used = {"ssd_scan": "triton", "causal_conv1d": "torch", "rmsnorm_gated": "triton"}
    assert gpu_check.kernels_not_run(backends_used, {"ssd_scan": 4, "rmsnorm_gated": 4}, ("ssd_scan",)) == []
    assert gpu_check.kernels_not_run(backends_used, {"ssd_scan": 0, "rmsnorm_gated": 4}, ("ssd_scan",)) == ["ssd_scan"]
    assert gpu_check.kernels_not_run(backends_used, {"causal_conv1d": 9}, gpu_check.KERNELS) == [
        "ssd_scan",
        "causal_conv1d",
        "rmsnorm_gated",
    ]  # on torch although expected, or never called


def test_expect_refuses_an_empty_or_unknown_list(gpu_check):
    assert gpu_check.parse_args([]).expect == gpu_check.KERNELS
    for bad in ("", "ssd", "ssd_scan,attention"):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["--expect", bad])


def test_without_cuda_nothing_is_checked(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "t.txt")]) == 2
