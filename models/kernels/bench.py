"""Forward+backward timings of the sequence-mixing kernels, side by side on one machine.

    python -m models.kernels.bench [--device cuda --backends torch cuda] [--no-reference]

On CPU the default backends are torch and cpp (every kernel's C++ twin).

Each kernel runs at the shape of a recommender layer (hidden x expand channels, a full-length sequence); the
table gives wall-clock medians over repeats after warm-up (which also absorbs Triton autotuning), CUDA
synchronised around every timed call, the median CPU seconds of the process, and each row's ratio (of medians)
to the fastest backend of the same kernel. On one CPU thread the selective scan also runs as one row block (the
whole batch at once), the ablation of its cache blocking. The training loss (full-softmax cross-entropy of the
tied item scores, at the training batch and a catalogue of --n-items) runs fused and unfused (torch's
F.cross_entropy on the materialised scores, the path off CPU).

On a CPU shared with other busy processes, torch's OpenMP threads spin-wait for each other and the thousands
of small parallel operations of a scan slow down by more than an order of magnitude (measured here at load 9 on
2 cores: 77 s instead of 2.8 s). OMP_WAIT_POLICY=PASSIVE avoids that, but libgomp reads it only when torch is
loaded, so run as a script this module re-executes itself with it unless the variable is already set. The
machine line reports the policy and the load average.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import torch

from .backends import KernelBackendError, resolve_backend
from .causal_conv import causal_conv1d
from .cross_entropy import tied_cross_entropy, tied_cross_entropy_reference
from .rmsnorm_gated import rms_norm_gated
from .selective_scan import selective_scan, selective_scan_reference
from .ssd_scan import ssd_scan, ssd_scan_reference

# the module, not its function of the same name (the package exports the function)
selective_scan_module = importlib.import_module(".selective_scan", __package__)


def _timings(step: Callable[[], None], repeats: int, warmup: int, device: torch.device) -> dict:
    """Wall-clock seconds per call, and the median CPU seconds this process used per call.

    CPU time is the steadier number on a shared machine: it does not count time spent waiting for a core
    (with passive OpenMP waiting; spinning threads would count).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return dict(
        median_s=statistics.median(wall),
        min_s=min(wall),
        max_s=max(wall),
        cpu_s=statistics.median(cpu),
        repeats=repeats,
    )


