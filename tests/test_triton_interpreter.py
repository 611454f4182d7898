"""The interpreter tier: mamba-ssm's Triton kernels, called through the harness's own backends, on CPU tensors.

Triton's interpreter (TRITON_INTERPRET=1) runs the same kernel source with numpy instead of compiling it for a
GPU. Here it checks what the harness controls: the calling conventions, shapes, strides, masks and chunk
boundaries of `ssd_scan` / `rms_norm_gated` on the "triton" backend, forward and backward, against the torch
twins. It proves nothing about compilation for a real GPU, autotuned configurations, TF32/bf16 error, races or
speed, and nothing about the compiled CUDA kernels (selective scan, causal-conv1d), which have no interpreter.
docs/gpu.md says more.

Run it with `bash .ci/triton_tier.sh` (its own environment and process: the variable must be set before triton is
imported, and triton is about 1 GB). Without TRITON_INTERPRET=1 the module is skipped, so the default suite
never imports triton; with it, a missing triton or mamba-ssm is an error, not a skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import types

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "interpreter tier: runs only under TRITON_INTERPRET=1, in its own process (bash .ci/triton_tier.sh)",
        allow_module_level=True,
    )
for _package in ("triton", "mamba_ssm", "einops"):
    if importlib.util.find_spec(_package) is None:  # find_spec: never run mamba_ssm's own __init__ here
        raise ImportError(f"the interpreter tier needs {_package}; .ci/triton_tier.sh installs it")

import torch  # noqa: E402
import triton.runtime.autotuner  # noqa: E402

import models  # noqa: E402
from models.kernels import backends  # noqa: E402
from models.kernels.rmsnorm_gated import rms_norm_gated  # noqa: E402
from models.kernels.ssd_scan import ssd_scan  # noqa: E402
from models.ssd_mixer import SSDMixer  # noqa: E402

# Largest |triton - torch| / max|torch| tolerated in float32. Seen here: about 1e-6 on outputs and 4e-6 on
# gradients (the kernels sum in a different order from the twins); a wrong argument is off by order 1.
OUT_TOL = 2e-5
GRAD_TOL = 1e-4


# ------------------------------------------------------------------------------------------------ shims
# Three stand-ins for the CUDA runtime that mamba-ssm's launch code asks for, none of them touching the
# kernels themselves; and the harness's own opt-in (backends.triton_interpreter) instead of a patch.
def _no_device_switch_for_cpu(index):
    """mamba-ssm wraps every launch in `torch.cuda.device(x.device.index)`; for a CPU tensor the index is None
    and the CPU build of torch has no CUDA to switch to. No device to select, so a no-op context."""
    return contextlib.nullcontext() if index is None else _REAL_CUDA_DEVICE(index)


def _small_sm_count(device=None):
    """The SSD backward sizes some grids by the GPU's multiprocessor count; for a CPU device give a small one
    (4) so that several programs share the work, as on a GPU, without a driver to ask."""
    if torch.device(device if device is not None else "cpu").type == "cpu":
        return types.SimpleNamespace(multi_processor_count=4, name="triton interpreter")
    return _REAL_DEVICE_PROPERTIES(device)


def _first_config_only(self, kwargs):
    """The autotuner times each configuration with a GPU benchmarker, which needs a driver. Keep the first
    configuration (one config means no benchmarking): the tier runs that tiling only, not the others."""
    return self.configs[:1]


_REAL_CUDA_DEVICE = torch.cuda.device
_REAL_DEVICE_PROPERTIES = torch.cuda.get_device_properties


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "device", _no_device_switch_for_cpu)
        patch.setattr(torch.cuda, "get_device_properties", _small_sm_count)
        patch.setattr(triton.runtime.autotuner.Autotuner, "prune_configs", _first_config_only)
        with backends.triton_interpreter():
            yield
    print(
        f"\n[interpreter tier] largest relative error vs the torch twins: outputs {WORST_SEEN['out']:.1e}, "
        f"gradients {WORST_SEEN['grad']:.1e}; calls into the Triton kernels: {backends.gpu_calls()}"
    )


# ------------------------------------------------------------------------------------------------ helpers
def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().abs().max().item()
    return (actual.detach() - expected.detach()).abs().max().item() / (scale or 1.0)


def twin_errors(call, leaves: dict[str, torch.Tensor], seed=0) -> dict[str, float]:
    """Relative errors of `call("triton", **leaves)` against `call("torch", **leaves)`: the output and the
    gradient of every leaf, for one random upstream gradient."""
    mine = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    twin = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    calls_before = dict(backends.gpu_calls())
    out = call("triton", **mine)
    expected = call("torch", **twin)
    assert backends.gpu_calls() != calls_before, "the Triton kernel was not called"
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(upstream)
    expected.backward(upstream)
    errors = {"out": _rel(out, expected)}
    for name, leaf in twin.items():
        errors["d" + name] = _rel(mine[name].grad, leaf.grad)
    return errors


WORST_SEEN = {"out": 0.0, "grad": 0.0}  # over the passing comparisons, printed when the module ends


def assert_agrees(errors: dict[str, float]) -> None:
    too_far = {k: v for k, v in errors.items() if not v <= (OUT_TOL if k == "out" else GRAD_TOL)}
    assert not too_far, f"triton vs torch beyond tolerance (out {OUT_TOL}, grads {GRAD_TOL}): {too_far}"
    WORST_SEEN["out"] = max(WORST_SEEN["out"], errors["out"])
    WORST_SEEN["grad"] = max([WORST_SEEN["grad"], *(v for k, v in errors.items() if k != "out")])


def _randn(generator, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=generator) * scale + shift


# ------------------------------------------------------------------------------------------------ imports
def test_triton_kernels_load_without_mamba_ssms_init():
    """The tier installs mamba-ssm with --no-deps, as the GPU check does: no transformers, so `import mamba_ssm`
    itself would fail; the Triton kernels still load from their own modules."""
    import sys

    assert backends.gpu_backend_problem("ssd_scan") is None
    assert backends.gpu_backend_problem("rmsnorm_gated") is None
    assert "transformers" not in sys.modules and "huggingface_hub" not in sys.modules
    problem = backends.gpu_backend_problem("selective_scan")  # the wheel has no compiled selective scan
    assert problem is not None and "selective_scan_cuda" in problem


# ------------------------------------------------------------------------------------------------ SSD scan
# (seqlen, chunk_size, nheads, ngroups, headdim, dstate, z, D, dt_bias, softplus): chunk sizes 8-64, lengths
# below, above, at and between multiples of the chunk, one and two groups, every optional input on and off.
SSD_CASES = [
    (50, 16, 2, 1, 16, 16, True, "head", True, True),
    (50, 64, 4, 2, 8, 16, False, None, False, False),
    (7, 8, 2, 1, 16, 8, False, "head", False, True),
    (64, 32, 4, 2, 8, 16, True, None, True, True),
    (37, 8, 2, 1, 8, 8, True, "channel", False, True),
    (33, 16, 4, 2, 8, 8, False, "head", True, False),
]


def ssd_leaves(seqlen, nheads, ngroups, headdim, dstate, z, D, dt_bias, softplus=True, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaves = dict(
        x=_randn(g, batch, seqlen, nheads, headdim),
        dt=_randn(g, batch, seqlen, nheads, shift=-1.0).abs(),
        A=-torch.linspace(1.0, 8.0, nheads),
        B=_randn(g, batch, seqlen, ngroups, dstate),
        C=_randn(g, batch, seqlen, ngroups, dstate),
    )
    if z:
        leaves["z"] = _randn(g, batch, seqlen, nheads, headdim)
    if D == "head":
        leaves["D"] = _randn(g, nheads)
    elif D == "channel":
        leaves["D"] = _randn(g, nheads, headdim)
    if dt_bias:  # without softplus dt + dt_bias must stay positive (a decay, not a growth)
        leaves["dt_bias"] = _randn(g, nheads, scale=0.5, shift=-2.0) if softplus else _randn(g, nheads).abs()
    return leaves


@pytest.mark.parametrize(
    "case",
    SSD_CASES,
    ids=lambda c: f"l{c[0]}-chunk{c[1]}-h{c[2]}g{c[3]}-z{c[6]:d}-D{c[7]}-bias{c[8]:d}-softplus{c[9]:d}",
)
def test_ssd_scan_matches_torch(case):
    seqlen, chunk, nheads, ngroups, headdim, dstate, z, D, dt_bias, softplus = case
    leaves = ssd_leaves(seqlen, nheads, ngroups, headdim, dstate, z, D, dt_bias, softplus)

    def call(backend, **inputs):
        return ssd_scan(**inputs, chunk_size=chunk, dt_softplus=softplus, backend=backend)

    assert_agrees(twin_errors(call, leaves))


def test_time_modulated_dt_matches_torch():
    """TiM4Rec's dt: the raw projection times a time modulation of either sign, then dt_bias and softplus inside
    the scan; gradients reach both factors through the kernel's dt gradient."""
    leaves = ssd_leaves(41, 4, 1, 8, 16, z=False, D="head", dt_bias=True, batch=1, seed=3)
    g = torch.Generator().manual_seed(4)
    leaves["dt"] = _randn(g, 1, 41, 4, scale=0.5)  # the raw projection, centred on 0 like a Linear's output
    leaves["modulation"] = _randn(g, 1, 41, 4, scale=2.0)

    def call(backend, dt, modulation, **inputs):
        return ssd_scan(dt=dt * modulation, **inputs, chunk_size=16, dt_softplus=True, backend=backend)

    errors = twin_errors(call, leaves)
    assert errors.keys() >= {"ddt", "dmodulation"}
    assert_agrees(errors)


