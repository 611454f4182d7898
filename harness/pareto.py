"""Pareto fronts: which points no other point dominates, for the studies' `final.select: pareto` and
the report's Pareto figure and table alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def non_dominated(values: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """A boolean mask over the rows of `values` [n, k]: True where no other row is at least as good
    on every objective and better on one (`directions`: maximize or minimize, one per column)."""
    signs = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    v = np.asarray(values, dtype=float).reshape(len(values), len(signs)) * signs  # larger is better everywhere
    mask = np.ones(len(v), dtype=bool)
    for i in range(len(v)):
        dominated = np.all(v >= v[i], axis=1) & np.any(v > v[i], axis=1)
        mask[i] = not dominated.any()
    return mask