def _forward_backward(fn: Callable, inputs: dict, generator: torch.Generator) -> Callable[[], None]:
    """A closure running fn(**inputs) and a backward pass from a fixed random output gradient."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    upstream = {}

    def step():
        for t in leaves:
            t.grad = None
        out = fn(**inputs)
        if "g" not in upstream:
            upstream["g"] = torch.randn(out.shape, generator=generator).to(out.device, out.dtype)
        out.backward(upstream["g"])

    return step


def _leaf(*shape, device, generator, scale=1.0, shift=0.0):
    t = torch.randn(*shape, generator=generator) * scale + shift
    return t.to(device).requires_grad_()


def _selective_scan_case(batch, seqlen, dim, d_state, device, g):
    """Mamba1 as in Mamba4Rec: S4D-real A, softplus step sizes around 0.01-0.1, in the layouts Mamba hands the
    scan (see _mamba_layouts): u, delta and z time-major, B and C halves of one projection."""
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1)
    return dict(
        u=_leaf(batch, seqlen, dim, device=device, generator=g),
        delta=_leaf(batch, seqlen, dim, device=device, generator=g, shift=-3.0),
        A=A.to(device).requires_grad_(),
        BC=_leaf(batch, seqlen, 2 * d_state, device=device, generator=g),
        D=_leaf(dim, device=device, generator=g),
        z=_leaf(batch, seqlen, dim, device=device, generator=g),
        delta_bias=_leaf(dim, device=device, generator=g, scale=0.1),
        delta_softplus=True,
    )


def _mamba_layouts(u, delta, BC, z, **rest):
    """The selective scan's arguments as models/mamba4rec.py passes them: u, delta and z [batch, dim, seqlen]
    views of time-major storage (the projections' outputs), B and C [batch, dstate, seqlen] views of one
    [batch, seqlen, 2 * dstate] output, so each backend pays for the layout changes it needs."""
    B, C = BC.transpose(1, 2).chunk(2, dim=1)
    return dict(rest, u=u.transpose(1, 2), delta=delta.transpose(1, 2), B=B, C=C, z=z.transpose(1, 2))


def _dropout_on(backend: str, activation: str | None = None) -> Callable:
    """The models' dropout layer (models.base.Dropout, p 0.2, training) on a backend, after `activation`
    when given (the FFNs' act -> dropout, one kernel on the C++ backend)."""
    from models.base import Dropout

    layer = Dropout(0.2)
    layer.set_backends({"dropout": backend, "activation_dropout": backend})
    return (lambda x: layer(x)) if activation is None else (lambda x: layer.after_activation(activation, x))


def _ssd_case(batch, seqlen, dim, d_state, head_dim, device, g):
    """Mamba2 / TiM4Rec: one group, A in -[1, 16], D per head."""
    nheads = dim // head_dim
    return dict(
        x=_leaf(batch, seqlen, nheads, head_dim, device=device, generator=g),
        dt=_leaf(batch, seqlen, nheads, device=device, generator=g, shift=-3.0),
        A=(-torch.linspace(1, 16, nheads)).to(device).requires_grad_(),
        B=_leaf(batch, seqlen, 1, d_state, device=device, generator=g),
        C=_leaf(batch, seqlen, 1, d_state, device=device, generator=g),
        D=_leaf(nheads, device=device, generator=g),
        dt_bias=_leaf(nheads, device=device, generator=g, scale=0.1),
        dt_softplus=True,
    )


def kernel_benchmark_rows(
    batch=128,
    seqlen=200,
    hidden=64,
    expand=2,
    d_state=32,
    head_dim=32,
    chunk_size=32,
    repeats=5,
    warmup=1,
    device="cpu",
    backends=("torch",),
    include_reference=True,
    reference_repeats=1,
    n_items=3416,
) -> list[dict]:
    """Time forward+backward of every kernel; one row per (kernel, backend).

    `backends` are requested names ("torch", "cpp", "cuda"/"triton", "auto"), resolved per kernel; a GPU backend that
    cannot run here gives a row with a note instead of a timing. The oracles (backend "reference") are slow
    per-step loops, timed `reference_repeats` times without warm-up, and skipped with include_reference=False.
    """
    device = torch.device(device)
    dim = hidden * expand
    g = torch.Generator().manual_seed(0)
    scan_case = _selective_scan_case(batch, seqlen, dim, d_state, device, g)
    ssd_case = _ssd_case(batch, seqlen, dim, d_state, head_dim, device, g)
    conv_case = dict(
        x=_leaf(batch, dim, seqlen, device=device, generator=g),
        weight=_leaf(dim, 4, device=device, generator=g, scale=0.5),
        bias=_leaf(dim, device=device, generator=g),
        activation="silu",
    )
    norm_case = dict(
        x=_leaf(batch, seqlen, dim, device=device, generator=g),
        weight=_leaf(dim, device=device, generator=g, shift=1.0),
        z=_leaf(batch, seqlen, dim, device=device, generator=g),
        group_size=dim,
    )
    cases = {  # kernel -> (shape label, inputs, fn taking (backend) -> callable, oracle or None)
        "selective_scan": (
            f"b{batch} d{dim} l{seqlen} n{d_state}",
            scan_case,
            lambda be: lambda **kw: selective_scan(**_mamba_layouts(**kw), backend=be),
            lambda **kw: selective_scan_reference(**_mamba_layouts(**kw)),
        ),
        "ssd_scan": (
            f"b{batch} l{seqlen} h{dim // head_dim}x{head_dim} n{d_state} chunk{chunk_size}",
            ssd_case,
            lambda be: lambda **kw: ssd_scan(**kw, chunk_size=chunk_size, backend=be),
            lambda **kw: ssd_scan_reference(**kw),
        ),
        "causal_conv1d": (
            f"b{batch} d{dim} l{seqlen} w4",
            conv_case,
            lambda be: lambda **kw: causal_conv1d(**kw, backend=be),
            None,
        ),
        "rmsnorm_gated": (
            f"b{batch} l{seqlen} d{dim}",
            norm_case,
            lambda be: lambda **kw: rms_norm_gated(**kw, backend=be),
            None,
        ),
        "dropout": (
            f"b{batch} l{seqlen} d{hidden} p0.2",
            dict(x=_leaf(batch, seqlen, hidden, device=device, generator=g)),
            _dropout_on,
            None,
        ),
        # the TiM4Rec / SSD4Rec* FFN's inner activation and its dropout, at its width (4 x hidden); the torch row
        # also draws torch's masks, so its ratio holds the C++ dropout's gain too (the fusion's alone: `harness
        # bench --backend auto:activation_dropout=torch,auto`)
        "activation_dropout": (
            f"b{batch} l{seqlen} d{4 * hidden} hardswish p0.2",
            dict(x=_leaf(batch, seqlen, 4 * hidden, device=device, generator=g)),
            lambda backend: _dropout_on(backend, "hardswish"),
            None,
        ),
    }

    rows = []
    for kernel, (shape, inputs, make_fn, oracle) in cases.items():
        kernel_rows = []
        seen = set()
        for requested in backends:
            row = dict(kernel=kernel, backend=str(requested), shape=shape, device=str(device), note="")
            try:
                row["backend"] = resolve_backend(kernel, requested, device)
            except KernelBackendError as exc:
                row.update(median_s=None, min_s=None, max_s=None, cpu_s=None, repeats=0, note=str(exc))
                kernel_rows.append(row)
                continue
            if row["backend"] in seen:
                continue
            seen.add(row["backend"])
            row.update(_timings(_forward_backward(make_fn(row["backend"]), inputs, g), repeats, warmup, device))
            kernel_rows.append(row)
        if kernel == "selective_scan" and "torch" in seen and device.type == "cpu" and torch.get_num_threads() == 1:
            # the design ablation: the whole batch as one row block (see selective_scan._row_blocks)
            with mock.patch.object(selective_scan_module, "_ROW_BLOCK_BYTES", 1 << 62):
                kernel_rows.append(
                    dict(
                        kernel=kernel,
                        backend="torch, one row block",
                        shape=shape,
                        device=str(device),
                        note="",
                        **_timings(_forward_backward(make_fn("torch"), inputs, g), repeats, warmup, device),
                    )
                )
        if include_reference and oracle is not None:
            kernel_rows.append(
                dict(
                    kernel=kernel,
                    backend="reference",
                    shape=shape,
                    device=str(device),
                    note="",
                    **_timings(_forward_backward(oracle, inputs, g), reference_repeats, 0, device),
                )
            )
        timed = [r["median_s"] for r in kernel_rows if r["median_s"] is not None]
        for r in kernel_rows:
            r["ratio"] = r["median_s"] / min(timed) if r["median_s"] is not None else None
        rows.extend(kernel_rows)
    with_cpp = any(_resolves_to_cpp("cross_entropy", requested, device) for requested in backends)
    rows.extend(_cross_entropy_rows(batch, hidden, n_items, repeats, warmup, device, g, with_cpp))
    return rows


def _resolves_to_cpp(kernel: str, requested: str, device) -> bool:
    try:
        return resolve_backend(kernel, requested, device) == "cpp"
    except KernelBackendError:
        return False


def _cross_entropy_rows(batch, hidden, n_items, repeats, warmup, device, g, with_cpp=False) -> list[dict]:
    """The tied full-softmax loss fused (CPU float32; its block softmax as torch ops, and as C++ when asked)
    and unfused, on one row each."""
    inputs = dict(
        hidden=_leaf(batch, hidden, device=device, generator=g),
        table=_leaf(n_items, hidden, device=device, generator=g, scale=0.3),
        targets=torch.randint(0, n_items, (batch,), generator=g).to(device),
    )
    shape = f"n{batch} d{hidden} items{n_items}"
    variants = {"torch, fused": tied_cross_entropy, "torch, unfused": tied_cross_entropy_reference}
    if with_cpp:
        variants["cpp, fused"] = functools.partial(tied_cross_entropy, backend="cpp")
    rows = [
        dict(
            kernel="tied_cross_entropy",
            backend=name,
            shape=shape,
            device=str(device),
            note="",
            **_timings(_forward_backward(fn, inputs, g), repeats, warmup, device),
        )
        for name, fn in variants.items()
    ]
    for r in rows:
        r["ratio"] = r["median_s"] / min(x["median_s"] for x in rows)
    return rows


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what platform knows): recorded with benchmark rows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device="cpu") -> dict:
    device = torch.device(device)
    info = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)  # other processes on the CPU distort timings
    return info