def test_swapped_B_and_C_is_caught():
    """The check can fail: B and C swapped on the Triton side only (shapes still valid) is far beyond tolerance,
    in the output and in the gradients."""
    leaves = ssd_leaves(24, 2, 1, 8, 8, z=True, D="head", dt_bias=True, batch=1)

    def call(backend, B, C, **inputs):
        if backend == "triton":
            B, C = C, B
        return ssd_scan(B=B, C=C, **inputs, chunk_size=8, dt_softplus=True, backend=backend)

    errors = twin_errors(call, leaves)
    assert errors["out"] > 100 * OUT_TOL and errors["dB"] > 100 * GRAD_TOL
    with pytest.raises(AssertionError, match="beyond tolerance"):
        assert_agrees(errors)


class _GradientOffByOnePermille(torch.autograd.Function):
    """Identity forward, gradient scaled by 1.001: a backward error the forward cannot show."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.001


def test_gradient_error_alone_is_caught():
    """A 0.1 % error in one input's gradient, with an exact forward, is beyond the gradient tolerance."""
    leaves = ssd_leaves(12, 2, 1, 8, 8, z=False, D=None, dt_bias=False, batch=1)

    def call(backend, x, **inputs):
        x = _GradientOffByOnePermille.apply(x) if backend == "triton" else x
        return ssd_scan(x=x, **inputs, chunk_size=8, backend=backend)

    errors = twin_errors(call, leaves)
    assert errors["out"] <= OUT_TOL and errors["dx"] > GRAD_TOL
    with pytest.raises(AssertionError, match="dx"):
        assert_agrees(errors)


