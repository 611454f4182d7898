"""Kernel layer: every torch backend and the C++ kernels (selective scan, convolution, TiSASRec's time
pairs) against their oracle (values and gradients, float64), causality, chunk-size invariance of the SSD scan, backend resolution, lazy imports; GPU backends against
their torch twins on CUDA."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.kernels import (
    GatedRMSNorm,
    KernelBackendError,
    causal_conv1d,
    causal_conv1d_reference,
    describe_backends,
    parse_backend_request,
    resolve_backend,
    rms_norm_gated,
    selective_scan,
    selective_scan_reference,
    ssd_scan,
    ssd_scan_at,
    ssd_scan_packed,
    ssd_scan_reference,
    tied_cross_entropy,
    tied_cross_entropy_reference,
)
from models.kernels.dropout import keep_factors as dropout_keep_factors
from models.kernels.time_pairs import (
    PairDropout,
    keep_factors,
    time_pair_context,
    time_pair_context_reference,
    time_pair_scores,
    time_pair_scores_reference,
)

# The package re-exports functions named like their modules, so reach the modules through importlib.
scan_module = importlib.import_module("models.kernels.selective_scan")
cross_entropy_module = importlib.import_module("models.kernels.cross_entropy")
backends_module = importlib.import_module("models.kernels.backends")
cpu_extension_module = importlib.import_module("models.kernels.cpu_extension")

F64 = torch.float64


def cuda_only(test):
    """GPU-only test: marked `gpu`, and skipped cleanly where CUDA is absent."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: extra threads only add synchronisation, which on a shared 2-core machine (OpenMP
    # spin-waiting against other processes) makes each small parallel op many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_blocks(monkeypatch):
    """Short blocks and segments so that small sequences cross every boundary of the selective scan, and
    one batch row per row block (on CPU), so that the row blocks are put together again every time."""
    monkeypatch.setattr(scan_module, "_BLOCK", 2)
    monkeypatch.setattr(scan_module, "_SEGMENT", 4)
    monkeypatch.setattr(scan_module, "_ROW_BLOCK_BYTES", 1)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_same_values_and_grads(fn_a, fn_b, inputs, atol=1e-10, rtol=1e-8):
    """fn_a and fn_b agree on outputs and on the gradients with respect to every tensor input."""
    a_in, b_in = _leaves(*inputs), _leaves(*inputs)
    out_a, out_b = fn_a(*a_in), fn_b(*b_in)
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    # a fixed upstream gradient: the same comparison on every run, whatever ran before on this worker
    upstream = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(0), dtype=out_a.dtype).to(out_a.device)
    grads_a = torch.autograd.grad(out_a, a_in, upstream)
    grads_b = torch.autograd.grad(out_b, b_in, upstream)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol, msg=lambda m: f"gradient of input {i}: {m}")


# ---------------------------------------------------------------------------------------------- selective scan


def _scan_inputs(batch=2, dim=3, seqlen=11, dstate=4, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(batch, dim, seqlen),
        delta=r(batch, dim, seqlen) * 0.5,
        A=-torch.rand(dim, dstate, generator=g, dtype=dtype) * 3,
        B=r(batch, dstate, seqlen),
        C=r(batch, dstate, seqlen),
        D=r(dim),
        z=r(batch, dim, seqlen),
        delta_bias=r(dim) * 0.3,
    )


# The "cpp" backend runs wherever a C++ toolchain exists; there, a failed build fails the tests.
_TOOLCHAIN_PROBLEM = cpu_extension_module._toolchain_problem()
_needs_cpp = pytest.mark.skipif(_TOOLCHAIN_PROBLEM is not None, reason=f"no C++ toolchain: {_TOOLCHAIN_PROBLEM}")


#: the CPU implementations of a kernel: the torch twin and the compiled one
CPU_TWINS = ["torch", pytest.param("cpp", marks=_needs_cpp)]


def _scan_on(backend):
    return functools.partial(selective_scan, backend=backend)


@pytest.mark.parametrize("backend", CPU_TWINS)
@pytest.mark.parametrize("seqlen", [1, 5, 11, 19])
@pytest.mark.parametrize("options", ["plain", "softplus+bias", "all"])
def test_selective_scan_matches_oracle(small_blocks, seqlen, options, backend):
    inp = _scan_inputs(seqlen=seqlen)
    names = ["u", "delta", "A", "B", "C"] + {
        "plain": [],
        "softplus+bias": ["delta_bias"],
        "all": ["delta_bias", "D", "z"],
    }[options]
    softplus = options != "plain"

    def call(fn):
        return lambda *ts: fn(**dict(zip(names, ts)), delta_softplus=softplus)

    _assert_same_values_and_grads(call(_scan_on(backend)), call(selective_scan_reference), [inp[n] for n in names])


def test_selective_scan_default_blocks_match_oracle():
    # The production block/segment sizes, with a sequence crossing two segments and ending mid-block.
    inp = _scan_inputs(batch=2, dim=4, seqlen=2 * scan_module._SEGMENT + 3, dstate=3)
    names = ["u", "delta", "A", "B", "C", "delta_bias"]
    call = lambda fn: lambda *ts: fn(**dict(zip(names, ts)), delta_softplus=True)  # noqa: E731
    _assert_same_values_and_grads(call(selective_scan), call(selective_scan_reference), [inp[n] for n in names])


def test_selective_scan_uneven_row_blocks_match_oracle(monkeypatch):
    # batch 5 in row blocks of 2, 2 and 1 (3 x 4 float64 states: 96 bytes a row)
    monkeypatch.setattr(scan_module, "_ROW_BLOCK_BYTES", 2 * 96)
    inp = _scan_inputs(batch=5, dim=3, dstate=4, seqlen=2 * scan_module._SEGMENT + 3)
    assert scan_module._row_blocks(5, 3, 4, inp["u"]) == [(0, 2), (2, 4), (4, 5)]
    torch.set_num_threads(2)  # several threads: the whole batch at once
    try:
        assert scan_module._row_blocks(5, 3, 4, inp["u"]) == [(0, 5)]
    finally:
        torch.set_num_threads(1)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    call = lambda fn: lambda *ts: fn(**dict(zip(names, ts)), delta_softplus=True)  # noqa: E731
    _assert_same_values_and_grads(call(selective_scan), call(selective_scan_reference), [inp[n] for n in names])


@pytest.mark.parametrize("backend", CPU_TWINS)
def test_selective_scan_gradcheck(small_blocks, backend):
    inp = _scan_inputs(batch=2, dim=2, seqlen=7, dstate=3)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    fn = lambda *ts: selective_scan(**dict(zip(names, ts)), delta_softplus=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, _leaves(*[inp[n] for n in names]))


@_needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_selective_scan_at_model_sizes_matches_torch_twin(threads):
    # float32 at Mamba4Rec's state size (32: whole vectors) and at 19 (a vector remainder), batch rows split
    # over threads (each slice sums its own grad_A): the C++ twin agrees with the torch twin to float rounding.
    torch.set_num_threads(threads)
    try:
        for dstate in (32, 19):
            inp = _scan_inputs(batch=5, dim=16, seqlen=50, dstate=dstate, dtype=torch.float32, seed=dstate)
            names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
            call = lambda fn: lambda *ts: fn(**dict(zip(names, ts)), delta_softplus=True)  # noqa: E731
            _assert_same_values_and_grads(
                call(_scan_on("cpp")), call(_scan_on("torch")), [inp[n] for n in names], atol=1e-4, rtol=1e-4
            )
    finally:
        torch.set_num_threads(1)


@_needs_cpp
def test_cpp_selective_scan_vector_loops_match_oracle_and_restore_the_fpu_mode():
    # float64 with dstate 19: two whole AVX-512 vectors of doubles and a remainder, against the oracle.
    inp = _scan_inputs(batch=3, dim=4, seqlen=13, dstate=19, seed=19)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    call = lambda fn: lambda *ts: fn(**dict(zip(names, ts)), delta_softplus=True)  # noqa: E731
    _assert_same_values_and_grads(call(_scan_on("cpp")), call(selective_scan_reference), [inp[n] for n in names])
    # The kernel flushes subnormals only while it runs: afterwards this thread keeps them.
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


