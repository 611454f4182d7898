"""Measuring: one cell (`run_cell`: a training step and a full-ranking inference batch, timed and
their peak memory), and every valid cell of the axes' product (`run_benchmark`) with each row's
ratios to the first row of its shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from harness.allocator import keep_freed_memory
from harness.bench.cells import AXES, DEFAULT_N_ITEMS, BenchCell, BenchError, ModelSpec, cells
from harness.bench.data import Batch, RealData, synthetic
from harness.bench.machine import machine_description
from harness.bench.timing import peak_memory, spread, time_step
from harness.compiling import EAGER, compile_encoder
from harness.config import NOT_CAUSAL, leaks_targets
from harness.train import make_adam, resolve_device, training_loss


@dataclasses.dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    notes: list[str]
    machine: dict[str, Any]


@dataclasses.dataclass
class PreparedCell:
    """A cell built and warmed up, ready to be timed: its model, optimiser, batches and steps."""

    cell: BenchCell
    model: Any
    optimizer: Any
    train_step: Callable[[], Any]
    infer_step: Callable[[], Any]
    counts: dict[str, Any]  # sequences, positions, tokens and users per step; data and items
    device: torch.device
    train_times: list[float] = dataclasses.field(default_factory=list)
    infer_times: list[float] = dataclasses.field(default_factory=list)


def prepare_cell(
    cell: BenchCell,
    *,
    n_items: int,
    warmup: int,
    device: torch.device,
    infer_batch_size: int | None = None,
    model_params: dict[str, Any] | None = None,
    real: RealData | None = None,
    seed: int = 0,
) -> PreparedCell:
    """Build one cell and run its untimed warm-up steps; raises models.ModelConfigError for an invalid
    combination (the caller notes it and moves on)."""
    import models
    from harness.evaluate import batch_ranks

    params = dict(model_params or {})
    params.update(cell.options)  # a variant's own options over --set's
    params["hidden_size"] = cell.hidden
    if cell.chunk_size:
        params["chunk_size"] = cell.chunk_size
    torch.manual_seed(seed)
    model = models.build(cell.registered, n_items, cell.seq_len, params, kernel_backend=cell.backend, device=device)
    compiled = compile_encoder(model, cell.compile, device)
    if cell.compile and compiled == EAGER:
        raise models.ModelConfigError(f"{cell.model}: compilation asked for but unavailable here (see the warning)")
    if leaks_targets(cell.protocol, model):
        raise models.ModelConfigError(f"{cell.model} with these options {NOT_CAUSAL}")
    width = None if model.trims_padding else cell.seq_len
    infer_batch = infer_batch_size or cell.batch_size
    all_positions = cell.protocol == "all_positions"
    if real is None:
        train_batch = synthetic(cell.batch_size, cell.seq_len, n_items, all_positions, seed)
        infer = synthetic(infer_batch, cell.seq_len, n_items, False, seed + 1)
        data_name = "synthetic"
    else:
        train_batch = real.batch("train", cell.protocol, cell.batch_size, cell.seq_len, width, seed)
        infer = real.batch("test", cell.protocol, infer_batch, cell.seq_len, width, seed + 1)
        data_name = real.name
    train_batch = Batch(*(t.to(device) for t in dataclasses.astuple(train_batch)))
    infer = Batch(*(t.to(device) for t in dataclasses.astuple(infer)))
    counts = dict(
        sequences=int(train_batch.items.size(0)),
        positions=int((train_batch.targets != 0).sum()) if all_positions else int(train_batch.items.size(0)),
        tokens=int(train_batch.lengths.sum()),
        users=int(infer.items.size(0)),
        data=data_name,
        n_items=n_items,
    )
    optimizer = make_adam(model.parameters(), 1e-3, 0.0, device)  # as training builds it

    def train_step():
        model.train()
        loss = training_loss(model, train_batch, cell.protocol)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step():
        model.eval()
        return batch_ranks(model, infer)

    time_step(train_step, 0, warmup, device)
    time_step(infer_step, 0, warmup, device)
    return PreparedCell(cell, model, optimizer, train_step, infer_step, counts, device)


def time_round(prepared: PreparedCell) -> None:
    """One timed training step and one timed inference batch of the cell."""
    prepared.train_times += time_step(prepared.train_step, 1, 0, prepared.device)
    prepared.infer_times += time_step(prepared.infer_step, 1, 0, prepared.device)


def finish_cell(prepared: PreparedCell, repeats: int, warmup: int) -> dict[str, Any]:
    """The cell's row: its timings' medians and spread, then its peak memory (untimed steps)."""
    model, optimizer, device, counts = prepared.model, prepared.optimizer, prepared.device, prepared.counts
    train_peak, source = peak_memory(prepared.train_step, model, optimizer, device)
    infer_peak, _ = peak_memory(prepared.infer_step, model, None, device)
    train = spread(prepared.train_times, 1000.0)
    infer_ms = spread(prepared.infer_times, 1000.0)
    step_s = train["median"] / 1000.0
    infer_s = infer_ms["median"] / 1000.0
    backends = model.backend_report()
    row: dict[str, Any] = dataclasses.asdict(prepared.cell)
    row.update(
        kernel_backends=",".join(f"{k}={v}" for k, v in sorted(backends.items())) or "torch",
        infer_batch_size=counts["users"],
        n_items=counts["n_items"],
        data=counts["data"],
        device=str(device),
        repeats=repeats,
        warmup=warmup,
        train_seqs_per_s=counts["sequences"] / step_s,
        train_positions_per_s=counts["positions"] / step_s,
        train_tokens_per_s=counts["tokens"] / step_s,
        train_step_ms=train["median"],
        train_step_ms_q1=train["q1"],
        train_step_ms_q3=train["q3"],
        train_step_ms_min=train["min"],
        train_step_ms_max=train["max"],
        infer_users_per_s=counts["users"] / infer_s,
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


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios side by side: each row against the first row of the run with the same shape (hidden,
    seq_len, batch size). Training compares positions/s (samples per second, so prefix and
    all_positions are comparable), inference users/s, memory the training peak."""
    first: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["hidden"], row["seq_len"], row["batch_size"])
        base = first.setdefault(key, row)
        row["baseline"] = BenchCell(**{a: base[a] for a in AXES}).label()
        row["train_ratio"] = row["train_positions_per_s"] / base["train_positions_per_s"]
        row["infer_ratio"] = row["infer_users_per_s"] / base["infer_users_per_s"]
        mem, base_mem = row["peak_memory_mb"], base["peak_memory_mb"]
        row["memory_ratio"] = mem / base_mem if base_mem and np.isfinite(base_mem) else float("nan")