# ------------------------------------------------------------------------------------------------ gated norm
@pytest.mark.parametrize("gate", [True, False], ids=["z", "no-z"])
@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate-then-norm", "norm-then-gate"])
@pytest.mark.parametrize("group_size", [None, 16], ids=["one-group", "groups-of-16"])
def test_rms_norm_gated_matches_torch(gate, norm_before_gate, group_size):
    g = torch.Generator().manual_seed(1)
    leaves = dict(x=_randn(g, 3, 11, 64), weight=_randn(g, 64, scale=0.1, shift=1.0))
    if gate:
        leaves["z"] = _randn(g, 3, 11, 64)

    def call(backend, **inputs):
        return rms_norm_gated(
            **inputs, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate, backend=backend
        )

    assert_agrees(twin_errors(call, leaves))


def test_the_compiled_cuda_kernels_stay_refused_on_cpu():
    """The opt-in covers the Triton kernels only: causal-conv1d and the selective scan have no interpreter."""
    for kernel in ("causal_conv1d", "selective_scan"):
        with pytest.raises(backends.KernelBackendError, match="needs a CUDA device"):
            backends.resolve_backend(kernel, "cuda", "cpu")


# ------------------------------------------------------------------------------------------------ TiM4Rec
def _use_triton_kernels(model) -> dict[str, str]:
    """The model's Triton kernels on the "triton" backend (as set_kernel_backend does on CUDA), the compiled
    convolution on torch (the kernels without a GPU library, such as the FFN's activation_dropout, untouched)."""
    chosen = {
        k: backends.resolve_backend(k, "triton" if backends.GPU_BACKEND[k] == "triton" else "torch", "cpu")
        for k in model.kernels
        if k in backends.GPU_BACKEND
    }
    for module in model.modules():
        if isinstance(module, SSDMixer):
            module.set_backends(chosen)
    return chosen


