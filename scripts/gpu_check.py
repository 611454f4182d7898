"""The one prepared GPU check: run it on a CUDA machine, in one call, from the repository root.

    python scripts/gpu_check.py [--wheels DIR] [--data-dir DIR] [--expect all|KERNEL,...] [--out FILE] [--json FILE]

1. (optional) installs the wheels carried in DIR with `pip install --no-deps --no-index` (mamba-ssm's pure-Python
   wheel, pydantic for the harness, ...), before anything imports them;
2. the kernel table: every GPU kernel on its GPU backend against its torch twin on random float32 inputs, forward
   output and the gradient of every differentiable input, as max|gpu - torch| / max|torch| (TF32 off on the
   torch side), with the median time of a forward+backward. An EXPECTED kernel (--expect; default all four)
   whose library does not import is MISSING, and one that was chosen but never called is FAIL: neither is a
   skip. A kernel not expected and not installed is listed as such, with the import that failed;
3. models: for every registered model (and TiM4Rec variants) on CUDA with kernel_backend="auto", the forward
   against the same weights on torch kernels, then Adam steps on random data; every expected kernel the model
   has must be on its GPU backend and called;
4. one epoch of TiM4Rec on amazon-beauty through `harness train`, encoder compiled (`--set compile=true`): the
   Triton SSD scan must be called and dynamo must have compiled graphs;
5. `harness bench` on CUDA for the five models;
6. prints the table, writes it to --out (and the rows as JSON to --json) after every section, so a run cut
   short still leaves what it did.

Exit status: 2 without CUDA (nothing checked); 1 when any row is FAIL or MISSING; 0 otherwise.
Unverified on a GPU so far: see docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

KERNELS = ("ssd_scan", "selective_scan", "causal_conv1d", "rmsnorm_gated")  # backends.GPU_BACKEND's kernels
# max relative error tolerated per kernel (the Triton SSD kernels use TF32 dot products internally)
TOLERANCE = {"ssd_scan": 5e-3, "selective_scan": 1e-3, "causal_conv1d": 1e-4, "rmsnorm_gated": 1e-4}
MODEL_TOLERANCE = 1e-2  # whole-model forward, GPU backends vs torch backends
FAILING = ("FAIL", "MISSING")
BENCH_MODELS = "sasrec,tisasrec,mamba4rec,ssd4rec,tim4rec"
SECTIONS = ("models", "train", "bench")


def _expected(text: str) -> tuple[str, ...]:
    names = KERNELS if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(KERNELS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--expect takes 'all' or kernels among {', '.join(KERNELS)}; got {text!r}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", help="folder of .whl files to `pip install --no-deps --no-index` first")
    parser.add_argument("--data-dir", help="HARNESS_DATA_DIR for the amazon-beauty training (default: as set)")
    parser.add_argument(
        "--expect",
        type=_expected,
        default=KERNELS,
        help="GPU kernels that must run: 'all' (default) or a comma-separated list; any other "
        "kernel is checked when installed and listed as 'not expected' when not",
    )
    parser.add_argument("--out", default="gpu_check.txt", help="write the summary table here")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--steps", type=int, default=20, help="training steps per model on random data")
    parser.add_argument("--batch", type=int, default=256, help="training batch size on random data")
    parser.add_argument("--max-len", type=int, default=50, help="sequence length of the random data")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=SECTIONS,
        help="leave out a section after the kernel table (repeatable)",
    )
    return parser.parse_args(argv)


def install_wheels(folder: str) -> list[str]:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        print(f"[gpu_check] no wheels in {folder}", flush=True)
        return []
    print(f"[gpu_check] pip install --no-deps {' '.join(os.path.basename(w) for w in wheels)}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *wheels], capture_output=True, text=True
    )
    print(result.stdout[-2000:], result.stderr[-2000:], sep="\n", flush=True)
    if result.returncode:
        print(f"[gpu_check] pip exited with {result.returncode}; continuing with what is installed", flush=True)
    return [os.path.basename(w) for w in wheels]


# ------------------------------------------------------------------------------------------ kernels
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


# The shapes of the kernel table: model-sized (the SSD models' heads, state and chunk sizes, L 50 and 200).
KERNEL_SHAPES = {
    "ssd_scan": [
        dict(batch=64, seqlen=50, nheads=4, headdim=32, dstate=32, chunk=32),
        dict(batch=16, seqlen=200, nheads=4, headdim=32, dstate=32, chunk=32),
        dict(batch=8, seqlen=200, nheads=2, headdim=128, dstate=64, chunk=32),
        dict(batch=32, seqlen=77, nheads=8, headdim=16, dstate=32, chunk=16, ngroups=2),
    ],
    "selective_scan": [dict(batch=64, dim=128, seqlen=50, dstate=32), dict(batch=8, dim=128, seqlen=200, dstate=32)],
    "causal_conv1d": [
        dict(batch=64, dim=192, seqlen=50, width=4, activation="silu"),
        dict(batch=64, dim=192, seqlen=50, width=4, activation=None),
        dict(batch=64, dim=4, seqlen=50, width=4, activation=None),
        dict(batch=8, dim=128, seqlen=200, width=4, activation="silu"),
    ],
    "rmsnorm_gated": [dict(batch=64, seqlen=50, dim=128), dict(batch=8, seqlen=200, dim=512)],
}


def _kernel_cases(device, shapes=None):
    """kernel -> list of (label, make_inputs(), call(backend, **inputs)), one per entry of `shapes`."""
    from models.kernels.causal_conv import causal_conv1d
    from models.kernels.rmsnorm_gated import rms_norm_gated
    from models.kernels.selective_scan import selective_scan
    from models.kernels.ssd_scan import ssd_scan

    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device).requires_grad_()

    def ssd(batch, seqlen, nheads, headdim, dstate, chunk, ngroups=1):
        def make():
            return dict(
                x=leaf(batch, seqlen, nheads, headdim),
                dt=leaf(batch, seqlen, nheads, shift=-1.0),
                A=(-torch.linspace(1, 16, nheads)).to(device).requires_grad_(),
                B=leaf(batch, seqlen, ngroups, dstate),
                C=leaf(batch, seqlen, ngroups, dstate),
                D=leaf(nheads),
                z=leaf(batch, seqlen, nheads, headdim),
                dt_bias=leaf(nheads, scale=0.5, shift=-3.0),
            )

        call = lambda backend, **kw: ssd_scan(**kw, chunk_size=chunk, dt_softplus=True, backend=backend)  # noqa
        return (f"b{batch} l{seqlen} h{nheads}x{headdim} g{ngroups} n{dstate} chunk{chunk}", make, call)

    def scan(batch, dim, seqlen, dstate):
        def make():
            A = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
            return dict(
                u=leaf(batch, dim, seqlen),
                delta=leaf(batch, dim, seqlen, scale=0.5, shift=-2.0),
                A=A.to(device).requires_grad_(),
                B=leaf(batch, dstate, seqlen),
                C=leaf(batch, dstate, seqlen),
                D=leaf(dim),
                z=leaf(batch, dim, seqlen),
                delta_bias=leaf(dim, scale=0.1),
            )

        call = lambda backend, **kw: selective_scan(**kw, delta_softplus=True, backend=backend)  # noqa
        return (f"b{batch} d{dim} l{seqlen} n{dstate}", make, call)

    def conv(batch, dim, seqlen, width, activation):
        def make():
            return dict(x=leaf(batch, dim, seqlen), weight=leaf(dim, width, scale=0.5), bias=leaf(dim))

        call = lambda backend, **kw: causal_conv1d(**kw, activation=activation, backend=backend)  # noqa
        return (f"b{batch} d{dim} l{seqlen} w{width} {activation}", make, call)

    def norm(batch, seqlen, dim):
        def make():
            return dict(x=leaf(batch, seqlen, dim), weight=leaf(dim, scale=0.1, shift=1.0), z=leaf(batch, seqlen, dim))

        call = lambda backend, **kw: rms_norm_gated(**kw, eps=1e-5, norm_before_gate=False, backend=backend)  # noqa
        return (f"b{batch} l{seqlen} d{dim}", make, call)

    builders = {"ssd_scan": ssd, "selective_scan": scan, "causal_conv1d": conv, "rmsnorm_gated": norm}
    return {
        kernel: [builders[kernel](**shape) for shape in kernel_shapes]
        for kernel, kernel_shapes in (shapes or KERNEL_SHAPES).items()
    }


def kernel_plan(expected, problems: dict[str, str | None]) -> tuple[list[str], list[dict]]:
    """Which kernels to run (their library imports) and the rows of those that cannot run.

    An expected kernel whose library does not import is MISSING, a failure; one not expected is listed with
    the import that failed and fails nothing. This is the rule that keeps the check from passing by skipping.
    """
    to_run, rows = [], []
    for kernel in KERNELS:
        problem = problems[kernel]
        if problem is None:
            to_run.append(kernel)
            continue
        status = "MISSING" if kernel in expected else "not expected"
        rows.append(dict(section="kernel", name=kernel, case="-", backend="unavailable", status=status, note=problem))
    return to_run, rows


def _timed_ms(function, repeats=5) -> float:
    """Median milliseconds of function() after one warm-up, CUDA synchronised around each call."""
    function()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def check_kernels(device, expected, shapes=None, repeats=5) -> list[dict]:
    from models.kernels.backends import GPU_BACKEND, gpu_backend_problem, gpu_calls, resolve_backend

    to_run, rows = kernel_plan(expected, {kernel: gpu_backend_problem(kernel) for kernel in KERNELS})
    for row in rows:
        print(f"[gpu_check] {row}", flush=True)
    for kernel, cases in _kernel_cases(device, shapes).items():
        if kernel not in to_run:
            continue
        for label, make, call in cases:
            row = dict(section="kernel", name=kernel, case=label, backend=GPU_BACKEND[kernel])
            try:
                backend = resolve_backend(kernel, GPU_BACKEND[kernel], device)  # explicit: no silent fallback
                inputs = make()
                twin = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
                calls_before = gpu_calls()[kernel]
                out_gpu = call(backend, **inputs)
                called = gpu_calls()[kernel] - calls_before
                out_torch = call("torch", **twin)
                upstream = torch.randn_like(out_torch)
                out_gpu.backward(upstream)
                out_torch.backward(upstream)
                torch.cuda.synchronize()
                errors = {"out": _rel(out_gpu, out_torch)}
                for name, tensor in twin.items():
                    if tensor.grad is not None:
                        errors[f"d{name}"] = _rel(inputs[name].grad, tensor.grad)
                worst = max(errors.values())
                milliseconds = _timed_ms(lambda: call(backend, **inputs).backward(upstream), repeats)
                ok = called > 0 and math.isfinite(worst) and worst <= TOLERANCE[kernel]
                note = " ".join(f"{k}={v:.1e}" for k, v in errors.items())
                row.update(
                    status="ok" if ok else "FAIL",
                    max_rel_err=worst,
                    ms=milliseconds,
                    note=note if called else "the GPU entry point was never called; " + note,
                )
            except Exception as err:  # keep going: one table for everything
                row.update(status="FAIL", note=f"{type(err).__name__}: {err}"[:300])
                traceback.print_exc()
            rows.append(row)
            print(f"[gpu_check] {row}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ models
MODEL_VARIANTS = [
    ("sasrec", {}),
    ("tisasrec", {}),
    ("mamba4rec", {"num_layers": 2}),
    ("ssd4rec", {}),
    ("ssd4rec", {"head_dim": 16}),  # n_heads 8: the fused SiLU convolution path
    ("tim4rec", {}),
    ("tim4rec", {"time_encoding": "causal"}),
    ("tim4rec", {"is_time": False}),
]


def random_batch(n_items: int, max_len: int, batch: int, device, generator):
    lengths = torch.randint(1, max_len + 1, (batch,), generator=generator)
    lengths[0] = max_len
    real = torch.arange(max_len)[None, :] < lengths[:, None]
    items = torch.randint(1, n_items + 1, (batch, max_len), generator=generator) * real
    gaps = torch.randint(0, 3 * 86400, (batch, max_len), generator=generator).double()
    stamps = (1.3e9 + gaps.cumsum(1)) * real
    targets = torch.randint(1, n_items + 1, (batch,), generator=generator)
    return items.to(device), stamps.to(device), lengths.to(device), targets.to(device)


def kernels_not_run(backends: dict[str, str], calls: dict[str, int], expected) -> list[str]:
    """The expected kernels among a model's that were not on their GPU backend or never called."""
    from models.kernels.backends import GPU_BACKEND

    return [k for k in backends if k in expected and (backends[k] != GPU_BACKEND[k] or calls.get(k, 0) == 0)]


