"""The one prepared GPU check: run it on a CUDA machine, in one call, from the repository root.

    python scripts/gpu_check.py [--wheels DIR] [--out gpu_check.txt] [--json gpu_check.json] [--steps 20]

1. (optional) installs the wheels carried in DIR with `pip install --no-deps DIR/*.whl` (mamba-ssm built without
   its compiled selective scan, causal-conv1d, ...), before anything imports them;
2. compares every GPU kernel backend with its torch twin on random float32 inputs: forward output and the
   gradient of every differentiable input, as max|gpu - torch| / max|torch| (TF32 off for the torch side);
3. for every registered model (and the TiM4Rec variants), on CUDA with kernel_backend="auto": the forward of the
   GPU-backend model against the same weights on the torch backend (eval mode), then a few Adam steps on random
   data (loss first -> last, median step time after warm-up with CUDA synchronised, peak memory, backends used);
4. prints one table and writes it to --out (and the rows as JSON to --json).

Without CUDA it exits with status 2 and a one-line message. Exit status 1 when a comparison exceeds its
tolerance or a model fails; 0 otherwise. Uses only torch and models/ (no harness dependencies), random data.
"""
from __future__ import annotations

import argparse
import glob
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

# max relative error tolerated per kernel (the Triton SSD kernels use TF32 dot products internally)
TOLERANCE = {"ssd_scan": 5e-3, "selective_scan": 1e-3, "causal_conv1d": 1e-4, "rmsnorm_gated": 1e-4}
MODEL_TOLERANCE = 1e-2  # whole-model forward, GPU backends vs torch backends


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", help="folder of .whl files to `pip install --no-deps` first")
    parser.add_argument("--out", default="gpu_check.txt", help="write the summary table here")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--steps", type=int, default=20, help="training steps per model")
    parser.add_argument("--batch", type=int, default=256, help="training batch size")
    parser.add_argument("--max-len", type=int, default=50, help="sequence length of the random data")
    parser.add_argument("--skip-train", action="store_true", help="only compare the kernels")
    return parser.parse_args(argv)


def install_wheels(folder: str) -> list[str]:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        print(f"[gpu_check] no wheels in {folder}", flush=True)
        return []
    print(f"[gpu_check] pip install --no-deps {' '.join(os.path.basename(w) for w in wheels)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *wheels],
                            capture_output=True, text=True)
    print(result.stdout[-2000:], result.stderr[-2000:], sep="\n", flush=True)
    if result.returncode:
        print(f"[gpu_check] pip exited with {result.returncode}; continuing with what is installed", flush=True)
    return [os.path.basename(w) for w in wheels]


# ------------------------------------------------------------------------------------------ kernels
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _kernel_cases(device):
    """kernel -> list of (label, make_inputs(), call(backend, **inputs), names of inputs with gradients)."""
    from models.kernels.causal_conv import causal_conv1d
    from models.kernels.rmsnorm_gated import rms_norm_gated
    from models.kernels.selective_scan import selective_scan
    from models.kernels.ssd_scan import ssd_scan

    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device).requires_grad_()

    def ssd(batch, seqlen, nheads, headdim, dstate, chunk):
        def make():
            return dict(x=leaf(batch, seqlen, nheads, headdim), dt=leaf(batch, seqlen, nheads, shift=-1.0),
                        A=(-torch.linspace(1, 16, nheads)).to(device).requires_grad_(),
                        B=leaf(batch, seqlen, 1, dstate), C=leaf(batch, seqlen, 1, dstate), D=leaf(nheads),
                        dt_bias=leaf(nheads, scale=0.5, shift=-3.0))
        call = lambda backend, **kw: ssd_scan(**kw, chunk_size=chunk, dt_softplus=True, backend=backend)  # noqa
        return (f"b{batch} l{seqlen} h{nheads}x{headdim} n{dstate} chunk{chunk}", make, call)

    def scan(batch, dim, seqlen, dstate):
        def make():
            A = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
            return dict(u=leaf(batch, dim, seqlen), delta=leaf(batch, dim, seqlen, scale=0.5, shift=-2.0),
                        A=A.to(device).requires_grad_(), B=leaf(batch, dstate, seqlen), C=leaf(batch, dstate, seqlen),
                        D=leaf(dim), z=leaf(batch, dim, seqlen), delta_bias=leaf(dim, scale=0.1))
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

    return {
        "ssd_scan": [ssd(64, 50, 4, 32, 32, 32), ssd(16, 200, 4, 32, 32, 32), ssd(8, 200, 2, 128, 64, 32),
                     ssd(32, 77, 8, 16, 32, 16)],
        "selective_scan": [scan(64, 128, 50, 32), scan(8, 128, 200, 32)],
        "causal_conv1d": [conv(64, 192, 50, 4, "silu"), conv(64, 192, 50, 4, None), conv(64, 4, 50, 4, None),
                          conv(8, 128, 200, 4, "silu")],
        "rmsnorm_gated": [norm(64, 50, 128), norm(8, 200, 512)],
    }


