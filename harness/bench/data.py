"""The batches a benchmark cell measures: synthetic (uniform random items, full length, increasing
timestamps) or cut from a dataset's own windows, so the cost reflects its real padding."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass
class Batch:
    items: torch.Tensor
    timestamps: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor  # [batch] (prefix / inference) or [batch, length] (all_positions)


def synthetic(batch: int, seq_len: int, n_items: int, all_positions: bool, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (batch, seq_len + 1), generator=g)
    gaps = torch.empty(batch, seq_len).exponential_(1.0 / 3600.0, generator=g)
    stamps = 1.0e9 + torch.cumsum(gaps.double(), dim=1)
    targets = items[:, 1:] if all_positions else items[:, -1]
    return Batch(items[:, :seq_len].contiguous(), stamps, torch.full((batch,), seq_len), targets.contiguous())


class RealData:
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
        return Batch(b.items, b.timestamps, b.lengths, b.targets)