def check_models(device, steps: int, batch_size: int, max_len: int, expected) -> list[dict]:
    import models
    from models.kernels.backends import gpu_calls

    n_items = 2000
    rows = []
    for name, options in MODEL_VARIANTS:
        label = name + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options.items()))
        row = dict(section="model", name=label, case=f"b{batch_size} l{max_len}")
        try:
            torch.manual_seed(0)
            model = models.build(name, n_items, max_len, options, kernel_backend="auto", device=device)
            backends = model.backend_report()
            row["backend"] = ",".join(f"{k}={v}" for k, v in backends.items()) or "torch"
            generator = torch.Generator().manual_seed(1)
            items, stamps, lengths, targets = random_batch(n_items, max_len, batch_size, device, generator)
            stamps = stamps if model.uses_timestamps else None
            # 1. the GPU-backend model against the same weights on torch kernels
            reference = models.build(name, n_items, max_len, options, kernel_backend="torch", device=device)
            reference.load_state_dict(model.state_dict())
            model.eval(), reference.eval()
            with torch.no_grad():
                forward_err = _rel(
                    model.last_hidden(items, stamps, lengths), reference.last_hidden(items, stamps, lengths)
                )
            del reference
            # 2. training steps
            model.train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            torch.cuda.reset_peak_memory_stats(device)
            losses, times = [], []
            calls_before = gpu_calls()
            for _step in range(steps):
                torch.cuda.synchronize()
                began = time.perf_counter()
                hidden = model.last_hidden(items, stamps, lengths)
                loss = torch.nn.functional.cross_entropy(model.score(hidden).float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - began)
                losses.append(loss.item())
            calls = {k: v - calls_before[k] for k, v in gpu_calls().items()}
            timed = times[3:] or times  # the first steps carry allocation and Triton autotuning
            not_run = kernels_not_run(backends, calls, expected)
            ok = not not_run and math.isfinite(losses[-1]) and losses[-1] < losses[0] and forward_err <= MODEL_TOLERANCE
            row.update(
                status="ok" if ok else "FAIL",
                max_rel_err=forward_err,
                ms=statistics.median(timed) * 1e3,
                note=(
                    f"loss {losses[0]:.3f}->{losses[-1]:.3f} "
                    f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB "
                    f"params {model.n_parameters()} gpu calls {calls}"
                    + (f"; expected GPU kernels not run: {not_run}" if not_run else "")
                ),
            )
            del model, optimizer
        except Exception as err:  # keep going: one table for everything
            row.update(status="FAIL", note=f"{type(err).__name__}: {err}"[:300])
            row.setdefault("backend", "-")
            traceback.print_exc()
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"[gpu_check] {row}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ harness commands
def _harness(argv: list[str]) -> tuple[int, str, float]:
    """`python -m harness ARGV` in this process (so the kernel call counters see it): exit status, the end of
    its output, seconds."""
    from harness.cli import main as harness_main

    captured = io.StringIO()
    began = time.perf_counter()
    try:
        with contextlib.redirect_stdout(captured):
            status = harness_main(argv)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:
        traceback.print_exc()
        status = 1
    output = captured.getvalue()
    print(output, flush=True)
    return status, output, time.perf_counter() - began