def run_benchmark(
    models_: Sequence[str | ModelSpec],
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
    on_progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Measure every valid cell of the axes' product; invalid cells become notes."""
    import models

    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise BenchError("repeats and batch size must be positive and warmup non-negative")
    names = [spec.name if isinstance(spec, ModelSpec) else spec for spec in models_]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BenchError(f"model name(s) given twice: {', '.join(twice)}")
    for spec in models_:  # an unknown model or option: one clear error before any work
        if not isinstance(spec, ModelSpec):
            models.model_class(spec)
            continue
        if spec.options and spec.name in models.available():
            raise BenchError(f"{spec.name}: a variant with its own options needs a name of its own (NAME={spec.spec})")
        try:  # at the first width asked for; a shape that fails at another width is that cell's note
            models.build_config(spec.model, {**(model_params or {}), **dict(spec.options), "hidden_size": hiddens[0]})
        except models.ModelConfigError as err:
            raise BenchError(f"{spec.name}: {err}") from None
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # as training does (harness/allocator.py), so the figures match it
    plan, notes = cells(models_, hiddens, seq_lens, batch_size, chunk_sizes, backends, protocols, compiles)
    for note in notes:
        if on_note:
            on_note(note)
    real = RealData(dataset) if dataset else None
    if real is not None:
        n_items = real.data.n_items

    def add_note(note: str) -> None:
        notes.append(note)
        if on_note:
            on_note(note)

    def skip(cell: BenchCell, why: str) -> None:
        add_note(f"skipped {cell.label()} h{cell.hidden} L{cell.seq_len}: {why}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    prepared: list[PreparedCell] = []
    for cell in plan:
        try:
            prepared.append(
                prepare_cell(
                    cell,
                    n_items=n_items,
                    warmup=warmup,
                    device=dev,
                    infer_batch_size=infer_batch_size,
                    model_params=model_params,
                    real=real,
                )
            )
        except (models.ModelConfigError, ValueError) as err:
            skip(cell, str(err).splitlines()[0])
        except torch.OutOfMemoryError:
            skip(cell, "out of memory")
    if any(p.cell.chunk_size and p.model.backend_report().get("ssd_scan") == "cpp" for p in prepared):
        add_note(
            "the C++ SSD scan runs the plain recurrence, so the chunk size changes nothing there; "
            "compare chunk sizes with --backend torch (or the GPU kernels)"
        )
    # Round by round, one timed step of every cell in turn: a machine that speeds up or slows down
    # during the run (a shared or throttled CPU) moves every cell's repeats alike, so the ratios of
    # one run compare like with like.
    for round_index in range(repeats):
        if on_progress:
            on_progress(f"timed round {round_index + 1}/{repeats} of {len(prepared)} cell(s)")
        for cell in list(prepared):
            try:
                time_round(cell)
            except torch.OutOfMemoryError:
                prepared.remove(cell)
                skip(cell.cell, "out of memory (with the other cells' models and batches live)")
    rows: list[dict[str, Any]] = []
    for cell in prepared:
        try:
            row = finish_cell(cell, repeats, warmup)
        except torch.OutOfMemoryError:
            skip(cell.cell, "out of memory measuring its peak memory")
            continue
        rows.append(row)
        if on_row:
            on_row(row)
    add_ratios(rows)
    return BenchResult(rows=rows, notes=notes, machine=machine_description(dev))
