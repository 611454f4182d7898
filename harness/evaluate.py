"""Full-ranking evaluation: every user's target ranked against all items, in bounded memory.

One matmul against the item table and one comparison per batch; the padding id is masked, items the
user has already seen are NOT masked unless asked (the RecBole/TiM4Rec protocol). Memory stays
bounded because only [batch, n_items] scores exist at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import torch

from harness.data.preprocess import SequenceData
from harness.data.samples import Windows, gather
from harness.metrics import summarise


@dataclasses.dataclass
class EvalResult:
    users: np.ndarray  # user index per evaluated sample
    targets: np.ndarray
    ranks: np.ndarray  # 0-based, ties against the target

    def summary(self, topk, split: str | None = None) -> dict[str, float]:
        return summarise(self.ranks, topk, split)


class NonFiniteScoreError(FloatingPointError):
    """A model produced NaN or infinite scores: its ranks would be meaningless (a NaN target compares
    false with everything and would come out first), so the run must fail instead."""


def check_finite_scores(scores: torch.Tensor, where: str = "") -> None:
    """Raise NonFiniteScoreError unless every score is finite (call before any -inf masking)."""
    if bool(torch.isfinite(scores.sum())):  # one read; NaN and inf propagate (overflow only costs the check)
        return
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = "NaN" if bool(torch.isnan(scores).any()) else "infinite"
        raise NonFiniteScoreError(
            f"the model produced {bad} non-finite ({kinds}) item score(s){' ' + where if where else ''}: "
            "it has diverged; no ranks or metrics are computed from such scores"
        )


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pessimistic 0-based rank of each target among `scores` [batch, n_items + 1].
    -inf (masked items) is allowed; NaN is refused (it would rank the target first)."""
    # a NaN makes the sum NaN; -inf alone cannot (+inf and -inf together can: then look closer)
    if bool(torch.isnan(scores.sum())) and bool(torch.isnan(scores).any()):
        raise NonFiniteScoreError(
            "NaN item scores: a NaN target compares false with every item and would get rank -1; refusing to rank"
        )
    target_scores = scores.gather(1, targets.view(-1, 1))
    # items scored higher + other items scored equal = items scored at least as high, less the target itself
    return (scores >= target_scores).sum(dim=1) - 1


def batch_ranks(model, batch, where: str = "", mask: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The work of full ranking for one batch (items, timestamps, lengths, targets): encode, score
    every item, refuse non-finite scores, mask the padding id (and whatever `mask` masks in place),
    rank each target. Evaluation and the inference benchmark both run exactly this."""
    timestamps = batch.timestamps if model.uses_timestamps else None
    hidden = model.last_hidden(batch.items, timestamps, batch.lengths)
    scores = model.score(hidden).float()
    check_finite_scores(scores, where)
    scores[:, 0] = float("-inf")
    if mask is not None:
        mask(scores)
    return target_ranks(scores, batch.targets)


def _mask_seen(scores: torch.Tensor, data: SequenceData, windows: Windows, targets: torch.Tensor):
    """Mask every item of the user's full history before the target (not only the last max_len),
    then restore the target's own score, so a repeated purchase stays rankable."""
    target_scores = scores.gather(1, targets.view(-1, 1)).clone()
    for row, (user, end) in enumerate(zip(windows.users, windows.ends)):
        seen = torch.from_numpy(data.items[data.offsets[user] : end]).to(scores.device)
        scores[row, seen] = float("-inf")
    scores.scatter_(1, targets.view(-1, 1), target_scores)


@torch.no_grad()
def evaluate(
    model,
    data: SequenceData,
    windows: Windows,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    mask_seen: bool = False,
) -> EvalResult:
    was_training = model.training
    model.eval()
    # batches of similar length waste little on padding; ranks are put back in user order after
    order = np.argsort(windows.lengths, kind="stable")
    ranks = []
    for begin in range(0, len(windows), batch_size):
        part = windows.subset(order[begin : begin + batch_size])
        batch = gather(data, part, None if model.trims_padding else model.max_len).to(device)
        where = f"for {len(part)} users (evaluation batch {begin // batch_size})"
        seen = functools.partial(_mask_seen, data=data, windows=part, targets=batch.targets) if mask_seen else None
        ranks.append(batch_ranks(model, batch, where, seen).cpu())
    model.train(was_training)
    in_user_order = np.zeros(len(windows), dtype=np.int64)
    if ranks:
        in_user_order[order] = torch.cat(ranks).numpy()
    return EvalResult(users=windows.users.copy(), targets=data.items[windows.ends].copy(), ranks=in_user_order)