def _dynamo_graphs() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_beauty_training(expected) -> list[dict]:
    """One epoch of faithful TiM4Rec (two layers: the first runs the SSD scan on its backend) on amazon-beauty,
    its encoder through torch.compile (the `compile` setting), so the Triton kernels run inside compiled code."""
    from models.kernels.backends import gpu_calls

    # trim_item_path=false: one static width (max_len), so dynamo compiles a few graphs instead of one per
    # batch width (65 graphs in a CPU dry run on ml-100k with trimming), and the run fits in its 10 minutes
    argv = [
        "train",
        "--model",
        "tim4rec",
        "--dataset",
        "amazon-beauty",
        "--epochs",
        "1",
        "--device",
        "cuda",
        "--kernel-backend",
        "auto",
        "--set",
        "compile=true",
        "--set",
        "trim_item_path=false",
        "--no-track",
        "--no-progress",
    ]
    row = dict(section="train", name="tim4rec amazon-beauty", case="1 epoch, prefix, compiled", backend="auto")
    calls_before, graphs_before = gpu_calls(), _dynamo_graphs()
    status, output, seconds = _harness(argv)
    calls = {k: v - calls_before[k] for k, v in gpu_calls().items()}
    graphs = _dynamo_graphs() - graphs_before
    not_run = [k for k in ("ssd_scan", "rmsnorm_gated") if k in expected and calls[k] == 0]
    ok = status == 0 and not not_run and graphs > 0
    row.update(
        status="ok" if ok else "FAIL",
        ms=seconds * 1e3,
        note=(
            f"exit {status}, compiled graphs {graphs}, gpu calls {calls}"
            + (f"; expected GPU kernels not run: {not_run}" if not_run else "")
            + ("" if graphs else "; nothing was compiled")
        ),
    )
    print(f"[gpu_check] {row}", flush=True)
    row["output"] = output
    return [row]