@_needs_cpp
def test_cpp_selective_scan_reads_mambas_layouts_in_place():
    # Mamba's own layouts: u, delta and z transposed views of [batch, seqlen, channels] storage (z and x halves of
    # one projection), B and C [batch, dstate, seqlen] views of one [batch, seqlen, dt_rank + 2 dstate] output;
    # some step sizes past softplus's threshold (20), where it is the identity. Values and every gradient match
    # the oracle, and the gradients of the transposed views come back in their storage order.
    batch, dim, seqlen, dstate = 3, 5, 9, 4
    g = torch.Generator().manual_seed(7)
    xz = torch.randn(batch, seqlen, 2 * dim, generator=g, dtype=F64)
    projected = torch.randn(batch, seqlen, 1 + 2 * dstate, generator=g, dtype=F64)
    delta_storage = torch.randn(batch, seqlen, dim, generator=g, dtype=F64) * 12
    A = -torch.rand(dim, dstate, generator=g, dtype=F64) * 3
    D, delta_bias = torch.randn(dim, generator=g, dtype=F64), torch.randn(dim, generator=g, dtype=F64)
    leaves = _leaves(xz, projected, delta_storage, A, D, delta_bias)

    def views(xz, projected, delta_storage):
        u, z = xz.transpose(1, 2).chunk(2, dim=1)
        _, B, C = torch.split(projected, [1, dstate, dstate], dim=-1)
        return u, delta_storage.transpose(1, 2), z, B.transpose(1, 2), C.transpose(1, 2)

    u, delta, z, B, C = views(*leaves[:3])
    assert u.stride(1) == 1 and B.stride(1) == 1 and not B.is_contiguous()
    y = _scan_on("cpp")(u, delta, leaves[3], B, C, leaves[4], z, leaves[5], delta_softplus=True)
    reference = [t.detach().clone().requires_grad_() for t in leaves]
    u_r, delta_r, z_r, B_r, C_r = (t.contiguous() for t in views(*reference[:3]))
    y_ref = selective_scan_reference(u_r, delta_r, reference[3], B_r, C_r, reference[4], z_r, reference[5], True)
    assert (delta_r + reference[5][:, None] > 20).any()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    assert y.transpose(1, 2).is_contiguous()  # [batch, seqlen, dim] storage, as out_proj reads it
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, [delta, *leaves], upstream)
    for i, (ours, ref) in enumerate(zip(grads[1:], torch.autograd.grad(y_ref, reference, upstream))):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8, msg=lambda m: f"gradient of input {i}: {m}")
    assert grads[0].transpose(1, 2).is_contiguous()  # delta's gradient in delta's storage order


@_needs_cpp
def test_cpp_selective_scan_channel_blocks_and_edge_shapes():
    # 37 channels: two whole blocks of 16 and a partial one; one state; against the oracle in float64
    inp = _scan_inputs(batch=2, dim=37, seqlen=6, dstate=1, seed=3)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    call = lambda fn: lambda *ts: fn(**dict(zip(names, ts)), delta_softplus=True)  # noqa: E731
    _assert_same_values_and_grads(call(_scan_on("cpp")), call(selective_scan_reference), [inp[n] for n in names])
    # empty batch, sequence or state: empty results and gradients, as on the torch twin
    for batch, seqlen, dstate in ((0, 5, 3), (2, 0, 3), (2, 5, 0)):
        empty = _leaves(*_scan_inputs(batch=batch, dim=4, seqlen=seqlen, dstate=dstate).values())
        y = _scan_on("cpp")(**dict(zip(_scan_inputs().keys(), empty)), delta_softplus=True)
        assert y.shape == (batch, 4, seqlen)
        y.sum().backward()


@_needs_cpp
def test_cpp_selective_scan_gate_and_softplus_at_extreme_inputs_in_float32():
    # a gate far below -88.7 (where exp(-z) overflows float32) gives silu -0, not NaN; step sizes far past the
    # softplus threshold and far below zero stay finite, values and gradients, as on the torch twin. 20 channels:
    # a whole vector of 16, where the vectorised code runs, and a remainder
    inp = _scan_inputs(batch=2, dim=20, seqlen=5, dstate=4, dtype=torch.float32, seed=5)
    inp["z"][0, 0] = -1000.0
    inp["z"][1, 1] = 1000.0
    inp["z"][1, 17] = -100.0
    inp["delta"][0, 2] = 500.0
    inp["delta"][1, 0] = -500.0
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    call = lambda fn: lambda *ts: fn(**dict(zip(names, ts)), delta_softplus=True)  # noqa: E731
    _assert_same_values_and_grads(
        call(_scan_on("cpp")), call(_scan_on("torch")), [inp[n] for n in names], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("backend", CPU_TWINS)
def test_selective_scan_partial_requires_grad(small_blocks, backend):
    # Only some inputs need gradients: the hand-written backward skips the rest and must stay exact.
    inp = _scan_inputs(seqlen=9)
    B = inp["B"].clone().requires_grad_()
    delta_bias = inp["delta_bias"].clone().requires_grad_()
    args = dict(u=inp["u"], delta=inp["delta"], A=inp["A"], C=inp["C"], delta_softplus=True)
    y = selective_scan(**args, B=B, delta_bias=delta_bias, backend=backend)
    y_ref = selective_scan_reference(**args, B=B, delta_bias=delta_bias)
    g = torch.randn_like(y)
    for ours, ref in zip(torch.autograd.grad(y, [B, delta_bias], g), torch.autograd.grad(y_ref, [B, delta_bias], g)):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("backend", CPU_TWINS)
def test_selective_scan_without_grad_and_in_half_precision(small_blocks, backend):
    inp = _scan_inputs(seqlen=10, dtype=torch.float32)
    with torch.no_grad():
        y = selective_scan(**inp, delta_softplus=True, backend=backend)
    torch.testing.assert_close(y, selective_scan_reference(**inp, delta_softplus=True), atol=1e-5, rtol=1e-5)
    half = {k: v.to(torch.bfloat16) for k, v in inp.items()}
    y_half = selective_scan(**half, delta_softplus=True, backend=backend)
    assert y_half.dtype == torch.bfloat16
    torch.testing.assert_close(y_half.float(), y, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", CPU_TWINS)
def test_selective_scan_leaves_inputs_untouched(backend):
    # delta passed as a transposed view of time-major storage: the scan must not update it in place.
    inp = _scan_inputs(seqlen=6)
    time_major = inp["delta"].permute(2, 0, 1).contiguous()
    before = time_major.clone()
    selective_scan(**{**inp, "delta": time_major.permute(1, 2, 0)}, delta_softplus=True, backend=backend)
    assert torch.equal(time_major, before)


# -------------------------------------------------------------------------------------------------- SSD scan


def _ssd_inputs(batch=2, seqlen=37, nheads=4, headdim=3, ngroups=2, dstate=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(
        x=r(batch, seqlen, nheads, headdim),
        dt=r(batch, seqlen, nheads) * 0.5,
        A=-torch.rand(nheads, generator=g, dtype=F64) * 4 - 0.1,
        B=r(batch, seqlen, ngroups, dstate),
        C=r(batch, seqlen, ngroups, dstate),
        D=r(nheads),
        z=r(batch, seqlen, nheads, headdim),
        dt_bias=r(nheads) * 0.3,
    )


@pytest.mark.parametrize("backend", CPU_TWINS)
@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.parametrize("chunk_size", [4, 16, 32], ids=["6-chunks", "2-chunks", "1-chunk"])
def test_ssd_scan_matches_oracle(ngroups, chunk_size, backend):
    inp = _ssd_inputs(seqlen=21, ngroups=ngroups)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]
    scan = functools.partial(ssd_scan, backend=backend)
    call = lambda fn: lambda *ts: fn(**dict(zip(names, ts)), chunk_size=chunk_size, dt_softplus=True)  # noqa: E731
    _assert_same_values_and_grads(call(scan), call(ssd_scan_reference), [inp[n] for n in names])


@pytest.mark.parametrize("backend", CPU_TWINS)
def test_ssd_scan_per_channel_skip_and_no_options(backend):
    inp = _ssd_inputs(seqlen=13, ngroups=1)
    D = torch.randn(4, 3, dtype=F64)  # D per (head, headdim)
    names = ["x", "dt", "A", "B", "C"]
    scan = functools.partial(ssd_scan, backend=backend)
    call = lambda fn: lambda *ts: fn(*ts[:5], D=ts[5], chunk_size=8)  # noqa: E731
    _assert_same_values_and_grads(call(scan), call(ssd_scan_reference), [inp[n] for n in names] + [D])
    plain = scan(*[inp[n] for n in names], chunk_size=5)
    torch.testing.assert_close(plain, ssd_scan_reference(*[inp[n] for n in names]))


@_needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_ssd_scan_cpp_at_model_sizes_matches_the_torch_twin(threads):
    # float32 at TiM4Rec's sizes (4 heads of 32, dstate 32, L = 50), rows split over threads (each slice sums its
    # own grad_A): values and every gradient against the chunked torch twin.
    torch.set_num_threads(threads)
    try:
        inp = {k: v.float() for k, v in _ssd_inputs(batch=6, seqlen=50, headdim=32, ngroups=1, dstate=32).items()}
        names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]
        results = []
        for backend in ("torch", "cpp"):
            leaves = _leaves(*[inp[n] for n in names])
            y = ssd_scan(**dict(zip(names, leaves)), chunk_size=32, dt_softplus=True, backend=backend)
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            results.append((y.detach(), [t.grad for t in leaves]))
        (y_torch, grads_torch), (y_cpp, grads_cpp) = results
        torch.testing.assert_close(y_cpp, y_torch, atol=1e-4, rtol=1e-4)
        for name, a, b in zip(names, grads_cpp, grads_torch):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    finally:
        torch.set_num_threads(1)


def _prefix_upstream(shape, time_dim, lengths, seed):
    """An upstream gradient that is zero from step lengths[b] on in row b (what prefix training sends a causal
    model's scans), one of those zeros negative."""
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(*shape, generator=g, dtype=F64)
    steps = torch.arange(shape[time_dim]).view([-1 if d == time_dim else 1 for d in range(len(shape))])
    past = steps >= torch.tensor(lengths).view([-1] + [1] * (len(shape) - 1))
    upstream = upstream.masked_fill(past, 0.0)
    upstream.view(-1)[past.expand(shape).flatten().nonzero()[0]] = -0.0
    return upstream, past.expand(shape)


@_needs_cpp
@pytest.mark.parametrize("scan", ["selective", "ssd"])
def test_cpp_scans_stop_at_each_rows_last_output_gradient(scan):
    # The backward passes visit a row's steps only up to its last nonzero output gradient (rows of lengths 0 to
    # full here): the gradients still match the oracle's everywhere, the per-step ones are exact zeros past it, and
    # a NaN at a row's last step still reaches that row's gradients.
    lengths = [7, 0, 13, 1]
    if scan == "selective":
        inp = _scan_inputs(batch=4, dim=19, seqlen=13, dstate=5, seed=3)  # 19 channels: a block and a remainder
        names, time_dim, per_step = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], 2, ["u", "delta", "z"]
        call = lambda fn, ts: fn(**dict(zip(names, ts)), delta_softplus=True)  # noqa: E731
        cpp, oracle = _scan_on("cpp"), selective_scan_reference
    else:
        inp = _ssd_inputs(batch=4, seqlen=13, ngroups=2, seed=3)
        names, time_dim, per_step = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"], 1, ["x", "dt", "z"]
        call = lambda fn, ts: fn(**dict(zip(names, ts)), chunk_size=4, dt_softplus=True)  # noqa: E731
        cpp, oracle = functools.partial(ssd_scan, backend="cpp"), ssd_scan_reference
    values = [inp[n] for n in names]
    out = call(oracle, values)
    upstream, past = _prefix_upstream(out.shape, time_dim, lengths, seed=4)
    grads = {}
    for name, fn in (("cpp", cpp), ("oracle", oracle)):
        leaves = _leaves(*values)
        grads[name] = dict(zip(names, torch.autograd.grad(call(fn, leaves), leaves, upstream)))
    for n in names:
        torch.testing.assert_close(
            grads["cpp"][n], grads["oracle"][n], atol=1e-10, rtol=1e-8, msg=lambda m: f"{n}: {m}"
        )
    for n in per_step:  # the same [batch, ...time...] layout as the output (dt: without the head dimension)
        grad = grads["cpp"][n]
        dropped = past if grad.shape == past.shape else past[..., 0]
        assert torch.equal(grad[dropped], torch.zeros_like(grad[dropped])), n
    # a NaN at row 0's last step: row 0's gradients are NaN, the other rows' untouched
    upstream_nan = upstream.clone()
    upstream_nan.select(time_dim, lengths[0] - 1)[0] = float("nan")
    leaves = _leaves(*values)
    first = torch.autograd.grad(call(cpp, leaves), leaves[0], upstream_nan)[0]
    assert first[0].isnan().any() and not first[1:].isnan().any()
    torch.testing.assert_close(first[1:], grads["cpp"][names[0]][1:], atol=0, rtol=0)


