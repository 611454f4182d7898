"""From raw interactions to per-user chronological sequences (the RecBole 1.2 protocol).

Iterative k-core filter on users and items until stable, stable sort of each user's interactions by
timestamp (file order breaks ties, or the item id with `tie_order="item"`), duplicates kept, ids
remapped in order of first appearance with 0 reserved for padding. The result is stored flat (CSR):
user u's items are items[offsets[u]:offsets[u+1]], timestamps alongside.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd

from harness.errors import UserError


class EmptyDatasetError(UserError, ValueError):
    """The k-core filter leaves nothing of a dataset: the thresholds do not fit the data."""


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
    min_user_inter: int = 5
    min_item_inter: int = 5
    tie_order: str = "file"  # "file" or "item": who goes first among equal timestamps

    def key(self) -> str:
        ties = "" if self.tie_order == "file" else f"-ties-{self.tie_order}"
        return f"kcore-u{self.min_user_inter}-i{self.min_item_inter}-stable-time-sort{ties}-v1"

    @classmethod
    def of(cls, config) -> PreprocessSettings:
        """The preprocessing a TrainConfig asks for."""
        return cls(config.min_user_inter, config.min_item_inter, config.tie_order)


@dataclasses.dataclass
class SequenceData:
    """Chronological item sequences of every user. Item ids 1..n_items; 0 is padding."""

    name: str
    offsets: np.ndarray  # [n_users + 1] int64
    items: np.ndarray  # [n_interactions] int64
    timestamps: np.ndarray  # [n_interactions] float64 (raw values from the file)
    user_tokens: np.ndarray  # [n_users] original user ids
    item_tokens: np.ndarray  # [n_items + 1] original item ids, index 0 = "[PAD]"

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        return len(self.item_tokens) - 1

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def fingerprint(self) -> str:
        """Content hash of the processed sequences: equal fingerprints mean identical data."""
        digest = hashlib.sha256()
        for array in (self.offsets, self.items, self.timestamps):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def tied_steps(self) -> float:
        """Share of a user's consecutive interactions with equal timestamps: how much
        `tie_order` decides the order (and the held-out targets)."""
        same_user = np.ones(self.n_interactions - 1, dtype=bool)
        same_user[self.offsets[1:-1] - 1] = False  # the step from one user's last to the next's first
        steps = np.diff(self.timestamps)[same_user]
        return float((steps == 0).mean()) if len(steps) else 0.0

    def statistics(self) -> dict[str, float]:
        lengths = self.lengths
        return {
            "tied_steps": self.tied_steps(),
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "avg_len": float(lengths.mean()),
            "max_len": int(lengths.max()),
            "sparsity": 1.0 - self.n_interactions / (self.n_users * self.n_items),
        }


def require_every_split(data: SequenceData) -> None:
    """One line when no user is long enough for all three leave-one-out splits (training,
    validation and test targets need 4 interactions), instead of a run that trains on nothing or
    reports NaN metrics."""
    longest = int(data.lengths.max()) if data.n_users else 0
    if longest < 4:
        raise EmptyDatasetError(
            f"dataset {data.name!r} cannot be split: {data.n_users:,} user(s) after the k-core filter, "
            f"the longest with {longest} interaction(s); leave-one-out needs users with 4 or more "
            "(training, validation and test targets)"
        )


def k_core(frame: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Drop users and items with too few interactions, repeatedly, until nothing changes.

    The k-core is unique, so the order of removal does not matter; duplicates count each time.
    """
    while True:
        user_counts = frame["user"].map(frame["user"].value_counts())
        item_counts = frame["item"].map(frame["item"].value_counts())
        keep = (user_counts >= min_user) & (item_counts >= min_item)
        if keep.all():
            return frame
        frame = frame[keep.to_numpy()]


def item_sort_key(items: pd.Series) -> np.ndarray:
    """Item ids as sort keys: numerically when every id is a number (so 9 < 10), else as text."""
    numeric = pd.to_numeric(items, errors="coerce")
    if not numeric.isna().any():
        return numeric.to_numpy()
    return pd.factorize(items.astype(str), sort=True)[0]


def build_sequences(
    frame: pd.DataFrame, name: str, settings: PreprocessSettings = PreprocessSettings()
) -> SequenceData:
    before = frame
    frame = k_core(frame.reset_index(drop=True), settings.min_user_inter, settings.min_item_inter)
    if frame.empty:
        raise EmptyDatasetError(
            f"dataset {name!r} has no interactions left after the k-core filter (min_user_inter="
            f"{settings.min_user_inter}, min_item_inter={settings.min_item_inter}; before it: "
            f"{before['user'].nunique():,} users, {before['item'].nunique():,} items, {len(before):,} "
            f"interactions); lower them (--set min_user_inter=N --set min_item_inter=M; "
            "leave-one-out needs users with 4 or more interactions)"
        )
    # ids in order of first appearance in the (filtered) file; items start at 1, 0 is padding
    user_codes, user_tokens = pd.factorize(frame["user"], sort=False)
    item_codes, item_tokens = pd.factorize(frame["item"], sort=False)
    # stable sort: user first, then time; rows with equal timestamps keep their file order, or go
    # by item id. Which one matters: day-granular data (Amazon) has many same-day interactions, and
    # a fixed order among them is a regularity a model learns (see docs/reproduction.md)
    keys = (frame["timestamp"].to_numpy(), user_codes)
    if settings.tie_order == "item":
        keys = (item_sort_key(frame["item"]),) + keys
    elif settings.tie_order != "file":
        raise ValueError(f"tie_order must be 'file' or 'item', not {settings.tie_order!r}")
    order = np.lexsort(keys)
    users_sorted = user_codes[order]
    counts = np.bincount(users_sorted, minlength=len(user_tokens))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SequenceData(
        name=name,
        offsets=offsets,
        items=(item_codes[order] + 1).astype(np.int64),
        timestamps=frame["timestamp"].to_numpy()[order].astype(np.float64),
        user_tokens=np.asarray(user_tokens, dtype=str),
        item_tokens=np.concatenate([["[PAD]"], np.asarray(item_tokens, dtype=str)]),
    )