def check_kernels(device) -> list[dict]:
    from models.kernels.backends import KernelBackendError, gpu_backend_problem, resolve_backend

    rows = []
    for kernel, cases in _kernel_cases(device).items():
        problem = gpu_backend_problem(kernel)
        if problem is not None:
            rows.append(dict(section="kernel", name=kernel, case="-", backend="unavailable", status="SKIP",
                             note=problem[:160]))
            continue
        backend = resolve_backend(kernel, "auto", device)
        for label, make, call in cases:
            row = dict(section="kernel", name=kernel, case=label, backend=backend)
            try:
                inputs = make()
                twin = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
                out_gpu = call(backend, **inputs)
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
                ok = math.isfinite(worst) and worst <= TOLERANCE[kernel]
                row.update(status="ok" if ok else "FAIL", max_rel_err=worst,
                           note=" ".join(f"{k}={v:.1e}" for k, v in errors.items()))
            except (KernelBackendError, Exception) as err:  # keep going: one table for everything
                row.update(status="FAIL", note=f"{type(err).__name__}: {err}"[:200])
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


def check_models(device, steps: int, batch_size: int, max_len: int) -> list[dict]:
    import models

    n_items = 2000
    rows = []
    for name, options in MODEL_VARIANTS:
        label = name + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options.items()))
        row = dict(section="model", name=label, case=f"b{batch_size} l{max_len}")
        try:
            torch.manual_seed(0)
            model = models.build(name, n_items, max_len, options, kernel_backend="auto", device=device)
            row["backend"] = ",".join(f"{k}={v}" for k, v in model.backend_report().items()) or "torch"
            generator = torch.Generator().manual_seed(1)
            items, stamps, lengths, targets = random_batch(n_items, max_len, batch_size, device, generator)
            stamps = stamps if model.uses_timestamps else None
            # 1. the GPU-backend model against the same weights on torch kernels
            reference = models.build(name, n_items, max_len, options, kernel_backend="torch", device=device)
            reference.load_state_dict(model.state_dict())
            model.eval(), reference.eval()
            with torch.no_grad():
                forward_err = _rel(model.last_hidden(items, stamps, lengths),
                                   reference.last_hidden(items, stamps, lengths))
            del reference
            # 2. training steps
            model.train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            torch.cuda.reset_peak_memory_stats(device)
            losses, times = [], []
            for step in range(steps):
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
            timed = times[3:] or times  # the first steps carry allocation and Triton autotuning
            ok = (math.isfinite(losses[-1]) and losses[-1] < losses[0] and forward_err <= MODEL_TOLERANCE)
            row.update(status="ok" if ok else "FAIL", max_rel_err=forward_err,
                       note=(f"loss {losses[0]:.3f}->{losses[-1]:.3f} step {statistics.median(timed) * 1e3:.1f} ms "
                             f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB "
                             f"params {model.n_parameters()}"))
            del model, optimizer
        except Exception as err:  # keep going: one table for everything
            row.update(status="FAIL", note=f"{type(err).__name__}: {err}"[:200])
            row.setdefault("backend", "-")
            traceback.print_exc()
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"[gpu_check] {row}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ report
def render(rows: list[dict], header: str) -> str:
    columns = ["section", "name", "case", "backend", "status", "max_rel_err", "note"]
    cells = [[("" if r.get(c) is None else (f"{r[c]:.2e}" if isinstance(r.get(c), float) else str(r[c])))
              for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    widths[-1] = len(columns[-1])  # the note is left unpadded
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([header, line(columns), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (torch "
              f"{torch.__version__}, cuda build {torch.version.cuda}); nothing to check. Run it on the GPU machine.")
        return 2
    installed = install_wheels(args.wheels) if args.wheels else []
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "mamba_ssm", "causal_conv1d"):
        try:
            from importlib.metadata import version

            versions[package] = version(package.replace("_", "-"))
        except Exception:
            versions[package] = "absent"
    header = (f"gpu_check on {torch.cuda.get_device_name(device)} | python {platform.python_version()} | "
              + " ".join(f"{k} {v}" for k, v in versions.items())
              + (f" | wheels: {', '.join(installed)}" if installed else ""))
    print(header, flush=True)
    started = time.perf_counter()
    rows = check_kernels(device)
    if not args.skip_train:
        rows += check_models(device, args.steps, args.batch, args.max_len)
    table = render(rows, header) + f"\n({time.perf_counter() - started:.0f} s)"
    try:
        from rich.console import Console
        from rich.table import Table

        pretty = Table(title=header)
        for column in ("section", "name", "case", "backend", "status", "max_rel_err", "note"):
            pretty.add_column(column)
        for r in rows:
            pretty.add_row(*[("" if r.get(c) is None else (f"{r[c]:.2e}" if isinstance(r[c], float) else str(r[c])))
                             for c in ("section", "name", "case", "backend", "status", "max_rel_err", "note")])
        Console(width=200).print(pretty)
    except ImportError:
        print(table)
    Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str))
    failed = [r for r in rows if r.get("status") == "FAIL"]
    print(f"[gpu_check] {len(rows)} rows, {len(failed)} failed; table written to {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
