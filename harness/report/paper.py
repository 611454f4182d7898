"""Published numbers (harness/reference/paper_numbers.csv) and the mapping of their names to ours.

The CSV keeps its source columns (source, table, tag, note); see harness/reference/README.md.
Names are matched case-insensitively after dropping everything but letters and digits, so the paper's
"SSD4Rec*" is our ssd4rec and "TiM4Rec" our tim4rec; dataset aliases map "beauty"/"amazon-beauty",
"ml-1m"/"movielens-1m" and "kuairand" to the catalogue's names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from harness.data.catalogue import CATALOGUE

PAPER_CSV = Path(__file__).resolve().parents[1] / "reference" / "paper_numbers.csv"
ACCURACY_METRICS = re.compile(r"^(hit|ndcg|mrr)@\d+$")

DATASET_ALIASES = {
    "beauty": "amazon-beauty",
    "amazonbeauty": "amazon-beauty",
    "ml1m": "ml-1m",
    "movielens1m": "ml-1m",
    "kuairand": "kuairand",
    "kuairand1k": "kuairand",
    "steam": "steam",
}
MODEL_ALIASES = {
    "ssd4rec": "ssd4rec",
    "tim4rec": "tim4rec",
    "mamba4rec": "mamba4rec",
    "sasrec": "sasrec",
    "tisasrec": "tisasrec",
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def canonical_dataset(name: str) -> str:
    return DATASET_ALIASES.get(_squash(name), str(name).lower())


def canonical_model(name: str) -> str:
    return MODEL_ALIASES.get(_squash(name), _squash(name))


def load_paper_numbers(path: Path = PAPER_CSV) -> pd.DataFrame:
    """The reference table with canonical `dataset_key` / `model_key` columns added."""
    frame = pd.read_csv(path, dtype={"note": str}, keep_default_na=False)
    frame["dataset_key"] = frame["dataset"].map(canonical_dataset)
    frame["model_key"] = frame["model"].map(canonical_model)
    frame["metric"] = frame["metric"].str.lower()
    return frame


def lookup(frame: pd.DataFrame, dataset: str, model: str, hidden: int | None, metric: str) -> pd.DataFrame:
    """Published accuracy numbers for one of our table cells (every source that has one), in file order."""
    if not ACCURACY_METRICS.match(metric):
        return frame.iloc[0:0]
    rows = frame[
        (frame["dataset_key"] == canonical_dataset(dataset))
        & (frame["model_key"] == canonical_model(model))
        & (frame["metric"] == metric)
    ]
    if hidden is not None:
        rows = rows[rows["hidden"].astype(int) == int(hidden)]
    return rows


def paper_max_len(dataset: str) -> int:
    """History length the published protocol uses (200 for ML-1M, 50 otherwise)."""
    return 200 if canonical_dataset(dataset) == "ml-1m" else 50


def protocol_matches_paper(protocol: dict[str, str]) -> tuple[bool, str]:
    """Whether a group's protocol is the one the published numbers used (RecBole 1.2: leave-one-out,
    full ranking, seen items not masked, softmax CE, max_len 200/50). all_positions training is an
    equivalent training shortcut for causal models, not a different evaluation, so it passes."""
    problems = []
    if protocol.get("eval_mode") not in (None, "full-ranking"):
        problems.append(f"eval_mode {protocol.get('eval_mode')}")
    if protocol.get("mask_seen") not in (None, "false"):
        problems.append("seen items masked")
    expected = paper_max_len(protocol.get("dataset", ""))
    if protocol.get("max_len") not in (None, str(expected)):
        problems.append(f"max_len {protocol.get('max_len')} (paper {expected})")
    if protocol.get("kcore") not in (None, "5/5"):
        problems.append(f"k-core {protocol.get('kcore')}")
    spec = CATALOGUE.get(canonical_dataset(protocol.get("dataset", "")))
    tie_order = protocol.get("tie_order", "file")
    if spec and tie_order != spec.paper_tie_order:
        problems.append(f"same-time interactions in {tie_order} order (the paper's data: {spec.paper_tie_order} order)")
    return not problems, "; ".join(problems)
