"""Ranking metrics from the rank of each user's target, and their names everywhere.

Rank convention (deterministic, documented): rank = number of items scored strictly higher than
the target + number of OTHER items scored exactly equal (ties count against the target, the
pessimistic convention). It does not depend on item ids, batch size or the top-k implementation,
and an untrained model with constant scores gets the worst rank rather than a lucky one.
Ranks are 0-based: rank 0 = the target is first.

Metric names: MLflow forbids '@', so every metric is written `<split>_<metric>_at_<k>`, e.g.
`test_ndcg_at_10`; the human form `ndcg@10` is used only in printed tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it computes: naming a metric (a setting checked before
    import numpy as np  # `train` starts, `--help`) should not cost numpy's half second

METRICS = ("hit", "ndcg", "mrr")
DEFAULT_TOPK = (10, 20, 50)


def metric_key(metric: str, k: int, split: str | None = None) -> str:
    name = f"{metric}_at_{k}"
    return f"{split}_{name}" if split else name


def parse_metric(text: str) -> tuple[str, int]:
    """'ndcg@10' or 'ndcg_at_10' -> ('ndcg', 10), with a clear error for anything else."""
    normalised = text.replace("@", "_at_")
    metric, sep, k = normalised.partition("_at_")
    if not sep or metric not in METRICS or not k.isdigit() or int(k) < 1:
        raise ValueError(f"unknown metric {text!r}; expected e.g. ndcg@10 ({', '.join(METRICS)})")
    return metric, int(k)


def per_user_metric(ranks: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Per-user metric vector from 0-based ranks (Hit@K = Recall@K under leave-one-out).
    Ranks must be finite and >= 0: a negative rank (what a NaN score used to give) would count as
    a hit with infinite NDCG and MRR."""
    import numpy as np

    ranks = np.asarray(ranks, dtype=np.float64)
    if not np.isfinite(ranks).all() or (ranks < 0).any():
        raise ValueError(
            "ranks must be finite and >= 0 (0 = the target is first); got "
            f"{int(np.sum(~np.isfinite(ranks) | (ranks < 0)))} invalid rank(s)"
        )
    inside = ranks < k
    if metric == "hit":
        return inside.astype(np.float64)
    if metric == "ndcg":
        return np.where(inside, 1.0 / np.log2(ranks + 2.0), 0.0)
    if metric == "mrr":
        return np.where(inside, 1.0 / (ranks + 1.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def summarise(ranks: np.ndarray, topk=DEFAULT_TOPK, split: str | None = None) -> dict[str, float]:
    """Mean of every metric at every k, keyed by metric_key."""
    return {
        metric_key(metric, k, split): float(per_user_metric(ranks, metric, k).mean())
        for metric in METRICS
        for k in topk
    }