@_needs_cpp
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("skip", ["none", "per-head", "per-channel"])
def test_ssd_scan_packed_matches_the_split_scan(ngroups, skip):
    # x, B and C packed as the column blocks of one xBC (an SSD block's convolved projection; here a column slice
    # of a wider tensor, which the C++ path first makes contiguous): the C++ twin reads the blocks in place, adds
    # the skip D x itself and returns one gradient for xBC; the torch twin splits and scans. Same values and
    # gradients, the skip's included.
    inp = _ssd_inputs(batch=3, seqlen=9, nheads=4, headdim=3, ngroups=ngroups, dstate=5, seed=5)
    extra = torch.randn(3, 9, 2, dtype=F64)
    wide = torch.cat([inp["x"].flatten(2), inp["B"].flatten(2), inp["C"].flatten(2), extra], dim=-1)
    D = {"none": None, "per-head": inp["D"], "per-channel": torch.randn(4, 3, dtype=F64)}[skip]

    def scan(backend):
        def run(wide, dt, A, dt_bias, *D):
            options = dict(nheads=4, ngroups=ngroups, dstate=5, chunk_size=4, dt_bias=dt_bias, dt_softplus=True)
            return ssd_scan_packed(wide[..., :-2], dt, A, D=D[0] if D else None, backend=backend, **options)

        return run

    tensors = [wide, inp["dt"], inp["A"], inp["dt_bias"]] + ([D] if D is not None else [])
    _assert_same_values_and_grads(scan("cpp"), scan("torch"), tensors)
    with pytest.raises(ValueError, match="do not hold x for 5 heads"):
        ssd_scan_packed(wide, inp["dt"], inp["A"], nheads=5, ngroups=ngroups, dstate=5, chunk_size=4, backend="cpp")


def test_ssd_scan_chunk_size_invariance():
    inp = _ssd_inputs(seqlen=37)
    outputs = [ssd_scan(**inp, chunk_size=c, dt_softplus=True) for c in (1, 4, 8, 16, 37, 64)]
    for y in outputs[1:]:
        torch.testing.assert_close(y, outputs[0], atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("backend", CPU_TWINS)
def test_ssd_scan_float32_and_gradcheck(backend):
    inp = _ssd_inputs(seqlen=9, nheads=2, headdim=2, ngroups=1, dstate=3)
    y32 = ssd_scan(**{k: v.float() for k, v in inp.items()}, chunk_size=4, dt_softplus=True, backend=backend)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ssd_scan_reference(**inp, dt_softplus=True), atol=1e-5, rtol=1e-5)
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
    fn = lambda *ts: ssd_scan(**dict(zip(names, ts)), chunk_size=4, dt_softplus=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, _leaves(*[inp[n] for n in names]))


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("per_channel_D", [False, True])
def test_ssd_scan_at_one_position_matches_oracle(ngroups, per_channel_D):
    """The last-position scan (what a causal model's last layer reads in prefix training and evaluation)
    against the per-step oracle at each row's own position, values and gradients, every input."""
    inp = _ssd_inputs(batch=5, seqlen=23, ngroups=ngroups)
    at = torch.tensor([0, 22, 7, 13, 1])
    D = torch.randn(4, 3, dtype=F64) if per_channel_D else inp["D"]
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
    values = [inp[n] for n in names[:5]] + [D, inp["dt_bias"]]

    def oracle(*ts):
        y = ssd_scan_reference(**dict(zip(names, ts)), dt_softplus=True)
        return y[torch.arange(len(at)), at]

    def at_scan(*ts):
        return ssd_scan_at(*ts[:5], at, D=ts[5], dt_bias=ts[6], dt_softplus=True)

    _assert_same_values_and_grads(at_scan, oracle, values)


def test_ssd_scan_at_without_options_and_in_float32():
    inp = _ssd_inputs(batch=3, seqlen=9, ngroups=1)
    at = torch.tensor([8, 0, 4])
    plain = ssd_scan_at(*[inp[n] for n in ("x", "dt", "A", "B", "C")], at)
    torch.testing.assert_close(
        plain, ssd_scan_reference(*[inp[n] for n in ("x", "dt", "A", "B", "C")])[torch.arange(3), at]
    )
    y32 = ssd_scan_at(*[inp[n].float() for n in ("x", "dt", "A", "B", "C")], at)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), plain, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- cross-entropy


def _ce_inputs(rows=11, classes=13, dim=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, dtype=dtype)
    table = torch.randn(classes, dim, generator=g, dtype=dtype) * 3  # peaked softmax: large logits
    targets = torch.randint(0, classes, (rows,), generator=g)
    return hidden, table, targets


@pytest.mark.parametrize("backend", CPU_TWINS)
@pytest.mark.parametrize("block_bytes", [1, 3 * 13 * 8, 1 << 20], ids=["one-row", "uneven", "one-block"])
def test_fused_cross_entropy_matches_torch(monkeypatch, block_bytes, backend):
    # 11 rows in blocks of 1, of 3 (3+3+3+2) and all at once
    monkeypatch.setattr(cross_entropy_module, "_ROW_BLOCK_BYTES", block_bytes)
    hidden, table, targets = _ce_inputs()
    _assert_same_values_and_grads(
        lambda h, w: tied_cross_entropy(h, w, targets, backend),
        lambda h, w: torch.nn.functional.cross_entropy(h @ w.t(), targets),
        [hidden, table],
    )


