"""End-to-end model benchmarks: training throughput, full-ranking inference, peak memory.

One cell = one (model, hidden size, sequence length, batch size, chunk size, kernel backend, training
protocol). For every cell on the chosen axes (`cells`), `run_benchmark` measures:

- training: one optimiser step (forward, full-softmax cross-entropy over every item with the tied item
  table, backward, Adam step) on a batch of `batch_size` sequences of `seq_len` items. Reported as
  sequences/s (batch / step time), positions/s (supervised (history, next item) pairs per second: one per
  sequence with the `prefix` protocol, one per real position with `all_positions`) and tokens/s (input
  positions processed per second);
- inference: full ranking of `infer_batch_size` users: encode, score every item, mask the padding id, rank
  the target (the work `harness.evaluate` does per batch). Reported as users/s and latency per batch (ms);
- peak memory of one training step and of one inference batch.

Timing rules (docs/design.md#measurement): `warmup` untimed steps first (they also absorb allocator growth, lazy
initialisation and Triton autotuning), `torch.cuda.synchronize()` before every clock read on CUDA, then
`repeats` timed steps; the median is the figure, the spread is reported as the interquartile range and the
min/max. Memory is measured in a separate, untimed step:

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (memory_source
  "cuda.max_memory_allocated": every live tensor of the process on that device, weights and optimiser state
  included);
- CPU: the torch profiler's allocation trace (`profile_memory=True`): the highest running sum of tensor
  allocations minus frees during the step, plus the bytes of the parameters, gradients and optimiser state
  that were live before it (memory_source "torch.profiler.cpu-allocations+state"). It counts tensors only
  (not the Python heap or allocator caches), the closest CPU analogue of the CUDA figure.

Data: synthetic by default (uniform random item ids in 1..n_items, every sequence full length, increasing
timestamps with exponential gaps) or, with `dataset`, batches drawn from the dataset's own training and test
windows (lengths vary, so the cost reflects the real padding).

Rows are plain dicts (see `BenchRow keys` in `BENCH_METRICS` and `AXES`), printable with `render_table` and
loggable to MLflow with `log_rows` (experiment "bench", run kind bench, one run per cell); the report reads them
back from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from harness.allocator import keep_freed_memory
from harness.compiling import EAGER, compile_encoder
from harness.errors import UserError
from harness.store import contract as tc
from harness.store.contract import BENCH_METRICS
from harness.train import resolve_device, training_loss

#: the axes of one cell, in table order
AXES = ("model", "backend", "hidden", "seq_len", "batch_size", "chunk_size", "protocol", "compile")
DEFAULT_N_ITEMS = 3416  # ML-1M after 5-core filtering: the synthetic catalogue size
PROTOCOLS = ("prefix", "all_positions")
MEMORY_CUDA = "cuda.max_memory_allocated"
MEMORY_CPU = "torch.profiler.cpu-allocations+state"
MEMORY_NONE = "unavailable"


class BenchError(UserError, ValueError):
    """A benchmark request that cannot run (unknown axis value, empty product)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    backend: str
    hidden: int
    seq_len: int
    batch_size: int
    chunk_size: int | None
    protocol: str
    #: the encoder run eagerly or through torch.compile (harness/compiling.py)
    compile: bool = False

    def label(self) -> str:
        chunk = f" c{self.chunk_size}" if self.chunk_size else ""
        compiled = "+compiled" if self.compile else ""
        return f"{self.model}/{self.backend}{compiled}{chunk}/{self.protocol}"


@dataclasses.dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    notes: list[str]
    machine: dict[str, Any]


# ----------------------------------------------------------------------------------------- machine


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)  # others on the CPU distort timings
    return info


# ----------------------------------------------------------------------------------------- cells


def supports_chunk_size(model: str) -> bool:
    """SSD models expose a `chunk_size` option (read from the model's config class)."""
    import models

    return "chunk_size" in {f.name for f in dataclasses.fields(models.model_class(model).config_class)}


