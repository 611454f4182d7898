"""What a benchmark ran on, recorded with its rows: the device, CPU, threads, torch version and load."""

from __future__ import annotations

import os
from typing import Any

import torch

from models.kernels.bench import cpu_name  # the kernel benchmarks record the same CPU name


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