def check_bench(expected) -> list[dict]:
    """`harness bench` on CUDA for the five models, kernel backends "auto"."""
    from models.kernels.backends import gpu_calls

    argv = [
        "bench",
        "--models",
        BENCH_MODELS,
        "--device",
        "cuda",
        "--backend",
        "auto",
        "--repeats",
        "5",
        "--warmup",
        "3",
        "--batch-size",
        "256",
        "--seq-len",
        "50",
    ]
    row = dict(section="bench", name=BENCH_MODELS, case="b256 l50 prefix", backend="auto")
    calls_before = gpu_calls()
    status, output, seconds = _harness(argv)
    calls = {k: v - calls_before[k] for k, v in gpu_calls().items()}
    not_run = [k for k in KERNELS if k in expected and calls[k] == 0]
    ok = status == 0 and not not_run
    row.update(
        status="ok" if ok else "FAIL",
        ms=seconds * 1e3,
        note=(f"exit {status}, gpu calls {calls}" + (f"; expected GPU kernels not run: {not_run}" if not_run else "")),
    )
    print(f"[gpu_check] {row}", flush=True)
    row["output"] = output  # the bench table, written after the check's own table
    return [row]


# ------------------------------------------------------------------------------------------ report
COLUMNS = ["section", "name", "case", "backend", "status", "max_rel_err", "ms", "note"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2e}" if value < 0.01 or value >= 1e5 else f"{value:.1f}"
    return str(value)


