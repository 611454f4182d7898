"""Leave-one-out splits and the two training protocols, as windows over the flat sequence arrays.

Every sample is a window [start, end) into SequenceData.items (one user's consecutive interactions):
- evaluation and `prefix` training: history = items[start:end], target = items[end];
- `all_positions` training: inputs = items[start:end], targets = items[start+1:end+1], so one
  forward pass gives the loss at every position.
Windows are gathered into right-padded [batch, length] tensors in one vectorised step.

Split (RecBole 1.2 "LS valid_and_test", grouped by user): a user with n interactions has n-1
prefix samples (targets at positions 1..n-1). The last is test, the second last validation, the
rest train; a user with n = 3 has no validation sample and one with n = 2 only a training sample
(RecBole's `min(2, samples - 1)` rule). Histories keep the most recent `max_len` items.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from harness.data.preprocess import SequenceData

PROTOCOLS = ("prefix", "all_positions")


@dataclasses.dataclass
class Windows:
    """Windows [start, end) into the flat arrays, with the user each belongs to."""

    starts: np.ndarray
    ends: np.ndarray
    users: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def subset(self, index: np.ndarray) -> Windows:
        return Windows(self.starts[index], self.ends[index], self.users[index])


def _held_out_count(n: np.ndarray) -> np.ndarray:
    """Samples a user gives to validation+test: min(2, samples - 1) with samples = n - 1."""
    return np.clip(np.minimum(2, n - 2), 0, None)


def eval_windows(data: SequenceData, split: str, max_len: int) -> Windows:
    """The validation or test sample of every user who has one."""
    n = data.lengths
    held_out = _held_out_count(n)
    if split == "test":
        has = held_out >= 1
        target_pos = n - 1
    elif split == "valid":
        has = held_out >= 2
        target_pos = n - 2
    else:
        raise ValueError(f"unknown split {split!r}; expected 'valid' or 'test'")
    users = np.flatnonzero(has)
    ends = data.offsets[users] + target_pos[users]
    starts = np.maximum(data.offsets[users], ends - max_len)
    return Windows(starts, ends, users)


def train_target_bounds(data: SequenceData) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the flat index range [first, last] of training targets (first > last: none)."""
    n = data.lengths
    n_train = np.clip(n - 1 - _held_out_count(n), 0, None)
    first = data.offsets[:-1] + 1
    return first, first + n_train - 1


def prefix_windows(data: SequenceData, max_len: int) -> Windows:
    """One sample per training target: the preceding `max_len` items -> the target."""
    first, last = train_target_bounds(data)
    counts = np.clip(last - first + 1, 0, None)
    users = np.repeat(np.arange(data.n_users), counts)
    ends = np.repeat(first, counts) + _ranks_within(counts)
    starts = np.maximum(data.offsets[users], ends - max_len)
    return Windows(starts, ends, users)


def all_positions_windows(data: SequenceData, max_len: int) -> Windows:
    """Each user's training part as consecutive windows of at most `max_len` inputs, cut from the
    end, so every training target is predicted exactly once. A target's history equals its prefix
    sample's history when the user's training part fits in one window; in later windows it starts
    at the window start (at most `max_len` items)."""
    first, last = train_target_bounds(data)
    n_inputs = np.clip(last - first + 1, 0, None)  # inputs = items[offset : last], one per target
    n_windows = -(-n_inputs // max_len)
    users = np.repeat(np.arange(data.n_users), n_windows)
    k = _ranks_within(n_windows)  # window k counted from the end
    ends = np.repeat(last, n_windows) - k * max_len  # exclusive end of inputs
    starts = np.maximum(data.offsets[users], ends - max_len)
    return Windows(starts, ends, users)


def training_windows(data: SequenceData, protocol: str, max_len: int) -> Windows:
    if protocol == "prefix":
        return prefix_windows(data, max_len)
    if protocol == "all_positions":
        return all_positions_windows(data, max_len)
    raise ValueError(f"unknown training protocol {protocol!r}; expected one of {PROTOCOLS}")


def _ranks_within(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for every group of size c, concatenated."""
    total = int(counts.sum())
    group_starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - group_starts


@dataclasses.dataclass
class Batch:
    items: torch.Tensor  # [batch, length] long, right-padded with 0
    timestamps: torch.Tensor  # [batch, length] float64, padded with 0
    lengths: torch.Tensor  # [batch] long
    targets: torch.Tensor  # [batch] (prefix / eval) or [batch, length] (all_positions; 0 = none)
    users: torch.Tensor  # [batch] long

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in dataclasses.astuple(self)))


def gather(data: SequenceData, windows: Windows, width: int | None, all_positions: bool = False) -> Batch:
    """Right-padded tensors for `windows`. width=None trims to the longest window in the batch."""
    lengths = windows.lengths
    width = int(lengths.max()) if width is None else width
    index = windows.starts[:, None] + np.arange(width)[None, :]
    real = np.arange(width)[None, :] < lengths[:, None]
    safe = np.where(real, index, 0)
    items = np.where(real, data.items[safe], 0)
    stamps = np.where(real, data.timestamps[safe], 0.0)
    if all_positions:
        targets = np.where(real, data.items[np.where(real, index + 1, 0)], 0)
    else:
        targets = data.items[windows.ends]
    return Batch(
        items=torch.from_numpy(items),
        timestamps=torch.from_numpy(stamps),
        lengths=torch.from_numpy(lengths.astype(np.int64)),
        targets=torch.from_numpy(np.asarray(targets, dtype=np.int64)),
        users=torch.from_numpy(windows.users.astype(np.int64)),
    )


def batch_order(
    windows: Windows,
    batch_size: int,
    rng: np.random.Generator | None,
    all_positions: bool = False,
    bucketed: bool = False,
) -> list[np.ndarray]:
    """Split window indices into batches.

    Shuffled when `rng` is given. For all_positions, a batch holds about `batch_size` target
    positions (not windows), so both protocols take optimiser steps over similar sample counts.
    `bucketed` sorts each run of 50 batches by length before cutting them, so little padding is
    computed, then shuffles the batch order (the sample set of an epoch is unchanged).
    """
    order = rng.permutation(len(windows)) if rng is not None else np.arange(len(windows))
    if bucketed:
        span = batch_size * 50
        order = np.concatenate(
            [
                chunk[np.argsort(windows.lengths[chunk], kind="stable")]
                for chunk in np.array_split(order, max(1, -(-len(order) // span)))
            ]
        )
    if all_positions:
        # greedy: close a batch as soon as it holds at least batch_size target positions
        cuts, filled = [], 0
        for position, length in enumerate(windows.lengths[order].tolist()):
            filled += length
            if filled >= batch_size:
                cuts.append(position + 1)
                filled = 0
        batches = np.split(order, cuts)
    else:
        batches = np.split(order, np.arange(batch_size, len(order), batch_size))
    batches = [b for b in batches if len(b)]
    if bucketed and rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