def test_tim4rec_encoder_matches_torch():
    """Two TiM4Rec layers over every position (where the SSD scan runs on its backend, not the one-position
    torch path), time-modulated dt included: hidden states and every parameter's gradient."""
    options = dict(hidden_size=16, head_dim=8, d_state=8, chunk_size=8, num_layers=2, dropout=0.0)
    torch.manual_seed(0)
    reference = models.build("tim4rec", 40, 20, options, kernel_backend="torch")
    model = models.build("tim4rec", 40, 20, options, kernel_backend="torch")
    model.load_state_dict(reference.state_dict())
    assert _use_triton_kernels(model) == {"ssd_scan": "triton", "causal_conv1d": "torch", "rmsnorm_gated": "triton"}
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([20, 13])
    items = torch.randint(1, 41, (2, 20), generator=g) * (torch.arange(20) < lengths[:, None])
    stamps = (1.3e9 + torch.randint(0, 86400, (2, 20), generator=g).double().cumsum(1)) * (items > 0)
    calls_before = backends.gpu_calls()
    hidden = model.encode(items, stamps)
    expected = reference.encode(items, stamps)
    calls = backends.gpu_calls()
    assert calls["ssd_scan"] - calls_before["ssd_scan"] == 2  # one scan per layer ran on Triton
    assert calls["rmsnorm_gated"] - calls_before["rmsnorm_gated"] == 2
    upstream = torch.randn(expected.shape, generator=g)
    hidden.backward(upstream)
    expected.backward(upstream)
    errors = {"out": _rel(hidden, expected)}
    mine = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        if parameter.grad is not None:
            errors["d" + name] = _rel(mine[name].grad, parameter.grad)
    assert any("A_log" in k for k in errors) and any("time" in k for k in errors)
    assert_agrees(errors)


# ------------------------------------------------------------------------------------------------ gpu_check
def test_gpu_checks_kernel_table_on_the_interpreter(monkeypatch):
    """scripts/gpu_check.py's kernel section, run here on real Triton kernels with small shapes, so that the
    code the GPU run depends on is exercised before a GPU is lent: the Triton kernels come out "ok" with their
    errors and times, the compiled ones (absent here) MISSING when expected and "not expected" otherwise."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gpu_check_in_tier", Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    )
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    # one more stand-in: on the CPU there is nothing to wait for
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    shapes = {
        "ssd_scan": [dict(batch=1, seqlen=19, nheads=2, headdim=8, dstate=8, chunk=8, ngroups=2)],
        "rmsnorm_gated": [dict(batch=2, seqlen=5, dim=32)],
    }
    rows = gpu_check.check_kernels(
        torch.device("cpu"), ("ssd_scan", "rmsnorm_gated", "causal_conv1d"), shapes, repeats=1
    )
    status = {row["name"]: row["status"] for row in rows}
    assert status == {
        "ssd_scan": "ok",
        "rmsnorm_gated": "ok",
        "causal_conv1d": "MISSING",
        "selective_scan": "not expected",
    }, rows
    assert all(row["max_rel_err"] <= 1e-4 and row["ms"] > 0 for row in rows if row["status"] == "ok")
    assert gpu_check.exit_status(rows) == 1  # causal_conv1d was expected