def render(rows: list[dict], header: str) -> str:
    cells = [[_cell(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(COLUMNS)]
    widths[-1] = len(COLUMNS[-1])  # the note is left unpadded
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([header, line(COLUMNS), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def exit_status(rows: list[dict]) -> int:
    """1 when any row failed or an expected kernel is missing, else 0."""
    return 1 if any(r.get("status") in FAILING for r in rows) else 0


def write_report(rows: list[dict], header: str, args, seconds: float) -> str:
    failed = [r for r in rows if r.get("status") in FAILING]
    table = (
        render(rows, header) + f"\n({seconds:.0f} s; {len(rows)} rows, {len(failed)} failed or missing; "
        f"exit status {exit_status(rows)})"
    )
    outputs = [f"\n--- {r['section']} output ---\n{r['output']}" for r in rows if r.get("output")]
    Path(args.out).write_text(table + "\n" + "".join(outputs))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str))
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available on this machine (torch "
            f"{torch.__version__}, cuda build {torch.version.cuda}); nothing to check. Run it on the GPU machine."
        )
        return 2
    installed = install_wheels(args.wheels) if args.wheels else []
    if args.data_dir:
        os.environ["HARNESS_DATA_DIR"] = str(Path(args.data_dir).resolve())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "mamba_ssm", "causal_conv1d", "einops"):
        try:
            from importlib.metadata import version

            versions[package] = version(package.replace("_", "-"))
        except Exception:
            versions[package] = "absent"
    header = (
        f"gpu_check on {torch.cuda.get_device_name(device)} | python {platform.python_version()} | "
        + " ".join(f"{k} {v}" for k, v in versions.items())
        + f" | expected GPU kernels: {','.join(args.expect)}"
        + (f" | wheels: {', '.join(installed)}" if installed else "")
    )
    print(header, flush=True)
    started = time.perf_counter()
    rows = check_kernels(device, args.expect)
    write_report(rows, header, args, time.perf_counter() - started)
    sections = {
        "models": lambda: check_models(device, args.steps, args.batch, args.max_len, args.expect),
        "train": lambda: check_beauty_training(args.expect),
        "bench": lambda: check_bench(args.expect),
    }
    for section, run in sections.items():
        if section in args.skip:
            continue
        rows += run()
        write_report(rows, header, args, time.perf_counter() - started)
    print(write_report(rows, header, args, time.perf_counter() - started), flush=True)
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