@pytest.mark.parametrize("backend", CPU_TWINS)
def test_fused_cross_entropy_float32_gradcheck_and_partial_grads(monkeypatch, backend):
    monkeypatch.setattr(cross_entropy_module, "_ROW_BLOCK_BYTES", 1)
    hidden, table, targets = _ce_inputs(rows=64, classes=300, dim=8, dtype=torch.float32)
    _assert_same_values_and_grads(
        lambda h, w: tied_cross_entropy(h, w, targets, backend),
        lambda h, w: torch.nn.functional.cross_entropy(h @ w.t(), targets),
        [hidden, table],
        atol=1e-6,
        rtol=1e-5,
    )
    h64, w64, t64 = _ce_inputs(rows=4, classes=7, dim=3)
    assert torch.autograd.gradcheck(lambda h, w: tied_cross_entropy(h, w, t64, backend), _leaves(h64, w64))
    # a frozen table gets no gradient, the hidden states still do; the inputs are left as they were
    h, w = _leaves(hidden)[0], table.clone()
    tied_cross_entropy(h, w, targets, backend).backward()
    assert h.grad is not None and torch.equal(w, table)


@pytest.mark.parametrize("backend", CPU_TWINS)
def test_fused_cross_entropy_scales_its_gradients_and_skips_unwanted_ones(monkeypatch, backend):
    # The gradients are computed in the forward pass: backward scales them by the upstream gradient (here 3, of a
    # loss used twice), non-contiguous inputs give the same values, and without grad mode nothing is kept.
    monkeypatch.setattr(cross_entropy_module, "_ROW_BLOCK_BYTES", 3 * 13 * 8)
    hidden, table, targets = _ce_inputs()
    _assert_same_values_and_grads(
        lambda h, w: (
            2 * tied_cross_entropy(h.t().contiguous().t(), w.t().contiguous().t(), targets, backend)
            + tied_cross_entropy(h, w, targets, backend)
        ),
        lambda h, w: 3 * torch.nn.functional.cross_entropy(h @ w.t(), targets),
        [hidden, table],
    )
    # which gradients the forward pass computes: only those backward can be asked for
    wanted = []
    real_apply = cross_entropy_module._FusedTiedCrossEntropy.apply
    monkeypatch.setattr(
        cross_entropy_module._FusedTiedCrossEntropy, "apply", lambda *a: wanted.append(a[3:5]) or real_apply(*a)
    )
    h, w = _leaves(hidden, table)
    with torch.no_grad():
        loss = tied_cross_entropy(h, w, targets, backend)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(hidden @ table.t(), targets))
    tied_cross_entropy(hidden, table, targets, backend)
    tied_cross_entropy(h, table, targets, backend).backward()
    tied_cross_entropy(hidden, w, targets, backend).backward()  # the table's gradient alone
    assert wanted == [(False, False), (False, False), (True, False), (False, True)]
    expected = _leaves(table)[0]
    torch.nn.functional.cross_entropy(hidden @ expected.t(), targets).backward()
    torch.testing.assert_close(w.grad, expected.grad)
    # no second derivative: refused, not silently zero
    h = _leaves(hidden)[0]
    (grad,) = torch.autograd.grad(tied_cross_entropy(h, table, targets, backend), h)
    assert grad.shape == h.shape
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(tied_cross_entropy(h, table, targets, backend), h, create_graph=True)


@_needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_cross_entropy_cpp_rows_over_threads_restore_the_fpu_mode(monkeypatch, threads):
    # 37 rows in one block, split over threads by the C++ row pass; afterwards this thread keeps subnormals.
    torch.set_num_threads(threads)
    try:
        hidden, table, targets = _ce_inputs(rows=37, classes=300, dim=8, dtype=torch.float32)
        _assert_same_values_and_grads(
            lambda h, w: tied_cross_entropy(h, w, targets, "cpp"),
            lambda h, w: torch.nn.functional.cross_entropy(h @ w.t(), targets),
            [hidden, table],
            atol=1e-6,
            rtol=1e-5,
        )
    finally:
        torch.set_num_threads(1)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


@_needs_cpp
def test_cross_entropy_cpp_rows_flush_underflow_and_refuse_bad_targets():
    # The C++ row pass: a probability below float32's normal range comes out 0 (flushed), never subnormal; the
    # loss of a far-off target stays finite (logsumexp, not log of a probability); a target out of range is an
    # error, not a write outside the row.
    kernel = cpu_extension_module.cpu_extension("cross_entropy")
    scores = torch.tensor([[0.0, -95.0, -200.0, 5.0]])
    expected_loss = torch.logsumexp(scores.double(), 1) - scores.double()[:, 2]
    losses = kernel.softmax_grad(scores, torch.tensor([2]))
    torch.testing.assert_close(losses.double(), expected_loss)
    assert scores[0, 1] == 0 and scores[0, 2] == -1  # exp(-100) is subnormal in float32: flushed
    with pytest.raises(RuntimeError, match="target 4 out of range for 4 classes"):
        kernel.softmax_grad(torch.zeros(1, 4), torch.tensor([4]))


def test_cross_entropy_off_the_fused_path_and_bad_shapes():
    hidden, table, targets = _ce_inputs(dtype=torch.bfloat16)  # half precision: torch's kernels, in float32
    loss = tied_cross_entropy(hidden, table, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, tied_cross_entropy_reference(hidden, table, targets))
    with pytest.raises(ValueError, match="expected hidden"):
        tied_cross_entropy(hidden, table[:, :2], targets)
    with pytest.raises(ValueError, match="expected targets"):
        tied_cross_entropy(hidden, table, targets[:3])


# ------------------------------------------------------------------------------------- convolution and norm


@pytest.mark.parametrize("backend", CPU_TWINS)
# 1: TiM4Rec's time path at one head, a [batch, 1, L] input; 3: few channels, both read along time by the C++ twin;
# 19: the SSD blocks' layout (a transposed [batch, L, channels] tensor), read time-major by the C++ twin
@pytest.mark.parametrize("channels", [1, 3, 19])
@pytest.mark.parametrize("seqlen", [1, 2, 9])  # 1 and 2: shorter than the widest kernel
@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu", "hardswish"])
# the convolution's bias, and a bias of its input too (the SSD block's projection bias, folded into the C++ twin's)
@pytest.mark.parametrize("biases", ["none", "bias", "input bias", "bias and input bias"])
def test_causal_conv1d_matches_oracle(width, activation, biases, seqlen, channels, backend):
    g = torch.Generator().manual_seed(width)
    shapes = ((2, seqlen, channels), (channels, width), (channels,), (channels,))
    x, w, b, input_bias = (torch.randn(*s, generator=g, dtype=F64) for s in shapes)
    x = x.transpose(1, 2) if channels > 3 else x.transpose(1, 2).contiguous()

    def conv(x, w, b=None, input_bias=None):
        return causal_conv1d(x, w, b, activation, input_bias=input_bias, backend=backend)

    def oracle(x, w, b=None, input_bias=None):  # the definition: the bias added to x, zeros before it
        return causal_conv1d_reference(x if input_bias is None else x + input_bias[:, None], w, b, activation)

    given = {"none": (), "bias": ("b",), "input bias": ("input_bias",), "bias and input bias": ("b", "input_bias")}
    names = given[biases]

    def call(fn):
        return lambda x, w, *rest: fn(x, w, **dict(zip(names, rest)))

    _assert_same_values_and_grads(
        call(conv), call(oracle), [x, w, *({"b": b, "input_bias": input_bias}[n] for n in names)]
    )