def cells(
    models_: Sequence[str],
    hiddens: Sequence[int],
    seq_lens: Sequence[int],
    batch_size: int,
    chunk_sizes: Sequence[int | None],
    backends: Sequence[str],
    protocols: Sequence[str],
    compiles: Sequence[bool] = (False,),
) -> tuple[list[Cell], list[str]]:
    """The product of the axes, ordered by shape (hidden, seq_len) first so that every shape's cells
    sit together; chunk sizes apply to SSD models only (others get one cell with chunk '-')."""
    notes: list[str] = []
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise BenchError(f"unknown protocol(s) {bad}; expected {', '.join(PROTOCOLS)}")
    chunked = {m: supports_chunk_size(m) for m in models_}
    real_chunks = [c for c in chunk_sizes if c]
    if real_chunks:
        for model in models_:
            if not chunked[model]:
                notes.append(f"{model}: chunk_size applies to SSD models only; one cell per shape")
    out: list[Cell] = []
    for hidden, seq_len in itertools.product(hiddens, seq_lens):
        for model, backend in itertools.product(models_, backends):
            for chunk in (real_chunks or [None]) if chunked[model] else [None]:
                for protocol, compiled in itertools.product(protocols, compiles):
                    out.append(Cell(model, backend, hidden, seq_len, batch_size, chunk, protocol, compiled))
    return out, notes


# ----------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class _Batch:
    items: torch.Tensor
    timestamps: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor  # [batch] (prefix / inference) or [batch, length] (all_positions)


def _synthetic(batch: int, seq_len: int, n_items: int, all_positions: bool, seed: int) -> _Batch:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (batch, seq_len + 1), generator=g)
    gaps = torch.empty(batch, seq_len).exponential_(1.0 / 3600.0, generator=g)
    stamps = 1.0e9 + torch.cumsum(gaps.double(), dim=1)
    targets = items[:, 1:] if all_positions else items[:, -1]
    return _Batch(items[:, :seq_len].contiguous(), stamps, torch.full((batch,), seq_len), targets.contiguous())


class _RealData:
    """Batches cut from a dataset's own windows (training windows for training, test windows for
    inference), drawn at random with a fixed seed."""

    def __init__(self, name: str):
        from harness.data.catalogue import load

        self.data = load(name)
        self.name = self.data.name

    def batch(self, split: str, protocol: str, batch: int, seq_len: int, width: int | None, seed: int):
        from harness.data.samples import eval_windows, gather, training_windows

        all_positions = split == "train" and protocol == "all_positions"
        windows = (
            training_windows(self.data, protocol, seq_len)
            if split == "train"
            else eval_windows(self.data, "test", seq_len)
        )
        rng = np.random.default_rng(seed)
        index = rng.choice(len(windows), size=min(batch, len(windows)), replace=False)
        b = gather(self.data, windows.subset(np.sort(index)), width, all_positions)
        return _Batch(b.items, b.timestamps, b.lengths, b.targets)