def main(argv=None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m models.kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument(
        "--n-items", type=int, default=3416, help="catalogue size of the cross-entropy row (default: ML-1M's 3416)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="requested backends (default: torch, plus cuda on a CUDA device or cpp on CPU)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the slow per-step oracles")
    parser.add_argument("--reference-repeats", type=int, default=1)
    args = parser.parse_args(argv)
    backends = args.backends or (["torch", "cuda"] if torch.device(args.device).type == "cuda" else ["torch", "cpp"])

    rows = kernel_benchmark_rows(
        batch=args.batch,
        seqlen=args.seqlen,
        hidden=args.hidden,
        expand=args.expand,
        d_state=args.d_state,
        head_dim=args.head_dim,
        chunk_size=args.chunk_size,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        backends=tuple(backends),
        include_reference=not args.no_reference,
        reference_repeats=args.reference_repeats,
        n_items=args.n_items,
    )
    console = Console()
    if not console.is_terminal:
        console.width = 160  # piped output: keep one row per line instead of wrapping at 80 columns
    machine = machine_description(args.device)
    console.print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    table = Table(title="kernel forward+backward (float32)")
    columns = ("kernel", "backend", "shape", "median s", "min s", "max s", "cpu s", "repeats", "ratio vs fastest")
    for column in columns:
        table.add_column(column, justify="left" if column in ("kernel", "backend", "shape") else "right")
    for r in rows:
        if r["median_s"] is None:
            table.add_row(r["kernel"], r["backend"], r["shape"], "-", "-", "-", "-", "0", r["note"])
            continue
        table.add_row(
            r["kernel"],
            r["backend"],
            r["shape"],
            f"{r['median_s']:.4f}",
            f"{r['min_s']:.4f}",
            f"{r['max_s']:.4f}",
            f"{r['cpu_s']:.4f}",
            str(r["repeats"]),
            f"{r['ratio']:.2f}x",
        )
    console.print(table)
    return rows


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "models.kernels.bench", *sys.argv[1:]])
    main()