@_needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_causal_conv1d_at_model_sizes_and_layouts_matches_torch_twin(threads):
    # float32 at TiM4Rec's channel counts (192 at hidden 64: whole vectors; 21: a remainder; 1: its time path, run
    # along time), x in the callers' layout (a transposed column block of a projection's output, used in place,
    # so one channel has a time stride of 8) and contiguous, the rows split over threads (each slice sums its own
    # weight gradient). The comparison clones x dense: test_cpp_convolution_reads_the_callers_layout_in_place
    # compares values and gradients read through the callers' strides.
    torch.set_num_threads(threads)
    try:
        for dim in (192, 21, 1):
            g = torch.Generator().manual_seed(dim)
            projection = torch.randn(5, 50, dim + 7, generator=g)
            w, b = torch.randn(dim, 4, generator=g), torch.randn(dim, generator=g)
            for x in (projection[..., 3 : 3 + dim].transpose(1, 2), projection[..., :dim].transpose(1, 2).contiguous()):
                for activation in (None, "silu", "hardswish"):
                    call = lambda be: lambda *ts: causal_conv1d(*ts, activation=activation, backend=be)  # noqa: E731
                    # atol 5e-5: the weight and bias gradients sum 250 float32 products, summed in another order
                    # by each twin (a draw of upstream gradients once put one bias gradient 1.4e-5 apart)
                    _assert_same_values_and_grads(call("cpp"), call("torch"), [x, w, b], atol=5e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(1)


@_needs_cpp
def test_cpp_convolution_reads_the_callers_layout_in_place(monkeypatch):
    # The SSD and Mamba blocks hand the convolution a transposed column block of a projection's output (read
    # time-major), TiM4Rec's time path a few channels (read along time, here a time-strided view): the C++ kernel
    # reads either where it lies (a copy each way per call would cost a pass over the tensor), and gets the torch
    # twin's values and gradients there.
    from models.ssd_mixer import depthwise_causal_conv

    extension, seen = cpu_extension_module.cpu_extension("causal_conv1d"), []

    class Recording:
        def __getattr__(self, name):
            def call(x, *rest):
                seen.append((name, x.data_ptr()))
                return getattr(extension, name)(x, *rest)

            return call

    monkeypatch.setattr(importlib.import_module("models.kernels.causal_conv"), "cpu_extension", lambda _: Recording())
    projection = torch.randn(2, 9, 14, dtype=F64)
    cases = [  # (the callers' view of the projection, its channels, activation)
        (lambda p: p[..., 2:12].transpose(1, 2), 10, "silu"),
        (lambda p: p[:, ::2, 1:4].transpose(1, 2), 3, "hardswish"),
    ]
    for view, channels, activation in cases:
        conv = torch.nn.Conv1d(channels, channels, 4, groups=channels, padding=3, dtype=F64)
        results = []
        for backend in ("cpp", "torch"):
            leaf = projection.clone().requires_grad_()
            conv.zero_grad()
            out = depthwise_causal_conv(view(leaf), conv, activation, backend, input_bias=conv.bias * 0.5)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out))
            results.append((out.detach().clone(), leaf.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
            out.add_(1.0)  # the result is the callers' to modify in place
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    assert [name for name, _ in seen] == ["forward", "backward", "forward_along_time", "backward_along_time"]
    leaf = projection.clone()
    seen.clear()
    for view, channels, activation in cases:
        conv = torch.nn.Conv1d(channels, channels, 4, groups=channels, padding=3, dtype=F64)
        depthwise_causal_conv(view(leaf), conv, activation, "cpp")
    assert seen == [("forward", leaf[..., 2:12].data_ptr()), ("forward_along_time", leaf[..., 1:4].data_ptr())]


@_needs_cpp
def test_cpp_causal_conv1d_runs_other_dtypes_on_the_torch_twin():
    x, w, b = torch.randn(2, 3, 6, dtype=torch.bfloat16), torch.randn(3, 4), torch.randn(3)
    out = causal_conv1d(x, w.bfloat16(), b.bfloat16(), "silu", backend="cpp")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, causal_conv1d(x, w.bfloat16(), b.bfloat16(), "silu", backend="torch"))


def test_causal_conv1d_swish_is_silu_and_rejects_unknown_activation():
    x, w = torch.randn(1, 2, 5, dtype=F64), torch.randn(2, 3, dtype=F64)
    torch.testing.assert_close(causal_conv1d(x, w, activation="swish"), causal_conv1d(x, w, activation="silu"))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")


def _rms_norm_oracle(x, weight, z, eps, group_size, norm_before_gate):
    """The definition, one group at a time."""
    if z is not None and not norm_before_gate:
        x = x * z * torch.sigmoid(z)
    size = group_size or x.shape[-1]
    parts = []
    for start in range(0, x.shape[-1], size):
        part = x[..., start : start + size]
        parts.append(part / torch.sqrt((part**2).mean(-1, keepdim=True) + eps))
    y = torch.cat(parts, dim=-1) * weight
    if z is not None and norm_before_gate:
        y = y * z * torch.sigmoid(z)
    return y


@pytest.mark.parametrize("backend", CPU_TWINS)
@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_rms_norm_gated_matches_definition(group_size, norm_before_gate, gated, backend):
    g = torch.Generator().manual_seed(1)
    x, w, z = (torch.randn(*s, generator=g, dtype=F64) for s in ((2, 5, 8), (8,), (2, 5, 8)))
    inputs = [x, w, z] if gated else [x, w]
    norm = functools.partial(rms_norm_gated, backend=backend)

    def call(fn):
        return lambda x, w, z=None: fn(x, w, z, 1e-6, group_size, norm_before_gate)

    _assert_same_values_and_grads(call(norm), call(_rms_norm_oracle), inputs)


@_needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_gated_cpp_at_model_sizes_matches_the_torch_twin(threads):
    # float32 at the SSD models' size (128 features, one group), rows split over threads (each slice sums its own
    # weight gradient): values and every gradient against the torch twin.
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(3)
        x, w, z = (torch.randn(*s, generator=g) for s in ((6, 50, 128), (128,), (6, 50, 128)))
        z[0, 0, :4] = torch.tensor([-100.0, -89.0, 89.0, 100.0])  # gates whose exp(-z) overflows float32
        results = []
        for backend in ("torch", "cpp"):
            leaves = _leaves(x, w, z)
            y = rms_norm_gated(*leaves, eps=1e-12, backend=backend)
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            results.append((y.detach(), [t.grad for t in leaves]))
        (y_torch, grads_torch), (y_cpp, grads_cpp) = results
        torch.testing.assert_close(y_cpp, y_torch)
        for name, a, b in zip(("x", "weight", "z"), grads_cpp, grads_torch):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    finally:
        torch.set_num_threads(1)


def test_gated_rms_norm_module():
    norm = GatedRMSNorm(8, eps=1e-5, group_size=4).double()
    x, z = torch.randn(3, 8, dtype=F64), torch.randn(3, 8, dtype=F64)
    torch.testing.assert_close(norm(x, z), _rms_norm_oracle(x, norm.weight, z, 1e-5, 4, False))
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(8, group_size=3)(x)


# ------------------------------------------------------------------------------------ TiSASRec's time pairs


def _time_pair_inputs(batch=3, heads=2, size=3, length=7, span=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        relation=torch.randint(0, span + 1, (batch, length, length), generator=g),
        table=torch.randn(span + 1, heads * size, generator=g, dtype=dtype),
        query=torch.randn(batch, heads, length, size, generator=g, dtype=dtype),
        probs=torch.rand(batch, heads, length, length, generator=g, dtype=dtype),
    )


def _assert_time_pairs_match_reference(inp, positions, dropout, atol=1e-10, rtol=1e-8):
    """Scores and context, values and gradients (query or probs, and the table), against the materialised
    reference at the query rows `positions` [b, R]."""
    query = inp["query"][:, :, : positions.size(1)]
    probs = inp["probs"][:, :, : positions.size(1)]
    for fn, reference, first in (
        (time_pair_scores, time_pair_scores_reference, query),
        (time_pair_context, time_pair_context_reference, probs),
    ):
        call = lambda f: lambda x, table: f(x, table, inp["relation"], positions, dropout)  # noqa: E731
        _assert_same_values_and_grads(call(fn), call(reference), [first, inp["table"]], atol=atol, rtol=rtol)


@_needs_cpp
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows", ["all", "some"])
def test_time_pairs_match_the_materialised_reference(p, rows):
    # Every query row, or one row per sequence at arbitrary positions (the prefix protocol's last layer).
    inp = _time_pair_inputs()
    length = inp["relation"].size(1)
    positions = torch.arange(length).expand(3, -1) if rows == "all" else torch.tensor([[6], [0], [3]])
    _assert_time_pairs_match_reference(inp, positions, PairDropout(seed=1234, stream=0, p=p))


@_needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_time_pairs_at_model_sizes_match_the_reference(threads):
    # float32 at TiSASRec's sizes (hidden 64 in 4 heads, L = 50, span 256), rows split over threads (each slice
    # sums its own table gradient).
    torch.set_num_threads(threads)
    try:
        inp = _time_pair_inputs(batch=5, heads=4, size=16, length=50, span=256, dtype=torch.float32, seed=1)
        positions = torch.arange(50).expand(5, -1)
        _assert_time_pairs_match_reference(inp, positions, PairDropout(99, 1, 0.2), atol=1e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(1)


@_needs_cpp
def test_time_pair_masks_are_independent_bernoulli_draws():
    p, shape = 0.2, (8, 20, 64)  # batch, L, hidden: keep factors [8, 20, 20, 64]
    keep = keep_factors(PairDropout(5, 0, p), *shape)
    assert keep.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    kept = (keep > 0).float()
    # the kept fraction within 5 standard deviations of 1 - p, per channel too (no channel or pair pattern)
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel())
    per_channel = kept.flatten(0, 2).mean(0)
    assert (per_channel - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / (kept.numel() / 64))
    # another stream (the value table) or another seed gives uncorrelated masks; the same ones give the same
    for other in (PairDropout(5, 1, p), PairDropout(6, 0, p)):
        correlation = torch.corrcoef(torch.stack([kept.flatten(), (keep_factors(other, *shape) > 0).float().flatten()]))
        assert abs(correlation[0, 1].item()) < 0.01
    # no pattern between neighbouring pairs (keys j and j+1, queries i and i+1, rows b and b+1) or between the two
    # 32-bit halves of one 64-bit draw (channels 2w and 2w+1)
    neighbours = {
        "key": (kept[:, :, :-1], kept[:, :, 1:]),
        "query": (kept[:, :-1], kept[:, 1:]),
        "row": (kept[:-1], kept[1:]),
        "halves": (kept[..., 0::2], kept[..., 1::2]),
    }
    for name, (a, b) in neighbours.items():
        correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(correlation) < 0.01, name
    torch.testing.assert_close(keep_factors(PairDropout(5, 0, p), *shape), keep)
    assert (keep_factors(PairDropout(5, 0, 0.0), 2, 3, 5) == 1).all()


@_needs_cpp
def test_time_pair_masks_follow_their_counter_layout():
    # Channel c of pair (b, i, j) is the low (c even) or high half of word (((stream * batch + b) * L + i) * L + j)
    # * ceil(hidden / 2) + c // 2; odd widths leave the last word's high half unused.
    for seed, stream, p, (batch, length, hidden) in [
        (5, 0, 0.2, (2, 4, 64)),
        (2**62 + 7, 1, 0.3, (3, 5, 7)),
        (11, 1, 0.5, (1, 3, 1)),
    ]:
        words = (hidden + 1) // 2
        b, i, j, c = (axis.astype(np.uint64) for axis in np.indices((batch, length, length, hidden)))
        pair = ((np.uint64(stream * batch) + b) * np.uint64(length) + i) * np.uint64(length) + j
        word = pair * np.uint64(words) + c // np.uint64(2)
        expected = _keep_from_words(seed, word, c % np.uint64(2) == 0, p)
        torch.testing.assert_close(keep_factors(PairDropout(seed, stream, p), batch, length, hidden), expected)


# ----------------------------------------------------------------------------------------------- dropout
def _dropout_keep_reference(seed: int, count: int, p: float) -> torch.Tensor:
    """The C++ dropout's keep factors written out in numpy: element e of block e // 32 takes the low (first 16)
    or high (last 16) half of SplitMix64 word (e // 32) * 16 + e % 16 at counter seed + word * golden ratio."""
    element = np.arange(count, dtype=np.uint64)
    within = element % np.uint64(32)
    word = element // np.uint64(32) * np.uint64(16) + within % np.uint64(16)
    return _keep_from_words(seed, word, within < 16, p)


def _keep_from_words(seed: int, word: np.ndarray, low_half: np.ndarray, p: float) -> torch.Tensor:
    """Keep factors from SplitMix64 at counters seed + word * golden ratio: the low or high 32 bits of each word,
    kept where they reach round(p * 2^32)."""
    with np.errstate(over="ignore"):  # unsigned arithmetic wraps, as in C++
        z = np.uint64(seed) + word * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    bits = np.where(low_half, z & np.uint64(0xFFFFFFFF), z >> np.uint64(32))
    kept = bits >= np.uint64(min(round(p * 2**32), 2**32 - 1))
    return torch.from_numpy(kept).float() * torch.tensor(1 / (1 - p), dtype=torch.float32)


@_needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_dropout_masks_follow_their_counter_layout(threads):
    # Whole and partial blocks of 32, and a count that the kernel splits over threads (grain: 2048 blocks).
    torch.set_num_threads(threads)
    try:
        for count, seed, p in [(1, 3, 0.5), (31, 4, 0.1), (32, 5, 0.2), (33, 2**62 + 7, 0.2), (70_001, 11, 0.3)]:
            torch.testing.assert_close(dropout_keep_factors(seed, count, p), _dropout_keep_reference(seed, count, p))
    finally:
        torch.set_num_threads(1)


@_needs_cpp
def test_dropout_masks_are_independent_bernoulli_draws():
    p, count = 0.3, 400_000
    kept = (dropout_keep_factors(17, count, p) > 0).float()
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / count)
    blocks = kept.view(-1, 32)
    neighbours = {
        "next element": (kept[:-1], kept[1:]),
        "two halves of one word": (blocks[:, :16], blocks[:, 16:]),
        "next block": (blocks[:-1], blocks[1:]),
        "another seed": (kept, (dropout_keep_factors(18, count, p) > 0).float()),
    }
    for name, (a, b) in neighbours.items():
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01, name
    assert (dropout_keep_factors(17, 100, 0.0) == 1).all()