# ----------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _spread(times: Sequence[float], scale: float) -> dict[str, float]:
    x = np.asarray(times, dtype=float) * scale
    q1, q3 = np.percentile(x, [25, 75])
    return {
        "median": float(np.median(x)),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    for buffer in model.buffers():
        total += buffer.numel() * buffer.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    total += value.numel() * value.element_size()
    return total


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop and allocator notices on fd 2; hide them."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(step: Callable[[], Any]) -> int | None:
    """Highest running sum of tensor allocations minus frees during `step` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # private profiler API moved: report memory as unavailable
        return None
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += int(event.nbytes())
        peak = max(peak, running)
    return peak


def _peak_memory(step, model, optimizer, device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, MEMORY_CUDA
    before = _state_bytes(model, optimizer)
    peak = _cpu_peak_bytes(step)
    if peak is None:
        return float("nan"), MEMORY_NONE
    return (before + peak) / 2**20, MEMORY_CPU


# ----------------------------------------------------------------------------------------- one cell


def run_cell(
    cell: Cell,
    *,
    n_items: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    infer_batch_size: int | None = None,
    model_params: dict[str, Any] | None = None,
    real: _RealData | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure one cell; raises models.ModelConfigError for an invalid combination (the caller notes
    it and moves on)."""
    import models
    from harness.evaluate import target_ranks

    params = dict(model_params or {})
    params["hidden_size"] = cell.hidden
    if cell.chunk_size:
        params["chunk_size"] = cell.chunk_size
    torch.manual_seed(seed)
    model = models.build(cell.model, n_items, cell.seq_len, params, kernel_backend=cell.backend, device=device)
    compiled = compile_encoder(model, cell.compile, device)
    if cell.compile and compiled == EAGER:
        raise models.ModelConfigError(f"{cell.model}: compilation asked for but unavailable here (see the warning)")
    if cell.protocol == "all_positions" and not model.is_causal:
        raise models.ModelConfigError(
            f"{cell.model} with these options is not causal: all_positions training would leak targets"
        )
    width = None if model.trims_padding else cell.seq_len
    infer_batch = infer_batch_size or cell.batch_size
    all_positions = cell.protocol == "all_positions"
    if real is None:
        train_batch = _synthetic(cell.batch_size, cell.seq_len, n_items, all_positions, seed)
        infer = _synthetic(infer_batch, cell.seq_len, n_items, False, seed + 1)
        data_name = "synthetic"
    else:
        train_batch = real.batch("train", cell.protocol, cell.batch_size, cell.seq_len, width, seed)
        infer = real.batch("test", cell.protocol, infer_batch, cell.seq_len, width, seed + 1)
        data_name = real.name
    train_batch = _Batch(*(t.to(device) for t in dataclasses.astuple(train_batch)))
    infer = _Batch(*(t.to(device) for t in dataclasses.astuple(infer)))
    n_sequences = int(train_batch.items.size(0))
    n_positions = int((train_batch.targets != 0).sum()) if all_positions else n_sequences
    n_tokens = int(train_batch.lengths.sum())
    n_users = int(infer.items.size(0))

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step():
        model.train()
        loss = training_loss(model, train_batch, cell.protocol)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step():
        model.eval()
        timestamps = infer.timestamps if model.uses_timestamps else None
        hidden = model.last_hidden(infer.items, timestamps, infer.lengths)
        scores = model.score(hidden).float()
        scores[:, 0] = float("-inf")
        return target_ranks(scores, infer.targets)

    train_times = _time(train_step, repeats, warmup, device)
    infer_times = _time(infer_step, repeats, warmup, device)
    train_peak, source = _peak_memory(train_step, model, optimizer, device)
    infer_peak, _ = _peak_memory(infer_step, model, None, device)

    train = _spread(train_times, 1000.0)
    infer_ms = _spread(infer_times, 1000.0)
    step_s = train["median"] / 1000.0
    infer_s = infer_ms["median"] / 1000.0
    backends = model.backend_report()
    row: dict[str, Any] = dataclasses.asdict(cell)
    row.update(
        kernel_backends=",".join(f"{k}={v}" for k, v in sorted(backends.items())) or "torch",
        infer_batch_size=n_users,
        n_items=n_items,
        data=data_name,
        device=str(device),
        repeats=repeats,
        warmup=warmup,
        train_seqs_per_s=n_sequences / step_s,
        train_positions_per_s=n_positions / step_s,
        train_tokens_per_s=n_tokens / step_s,
        train_step_ms=train["median"],
        train_step_ms_q1=train["q1"],
        train_step_ms_q3=train["q3"],
        train_step_ms_min=train["min"],
        train_step_ms_max=train["max"],
        infer_users_per_s=n_users / infer_s,
        infer_latency_ms=infer_ms["median"],
        infer_latency_ms_q1=infer_ms["q1"],
        infer_latency_ms_q3=infer_ms["q3"],
        infer_latency_ms_min=infer_ms["min"],
        infer_latency_ms_max=infer_ms["max"],
        peak_memory_mb=train_peak,
        infer_peak_memory_mb=infer_peak,
        memory_source=source,
        n_parameters=model.n_parameters(),
        model_params={k: v for k, v in model.config.to_dict().items()},
    )
    return row


# ----------------------------------------------------------------------------------------- the run


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios side by side: each row against the first row of the run with the same shape (hidden,
    seq_len, batch size). Training compares positions/s (samples per second, so prefix and
    all_positions are comparable), inference users/s, memory the training peak."""
    first: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["hidden"], row["seq_len"], row["batch_size"])
        base = first.setdefault(key, row)
        row["baseline"] = Cell(**{a: base[a] for a in AXES}).label()
        row["train_ratio"] = row["train_positions_per_s"] / base["train_positions_per_s"]
        row["infer_ratio"] = row["infer_users_per_s"] / base["infer_users_per_s"]
        mem, base_mem = row["peak_memory_mb"], base["peak_memory_mb"]
        row["memory_ratio"] = mem / base_mem if base_mem and np.isfinite(base_mem) else float("nan")


def run_benchmark(
    models_: Sequence[str],
    hiddens: Sequence[int] = (64,),
    seq_lens: Sequence[int] = (50,),
    batch_size: int = 256,
    chunk_sizes: Sequence[int | None] = (None,),
    backends: Sequence[str] = ("auto",),
    protocols: Sequence[str] = ("prefix",),
    compiles: Sequence[bool] = (False,),
    repeats: int = 5,
    warmup: int = 2,
    dataset: str | None = None,
    n_items: int = DEFAULT_N_ITEMS,
    infer_batch_size: int | None = None,
    device: str = "auto",
    model_params: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> BenchResult:
    """Measure every valid cell of the axes' product; invalid cells become notes."""
    import models

    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise BenchError("repeats and batch size must be positive and warmup non-negative")
    for name in models_:
        models.model_class(name)  # unknown model: one clear error before any work
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # as training does (harness/allocator.py), so the figures match it
    plan, notes = cells(models_, hiddens, seq_lens, batch_size, chunk_sizes, backends, protocols, compiles)
    for note in notes:
        if on_note:
            on_note(note)
    real = _RealData(dataset) if dataset else None
    if real is not None:
        n_items = real.data.n_items
    rows: list[dict[str, Any]] = []
    for cell in plan:
        try:
            row = run_cell(
                cell,
                n_items=n_items,
                repeats=repeats,
                warmup=warmup,
                device=dev,
                infer_batch_size=infer_batch_size,
                model_params=model_params,
                real=real,
            )
        except (models.ModelConfigError, ValueError) as err:
            note = f"skipped {cell.label()} h{cell.hidden} L{cell.seq_len}: {str(err).splitlines()[0]}"
            notes.append(note)
            if on_note:
                on_note(note)
            continue
        except torch.OutOfMemoryError:
            note = f"skipped {cell.label()} h{cell.hidden} L{cell.seq_len}: out of memory"
            notes.append(note)
            if on_note:
                on_note(note)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the cell's model and optimizer went with run_cell's frame
        rows.append(row)
        if on_row:
            on_row(row)
    add_ratios(rows)
    return BenchResult(rows=rows, notes=notes, machine=machine_description(dev))


# ----------------------------------------------------------------------------------------- output


def _fmt_spread(median: float, low: float, high: float, digits: int = 1) -> str:
    return f"{median:,.{digits}f} [{low:,.{digits}f}-{high:,.{digits}f}]"


def _backend_label(row: dict[str, Any]) -> str:
    """Requested backend and, when it was 'auto', what ran (the distinct per-kernel backends)."""
    ran = sorted({part.partition("=")[2] or part for part in row["kernel_backends"].split(",")})
    label = row["backend"] if row["backend"] != "auto" else "auto->" + "+".join(ran)
    return label + (" compiled" if row.get("compile") else "")


def render_table(result: BenchResult, title: str | None = None):
    """A rich Table: throughputs as median [IQR], latency as median [min-max], ratios (x) vs the
    first row of the same shape."""
    from rich.markup import escape
    from rich.table import Table

    m = result.machine
    sources = sorted({r["memory_source"] for r in result.rows}) or [MEMORY_NONE]
    batches = sorted({(r["batch_size"], r["infer_batch_size"]) for r in result.rows})
    caption = (
        f"machine: {m['device_name']} ({m['device']}), {m['cpu_cores']} CPU cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}"
        + (f", 1-min load avg {m['load_avg_1min']}" if "load_avg_1min" in m else "")
        + ". Batch (train/infer): "
        + ", ".join(f"{a}/{b}" for a, b in batches)
        + f". Peak memory: {', '.join(sources)}. Medians after warm-up; [a-b] = IQR for throughput, "
        "min-max for latency; x = ratio to the first row of the same shape (train: positions/s, "
        "infer: users/s, mem: training peak)."
    )
    table = Table(title=escape(title or "model benchmark"), caption=escape(caption), caption_justify="left")
    for column, justify in (
        ("model", "left"),
        ("backend", "left"),
        ("h", "right"),
        ("L", "right"),
        ("chunk", "right"),
        ("protocol", "left"),
        ("train seq/s", "right"),
        ("train pos/s", "right"),
        ("x", "right"),
        ("infer users/s", "right"),
        ("latency ms", "right"),
        ("x", "right"),
        ("peak MB train", "right"),
        ("peak MB infer", "right"),
        ("x", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column not in ("train pos/s", "latency ms"))
    previous = None
    for row in result.rows:
        shape = (row["hidden"], row["seq_len"], row["batch_size"])
        if previous is not None and shape != previous:
            table.add_section()
        previous = shape
        # throughput spread from the step-time quartiles (the slow quartile = the low throughput)
        per_step = row["train_seqs_per_s"] * row["train_step_ms"] / 1000.0  # sequences per step
        pos_per_step = row["train_positions_per_s"] * row["train_step_ms"] / 1000.0
        q1_s, q3_s = row["train_step_ms_q1"] / 1000.0, row["train_step_ms_q3"] / 1000.0
        seqs = _fmt_spread(row["train_seqs_per_s"], per_step / q3_s, per_step / q1_s, 0)
        positions = _fmt_spread(row["train_positions_per_s"], pos_per_step / q3_s, pos_per_step / q1_s, 0)
        table.add_row(
            *(
                escape(cell)
                for cell in (
                    row["model"],
                    _backend_label(row),
                    str(row["hidden"]),
                    str(row["seq_len"]),
                    str(row["chunk_size"] or "-"),
                    row["protocol"],
                    seqs,
                    positions,
                    f"{row['train_ratio']:.2f}",
                    f"{row['infer_users_per_s']:,.0f}",
                    _fmt_spread(row["infer_latency_ms"], row["infer_latency_ms_min"], row["infer_latency_ms_max"], 1),
                    f"{row['infer_ratio']:.2f}",
                    f"{row['peak_memory_mb']:,.1f}",
                    f"{row['infer_peak_memory_mb']:,.1f}",
                    f"{row['memory_ratio']:.2f}",
                )
            )
        )
    return table


def log_rows(
    rows: Iterable[dict[str, Any]], machine: dict[str, Any], tracking_uri: str | None = None, experiment: str = "bench"
) -> list[str]:
    """One MLflow run per cell in experiment `experiment` (run kind bench): axes and settings as
    params, the measurements in BENCH_METRICS as metrics, memory_source and the machine as tags."""
    from harness.store.writer import Tracker, git_commit, library_versions

    tracker = Tracker(tracking_uri, experiment)
    run_ids = []
    for row in rows:
        params = {a: ("" if row[a] is None else row[a]) for a in AXES}
        params.update({k: row[k] for k in ("infer_batch_size", "n_items", "data", "device", "repeats", "warmup")})
        params.update({f"model.{k}": v for k, v in row.get("model_params", {}).items()})
        tags = {
            tc.KIND: tc.KIND_BENCH,
            tc.MODEL_TAG: row["model"],
            tc.BENCH_MEMORY_SOURCE: row["memory_source"],
            tc.KERNEL_BACKEND: row["kernel_backends"],
            tc.DEVICE_NAME: machine.get("device_name", ""),
            "machine": ", ".join(f"{k}={v}" for k, v in machine.items()),
            tc.GIT_COMMIT: git_commit(),
            **{f"version.{k}": v for k, v in library_versions().items()},
        }
        name = f"bench-{Cell(**{a: row[a] for a in AXES}).label()}-h{row['hidden']}-L{row['seq_len']}"
        run_id = tracker.start_run(name, params, tags)
        tracker.log_metrics(run_id, {k: row[k] for k in BENCH_METRICS if k in row})
        tracker.end_run(run_id)
        row["run_id"] = run_id
        run_ids.append(run_id)
    return run_ids
