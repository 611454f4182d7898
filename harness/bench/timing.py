"""Clocks and memory for one step (docs/design.md#measurement): untimed warm-up, a synchronised clock
on CUDA, the spread of the repeats; peak memory from CUDA's allocator or, on a CPU, the torch
profiler's allocation trace plus the state that was live before the step."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

MEMORY_CUDA = "cuda.max_memory_allocated-live+state"
MEMORY_CPU = "torch.profiler.cpu-allocations+state"
MEMORY_NONE = "unavailable"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
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


def spread(times: Sequence[float], scale: float) -> dict[str, float]:
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


def peak_memory(step, model, optimizer, device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        # the step's peak above what was live before it (other cells' weights and batches are live
        # too while a benchmark runs), plus this cell's own weights, gradients and optimiser state
        _sync(device)
        live = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        step_peak = torch.cuda.max_memory_allocated(device) - live
        return (step_peak + _state_bytes(model, optimizer)) / 2**20, MEMORY_CUDA
    before = _state_bytes(model, optimizer)
    peak = _cpu_peak_bytes(step)
    if peak is None:
        return float("nan"), MEMORY_NONE
    return (before + peak) / 2**20, MEMORY_CPU
