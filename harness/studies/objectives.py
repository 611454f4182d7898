"""What a trial measures: validation metrics (best epoch), training throughput, peak memory.

- valid_<metric>_at_<k>: the best-epoch validation value the trainer early-stopped on. Test
  metrics do not exist in a trial (the trainer runs with evaluate_test=False).
- train_throughput: training samples (target positions) per epoch / median epoch seconds (the
  first epoch, with its warm-up, is excluded when there are several).
- peak_memory_mb: on CUDA torch.cuda.max_memory_allocated (reset before the trial); elsewhere the
  process's peak resident set size, reset per trial through /proc/self/clear_refs on Linux
  (VmHWM), else resource.getrusage's lifetime ru_maxrss. The source goes into the tag
  MEMORY_SOURCE (harness.store.contract).
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
import sys

from harness.store import contract as tc
from harness.studies.resolved import MEMORY, THROUGHPUT, Objective


class MemoryProbe:
    def __init__(self, device):
        self.device = device
        self.peak_mb: float = float("nan")
        self.source = ""

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "cuda.max_memory_allocated"
        elif _reset_hwm():
            self.source = "rss_peak(VmHWM, reset per trial)"
        else:
            self.source = "getrusage.ru_maxrss(process lifetime)"
        return self

    def __exit__(self, *exc):
        self.read()

    def read(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.source.startswith("rss_peak"):
            self.peak_mb = _vm_hwm_kb() / 1024
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mb = rss / 2**20 if sys.platform == "darwin" else rss / 1024
        return self.peak_mb


def _reset_hwm() -> bool:
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return not math.isnan(_vm_hwm_kb())
    return False


def _vm_hwm_kb() -> float:
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", open("/proc/self/status").read())
    except OSError:
        return float("nan")
    return float(match.group(1)) if match else float("nan")


def train_samples_per_epoch(trainer) -> int:
    windows = trainer.train_windows
    if trainer.config.protocol == "all_positions":
        return int(windows.lengths.sum())
    return len(windows)


def measurements(result, trainer, probe: MemoryProbe) -> dict[str, float]:
    """Everything a trial can be judged on (validation only) plus cost figures."""
    seconds = result.seconds_per_epoch
    samples = train_samples_per_epoch(trainer)
    out = {k: float(v) for k, v in result.valid.items()}
    out[THROUGHPUT] = samples / seconds if seconds and seconds > 0 else float("nan")
    out[MEMORY] = probe.peak_mb
    out[tc.SECONDS_PER_EPOCH] = seconds
    out[tc.TRAIN_SAMPLES_PER_EPOCH] = float(samples)
    return out


def values(objectives: list[Objective], measured: dict[str, float]) -> list[float]:
    out = []
    for objective in objectives:
        if objective.key not in measured:
            raise KeyError(f"objective {objective.key} was not measured")
        out.append(float(measured[objective.key]))
    return out
