"""How much the order of same-time interactions decides on a dataset, and what order its file uses.

Prints, for the dataset as the harness reads it (5-core, file order among equal timestamps):
- the share of a user's consecutive interactions that share a timestamp, and of the validation and
  test targets that share one with the item before them (for those, the tie order alone decides
  which item is held out);
- among same-time neighbours in file order, how often the item id goes up and how often down
  (about half and half: no order; all up: item order);
- whether item ids follow first appearance in an item-grouped file (the users of item 1 are users
  1..k, those of item 2 the next ones, ...), i.e. the file the ids were made from was grouped by
  item, as McAuley's Amazon files are, and RecBole's stable time sort of such a file puts each
  day's items in item order.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python scripts/tie_order_evidence.py amazon-beauty
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, run from anywhere
from harness.data.catalogue import load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default="amazon-beauty")
    args = parser.parse_args()
    data = load(args.dataset)
    ends = data.offsets[1:]
    same_user = np.ones(data.n_interactions - 1, dtype=bool)
    same_user[ends[:-1] - 1] = False
    tied = (np.diff(data.timestamps) == 0) & same_user  # tied[i]: interaction i+1 ties with i
    print(f"{args.dataset}: {data.n_users:,} users, {data.n_items:,} items, {data.n_interactions:,} interactions")
    print(f"same-time steps inside users: {tied.sum():,} of {same_user.sum():,} ({tied.sum() / same_user.sum():.1%})")
    for split, offset in (("test", 1), ("validation", 2)):
        has = data.lengths >= offset + 1
        target = ends[has] - offset
        ties = tied[target - 1]
        print(f"{split} targets tied with the item before them: {ties.sum():,} of {has.sum():,} ({ties.mean():.1%})")
    ids = data.item_tokens[data.items].astype(np.int64)  # the file's own item ids
    rises = (ids[1:] > ids[:-1])[tied].sum()
    falls = (ids[1:] < ids[:-1])[tied].sum()
    print(
        f"same-time neighbours in file order: item id rises {rises:,}, falls {falls:,}, "
        f"equal {tied.sum() - rises - falls:,}"
    )
    users = data.user_tokens.astype(np.int64)
    by_item = {}
    for item in (1, 2, 3):
        index = np.flatnonzero(data.item_tokens == str(item))
        holders = np.unique(users[np.searchsorted(ends, np.flatnonzero(data.items == index[0]), side="right")])
        by_item[item] = holders
        print(f"users of item {item}: {', '.join(map(str, holders[:12]))}{' ...' if len(holders) > 12 else ''}")
    fresh = [sorted(set(by_item[i]) - set().union(*(set(by_item[j]) for j in by_item if j < i))) for i in by_item]
    first_seen = np.concatenate([np.asarray(f, dtype=np.int64) for f in fresh])
    consecutive = bool(np.array_equal(first_seen, np.arange(1, len(first_seen) + 1)))
    print(
        f"user ids numbered by first appearance in an item-grouped file: "
        f"{'yes' if consecutive else 'no'} (the new users of items 1-3 are 1..{len(first_seen)})"
    )


if __name__ == "__main__":
    main()