@_needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_layer_on_the_cpp_backend(dtype):
    # models.base.Dropout on "cpp": one seed from torch's generator per call, the output x * keep in x's logical
    # element order (a transposed input too), the gradient the same keep factors times the incoming gradient.
    from models.base import Dropout

    layer = Dropout(0.25)
    layer.set_backends({"dropout": "cpp"})
    x = torch.randn(7, 37, 5, dtype=dtype).transpose(0, 1).requires_grad_()
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    keep = (dropout_keep_factors(seed, x.numel(), 0.25) > 0).to(dtype).view(x.shape) * (1 / 0.75)
    assert torch.equal(y, x.detach() * keep)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad * keep)
    assert not torch.equal(layer(x), y)  # the next call draws another seed
    assert torch.equal(layer.eval()(x), x)


@_needs_cpp
@pytest.mark.parametrize("activation", ["hardswish", "gelu", "silu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_and_dropout_fused_match_the_two_steps(activation, dtype):
    # Dropout.after_activation on "cpp" (one kernel each way) against torch's activation then the C++ dropout
    # after the same torch seed: the same mask, values and gradients equal up to rounding. The input holds each
    # activation's branch points (hardswish's -3 and 3, 0) and values far out (exp and erf saturate), a transposed
    # layout, and a count that is not a whole number of 32-element blocks.
    from models.base import Dropout
    from models.kernels.dropout import ACTIVATIONS

    layer = Dropout(0.3)
    layer.set_backends({"dropout": "cpp", "activation_dropout": "cpp"})
    x = torch.cat([_ACTIVATION_POINTS.to(dtype), torch.randn(1001, dtype=dtype) * 4]).view(4, -1).T.requires_grad_()
    grad = torch.randn(x.shape, dtype=dtype)
    outputs = []
    for fused in (True, False):
        torch.manual_seed(7)
        y = layer.after_activation(activation, x) if fused else layer(ACTIVATIONS[activation](x))
        (x_grad,) = torch.autograd.grad(y, x, grad)
        outputs.append((y, x_grad))
    (y, x_grad), (y_ref, x_grad_ref) = outputs
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-11}
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(x_grad, x_grad_ref, **tolerance)
    assert 0 < int((y == 0).sum()) < y.numel()
    torch.manual_seed(7)
    assert torch.equal(layer.eval().after_activation(activation, x), ACTIVATIONS[activation](x))


#: each activation's branch points (hardswish's -3 and 3, 0) and values far out (exp and erf saturate)
_ACTIVATION_POINTS = torch.tensor([-3.0, 3.0, 0.0, -100.0, 100.0, -1e-30, 1e-30, -2.5, 2.5, -10.0, 10.0])


@_needs_cpp
@pytest.mark.parametrize("activation", ["hardswish", "gelu", "silu", "relu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_activation_values_and_slopes_everywhere(activation, threads):
    # With nothing dropped (p 0) every float32 element is compared with torch's activation and its gradient in
    # float64 (float32 torch is the less exact one in GELU's negative tail): the branch points, the saturated
    # tails, and a count above the kernel's parallel grain that is not a whole number of 32-element blocks, split
    # over threads.
    from models.kernels.dropout import ACTIVATIONS

    torch.set_num_threads(threads)
    try:
        x = torch.cat([_ACTIVATION_POINTS, torch.randn(70_001, generator=torch.Generator().manual_seed(3)) * 4])
        grad = torch.randn_like(x)
        leaf = x.double().requires_grad_()
        expected = ACTIVATIONS[activation](leaf)
        (expected_grad,) = torch.autograd.grad(expected, leaf, grad.double())
        kernel = cpu_extension_module.cpu_extension("dropout")
        close = {"atol": 5e-7, "rtol": 1e-5}  # a few float32 ulps of values near 1
        torch.testing.assert_close(kernel.activate(x, activation, 5, 0.0), expected.float(), **close)
        torch.testing.assert_close(
            kernel.activate_backward(grad, x, activation, 5, 0.0), expected_grad.float(), **close
        )
    finally:
        torch.set_num_threads(1)


@_needs_cpp
def test_fused_activation_refuses_what_it_does_not_know():
    from models.kernels.dropout import activated_dropout_cpp

    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        activated_dropout_cpp(torch.randn(4), "tanh", 0.2)
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        cpu_extension_module.cpu_extension("dropout").activate(torch.randn(4), "tanh", 1, 0.2)
    with pytest.raises(RuntimeError, match="gradient must have the input's shape"):
        cpu_extension_module.cpu_extension("dropout").activate_backward(torch.randn(3), torch.randn(4), "gelu", 1, 0.2)


# ----------------------------------------------------------------------------------------------- causality


def _perturbed_after(t, k, axis):
    """A copy of t with every position after k along the time axis replaced by noise."""
    t = t.clone()
    index = [slice(None)] * t.dim()
    index[axis] = slice(k + 1, None)
    t[tuple(index)] = torch.randn_like(t[tuple(index)]) * 3
    return t


def _time_series_inputs():
    s, d = _scan_inputs(seqlen=12), _ssd_inputs(seqlen=12)
    conv = dict(x=torch.randn(2, 3, 12, dtype=F64), weight=torch.randn(3, 4, dtype=F64), bias=torch.randn(3, dtype=F64))
    norm = dict(
        x=torch.randn(2, 12, 8, dtype=F64), weight=torch.randn(8, dtype=F64), z=torch.randn(2, 12, 8, dtype=F64)
    )
    return [  # (kernel call, inputs, names of time-indexed inputs, their time axis, output time axis)
        (lambda **kw: selective_scan(**kw, delta_softplus=True), s, ["u", "delta", "B", "C", "z"], -1, -1),
        (lambda **kw: ssd_scan(**kw, chunk_size=5, dt_softplus=True), d, ["x", "dt", "B", "C", "z"], 1, 1),
        (lambda **kw: causal_conv1d(**kw, activation="silu"), conv, ["x"], -1, -1),
        (lambda **kw: causal_conv1d(**kw, activation="silu", backend="cpp"), conv, ["x"], -1, -1),
        (lambda **kw: rms_norm_gated(**kw, group_size=4), norm, ["x", "z"], 1, 1),
    ]


_CAUSAL_CASES = ["selective_scan", "ssd_scan", "causal_conv1d", "causal_conv1d_cpp", "rmsnorm_gated"]


@pytest.mark.parametrize("case", range(len(_CAUSAL_CASES)), ids=_CAUSAL_CASES)
@pytest.mark.parametrize("k", [0, 4, 10])
def test_outputs_up_to_k_ignore_inputs_after_k(case, k):
    if _CAUSAL_CASES[case].endswith("_cpp") and _TOOLCHAIN_PROBLEM is not None:
        pytest.skip(f"no C++ toolchain: {_TOOLCHAIN_PROBLEM}")
    fn, inputs, timed, in_axis, out_axis = _time_series_inputs()[case]
    torch.manual_seed(k)
    changed = {n: (_perturbed_after(v, k, in_axis) if n in timed else v) for n, v in inputs.items()}
    before, after = fn(**inputs), fn(**changed)
    keep = [slice(None)] * before.dim()
    keep[out_axis] = slice(0, k + 1)
    torch.testing.assert_close(after[tuple(keep)], before[tuple(keep)], atol=1e-12, rtol=0)
    assert not torch.allclose(after, before)  # the perturbation did reach the later outputs


# ------------------------------------------------------------------------------------- backend resolution


@pytest.fixture
def fresh_backend_probe():
    """Forget cached import probes before and after, and remove any mamba_ssm modules imported meanwhile."""
    before = {name for name in sys.modules if name.split(".")[0] in ("mamba_ssm", "selective_scan_cuda")}
    for probe in (backends_module._register_bare_mamba_ssm, backends_module.gpu_backend_problem):
        probe.cache_clear()
    yield
    for probe in (backends_module._register_bare_mamba_ssm, backends_module.gpu_backend_problem):
        probe.cache_clear()
    for name in [n for n in sys.modules if n.split(".")[0] in ("mamba_ssm", "selective_scan_cuda")]:
        if name not in before:
            del sys.modules[name]


def test_resolution_on_cpu_of_kernels_without_a_compiled_twin(monkeypatch):
    # Every kernel has a C++ twin today; one without (a new kernel, say) runs its torch twin on "auto" and "cpp".
    monkeypatch.delitem(cpu_extension_module.SOURCES, "rmsnorm_gated")
    cpu = torch.device("cpu")
    assert resolve_backend("rmsnorm_gated", "auto", cpu) == "torch"
    assert resolve_backend("selective_scan", "torch", "cpu") == "torch"
    assert resolve_backend("rmsnorm_gated", "cpp", cpu) == "torch"
    assert cpu_extension_module.cpu_extension_problem("rmsnorm_gated") == "rmsnorm_gated has no compiled CPU kernel"


@_needs_cpp
def test_resolution_on_cpu():
    # With a toolchain the C++ twin of every kernel builds and "auto" picks it.
    cpu = torch.device("cpu")
    assert resolve_backend("selective_scan", "cpp", cpu) == "cpp"
    assert describe_backends(cpu) == {
        "ssd_scan": "cpp",
        "selective_scan": "cpp",
        "causal_conv1d": "cpp",
        "rmsnorm_gated": "cpp",
        "time_pairs": "cpp",
        "dropout": "cpp",
        "activation_dropout": "cpp",
        "cross_entropy": "cpp",
    }


def test_cpp_backend_where_it_cannot_run(monkeypatch, caplog):
    # A failed build: "auto" keeps the torch twin and says why; an explicit "cpp" request is an error. On CUDA
    # tensors "cpp" is an error before anything is built.
    monkeypatch.setattr(backends_module, "cpu_extension_problem", lambda kernel: "no C++ compiler found ('g++')")
    backends_module._log_cpu_fallback.cache_clear()
    with caplog.at_level("WARNING"):
        assert resolve_backend("selective_scan", "auto", "cpu") == "torch"
    assert "selective_scan uses the torch backend on CPU: no C++ compiler found" in caplog.text
    with pytest.raises(KernelBackendError, match="backend 'cpp' for selective_scan is unavailable: no C\\+\\+"):
        resolve_backend("selective_scan", "cpp", "cpu")
    with pytest.raises(KernelBackendError, match="runs on CPU tensors but the inputs are on cuda"):
        resolve_backend("selective_scan", "cpp", "cuda")
    backends_module._log_cpu_fallback.cache_clear()


def test_cpp_module_name_follows_source_and_instruction_set(monkeypatch):
    name = cpu_extension_module.module_name("selective_scan")
    assert name.startswith(f"harness_selective_scan_{torch.backends.cpu.get_cpu_capability().lower()}_")
    monkeypatch.setattr(cpu_extension_module, "_capability", lambda: "DEFAULT")
    assert cpu_extension_module.module_name("selective_scan").split("_")[-2] == "default"


def test_the_toolchain_takes_ninja_from_beside_the_interpreter(monkeypatch, tmp_path):
    # A venv's python run without activation: PATH lacks the venv's scripts folder, which holds ninja.
    monkeypatch.setenv("CXX", "/bin/sh")  # some compiler that exists, named by absolute path
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert "ninja is not installed" in cpu_extension_module._toolchain_problem()
    (tmp_path / "ninja").write_text("#!/bin/sh\n")
    (tmp_path / "ninja").chmod(0o755)
    assert cpu_extension_module._toolchain_problem() is None
    assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path)


def test_the_build_lock_is_exclusive_and_clears_a_killed_build(tmp_path):
    import fcntl

    (tmp_path / "lock").touch()  # torch's marker, left by a build that was killed
    with cpu_extension_module.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        with open(tmp_path / "harness.flock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process would wait here
    with open(tmp_path / "harness.flock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


@_needs_cpp
def test_every_model_takes_the_cpp_backend_for_its_dropout():
    # SASRec has no kernel of its own: "cpp" runs its dropout and loss in C++, a GPU request on CPU is an error.
    import models
    from models.base import Dropout, ModelConfigError

    sasrec = models.build("sasrec", 20, 10, {}, kernel_backend="cpp")
    assert sasrec.backend_report() == {"dropout": "cpp", "cross_entropy": "cpp"}
    layers = [m for m in sasrec.modules() if isinstance(m, Dropout)]
    assert len(layers) > 3 and all(layer.backend == "cpp" for layer in layers)  # every nested layer got the choice
    assert models.build("sasrec", 20, 10, {}, kernel_backend="torch").backend_report() == {
        "dropout": "torch",
        "cross_entropy": "torch",
    }
    with pytest.raises(ModelConfigError, match="model 'sasrec': backend 'triton' for dropout needs a CUDA device"):
        models.build("sasrec", 20, 10, {}, kernel_backend="triton")


def test_per_kernel_backend_overrides():
    # "torch:dropout=cpp": every kernel on torch but the dropout; an override of a kernel the model lacks, an
    # unknown kernel or backend, or an override without "=" is a configuration error naming what is wrong.
    import models
    from models.base import ModelConfigError

    report = models.build("tim4rec", 20, 10, {}, kernel_backend="torch:dropout=auto").backend_report()
    assert report == {
        **dict.fromkeys(("ssd_scan", "causal_conv1d", "rmsnorm_gated"), "torch"),
        "dropout": report["dropout"],
        "activation_dropout": report["dropout"],  # the FFN's dropout follows a dropout override unless overridden
        "cross_entropy": "torch",
    }
    assert report["dropout"] == describe_backends("cpu")["dropout"]
    for requested, fused in [("cpp:dropout=torch", "torch"), ("cpp:dropout=torch:activation_dropout=auto", "auto")]:
        report = models.build("mamba4rec", 20, 10, {}, kernel_backend=requested).backend_report()
        assert (
            report["activation_dropout"] == describe_backends("cpu")["activation_dropout"]
            if fused == "auto"
            else "torch"
        )
    assert parse_backend_request("CPP:dropout=torch:ssd_scan=auto") == ("cpp", {"dropout": "torch", "ssd_scan": "auto"})
    with pytest.raises(KernelBackendError, match="kernel dropout overridden twice"):
        parse_backend_request("cpp:dropout=torch:dropout=cpp")
    bad = {
        "auto:ssd_scan=torch": "model 'sasrec': has no kernel ssd_scan to override \\(its kernels: dropout, cross_entropy\\)",
        "auto:attention=torch": "bad kernel override 'attention=torch'",
        "auto:dropout=gpu": "bad kernel override 'dropout=gpu'",
        "auto:dropout": "bad kernel override 'dropout'",
        "gpu:dropout=torch": "unknown kernel backend 'gpu'",
    }
    for requested, message in bad.items():
        with pytest.raises(ModelConfigError, match=message):
            models.build("sasrec", 20, 10, {}, kernel_backend=requested)


def test_unknown_backend_or_kernel_is_an_error():
    with pytest.raises(KernelBackendError, match="auto, torch, cpp, triton, cuda"):
        resolve_backend("ssd_scan", "tpu", "cpu")
    with pytest.raises(KernelBackendError, match="unknown kernel"):
        resolve_backend("attention", "auto", "cpu")
    assert issubclass(KernelBackendError, ValueError)


@pytest.mark.parametrize("requested", ["triton", "cuda", "CUDA"])
def test_gpu_backend_on_cpu_is_an_error(requested):
    with pytest.raises(KernelBackendError, match="needs a CUDA device"):
        resolve_backend("selective_scan", requested, "cpu")
    x = torch.randn(1, 4, 2, 3)
    with pytest.raises(KernelBackendError):
        ssd_scan(
            x,
            torch.rand(1, 4, 2),
            -torch.ones(2),
            torch.randn(1, 4, 1, 3),
            torch.randn(1, 4, 1, 3),
            chunk_size=2,
            backend=requested,
        )


def test_missing_gpu_library_on_cuda(monkeypatch, fresh_backend_probe):
    # Make the GPU libraries unimportable (a None entry in sys.modules fails the import), then ask for them on
    # a CUDA device: explicit requests fail with the install hint, "auto" falls back to torch.
    for name in ("mamba_ssm", *(module for module, _ in backends_module.GPU_ENTRY.values())):
        monkeypatch.setitem(sys.modules, name, None)
    cuda = torch.device("cuda")
    for kernel in ("ssd_scan", "selective_scan", "causal_conv1d", "rmsnorm_gated"):
        with pytest.raises(KernelBackendError, match=r"pip install \.\[gpu\]"):
            resolve_backend(kernel, "cuda", cuda)
        assert resolve_backend(kernel, "auto", cuda) == "torch"
    # the dropout's (with its activation) and the loss's GPU paths are torch's own: every model takes a GPU request
    for kernel in ("dropout", "activation_dropout", "cross_entropy"):
        assert resolve_backend(kernel, "triton", cuda) == resolve_backend(kernel, "auto", cuda) == "torch"


def _write_fake_mamba_ssm(root: Path) -> None:
    """A mamba_ssm laid out like the real one: its __init__ fails as the real one does without transformers,
    its Triton kernel modules import, and its selective-scan interface needs the compiled selective_scan_cuda."""
    files = {
        "__init__.py": "raise ModuleNotFoundError(\"No module named 'transformers'\", name='transformers')\n",
        "ops/__init__.py": "",
        "ops/triton/__init__.py": "",
        "ops/triton/ssd_combined.py": "def mamba_chunk_scan_combined(*args, **kwargs):\n    return 'ssd'\n",
        "ops/triton/layernorm_gated.py": "def rmsnorm_fn(*args, **kwargs):\n    return 'norm'\n",
        "ops/selective_scan_interface.py": "import selective_scan_cuda\n\ndef selective_scan_fn(*a, **k):\n    pass\n",
    }
    for relative, text in files.items():
        path = root / "mamba_ssm" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_kernels_import_without_mamba_ssm_init(tmp_path, monkeypatch, fresh_backend_probe):
    # mamba-ssm installed with --no-deps: `import mamba_ssm` fails (its __init__ needs transformers), yet the
    # Triton kernels load from their own modules; the selective scan names the exact import that failed.
    if importlib.util.find_spec("selective_scan_cuda") is not None:
        pytest.skip("the real compiled extension is installed")
    _write_fake_mamba_ssm(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    cuda = torch.device("cuda")
    assert resolve_backend("ssd_scan", "auto", cuda) == "triton"
    assert resolve_backend("rmsnorm_gated", "cuda", cuda) == "triton"
    assert backends_module.gpu_kernel("ssd_scan")() == "ssd"
    assert resolve_backend("selective_scan", "auto", cuda) == "torch"
    with pytest.raises(
        KernelBackendError,
        match=r"mamba_ssm\.ops\.selective_scan_interface import selective_scan_fn"
        r"` failed \(ModuleNotFoundError: No module named 'selective_scan_cuda'",
    ):
        resolve_backend("selective_scan", "cuda", cuda)
    with pytest.raises(AttributeError, match="without running its __init__"):
        sys.modules["mamba_ssm"].Mamba2  # noqa: B018 (the access is what raises)


def test_a_missing_kernel_dependency_is_named(tmp_path, monkeypatch, fresh_backend_probe):
    # A kernel module whose own import fails (einops missing, say): the problem names module and exception.
    _write_fake_mamba_ssm(tmp_path)
    (tmp_path / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py").write_text("import einops_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    problem = backends_module.gpu_backend_problem("ssd_scan")
    assert problem == (
        "`from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined` failed "
        "(ModuleNotFoundError: No module named 'einops_not_installed')"
    )
    assert resolve_backend("ssd_scan", "auto", "cuda") == "torch"
    assert backends_module.gpu_backend_problem("rmsnorm_gated") is None


def test_the_interpreter_opt_in_needs_the_variable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1"):
        with backends_module.triton_interpreter():
            pass
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with backends_module.triton_interpreter():
        with pytest.raises(KernelBackendError, match="needs a CUDA device"):  # compiled kernels: no interpreter
            resolve_backend("causal_conv1d", "cuda", "cpu")
    with pytest.raises(KernelBackendError, match="needs a CUDA device"):  # the opt-in ends with the block
        resolve_backend("ssd_scan", "triton", "cpu")


def test_cpu_path_never_imports_gpu_libraries():
    code = (
        "import sys, torch\n"
        "from models.kernels import selective_scan, ssd_scan, describe_backends\n"
        "describe_backends('cpu')\n"
        "x = torch.randn(1, 2, 3)\n"
        "selective_scan(x, x, -torch.ones(2, 2), torch.randn(1, 2, 3), torch.randn(1, 2, 3), backend='auto')\n"
        "bad = [m for m in ('mamba_ssm', 'triton', 'causal_conv1d', 'selective_scan_cuda') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ----------------------------------------------------------------------------------------- GPU vs torch twin


def _gpu_or_skip(kernel):
    problem = backends_module.gpu_backend_problem(kernel)
    if problem:
        pytest.skip(problem)


@cuda_only
def test_gpu_selective_scan_matches_torch():
    _gpu_or_skip("selective_scan")
    inp = {k: v.float().cuda() for k, v in _scan_inputs(batch=4, dim=16, seqlen=64, dstate=8).items()}
    names = list(inp)
    call = lambda be: lambda *ts: selective_scan(**dict(zip(names, ts)), delta_softplus=True, backend=be)  # noqa: E731
    _assert_same_values_and_grads(call("cuda"), call("torch"), list(inp.values()), atol=2e-3, rtol=2e-3)


@cuda_only
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_gpu_ssd_scan_matches_torch(chunk_size):
    _gpu_or_skip("ssd_scan")
    inp = {
        k: v.float().cuda()
        for k, v in _ssd_inputs(batch=2, seqlen=100, nheads=4, headdim=32, ngroups=1, dstate=32).items()
    }
    names = list(inp)

    def call(be):
        return lambda *ts: ssd_scan(
            **dict(zip(names, ts)),
            chunk_size=chunk_size,
            dt_softplus=True,
            backend=be,
        )

    _assert_same_values_and_grads(call("triton"), call("torch"), list(inp.values()), atol=2e-3, rtol=2e-3)


@cuda_only
def test_gpu_causal_conv1d_matches_torch():
    _gpu_or_skip("causal_conv1d")
    x, w, b = torch.randn(2, 64, 50).cuda(), torch.randn(64, 4).cuda(), torch.randn(64).cuda()
    call = lambda be: lambda *ts: causal_conv1d(*ts, activation="silu", backend=be)  # noqa: E731
    _assert_same_values_and_grads(call("cuda"), call("torch"), [x, w, b], atol=1e-4, rtol=1e-4)


@cuda_only
def test_gpu_rms_norm_gated_matches_torch():
    _gpu_or_skip("rmsnorm_gated")
    x, w, z = torch.randn(2, 50, 128).cuda(), torch.randn(128).cuda(), torch.randn(2, 50, 128).cuda()
    call = lambda be: lambda *ts: rms_norm_gated(*ts, group_size=64, backend=be)  # noqa: E731
    _assert_same_values_and_grads(call("triton"), call("torch"), [x, w, z], atol=1e-4, rtol=1e-4)


@cuda_only
def test_auto_picks_gpu_backends_on_cuda():
    chosen = describe_backends("cuda")
    for kernel, backend in chosen.items():
        gpu = backends_module.GPU_BACKEND.get(kernel)  # time_pairs has none: its torch twin runs on CUDA
        expected = "torch" if gpu is None or backends_module.gpu_backend_problem(kernel) else gpu
        assert backend == expected
