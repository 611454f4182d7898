"""Full-softmax cross-entropy of tied item scores: mean_i [logsumexp(h_i W^T) - h_i . W_{t_i}].

Every model trains with it (hidden [n, d], item table W [n_items, d], targets [n]). Unfused, the
[n, n_items] score matrix is the largest tensor of a step (at batch 2048 over Amazon-Beauty's 12k items,
100 MB) and autograd walks it six to eight times from memory: log_softmax forward, the zero-filled
gradient of nll_loss, log_softmax backward. On CPU the fused path below walks it once more after the
matrix product, in row blocks that stay in L2: per block it takes the max, exponentiates in place,
normalises and subtracts the one-hot target, which turns the scores into d loss / d scores; backward is
then the two matrix products of the linear layer. The result equals F.cross_entropy to float rounding.

Other devices (and half precision) keep torch's own kernels, which are fused there already.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: bytes of scores per row block of the CPU path: small enough to stay in a core's L2 cache
_ROW_BLOCK_BYTES = 1 << 20


def tied_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the scores hidden @ table.T (every row of table a class) against targets."""
    if hidden.dim() != 2 or table.dim() != 2 or hidden.size(1) != table.size(1):
        raise ValueError(
            f"expected hidden [n, d] and table [classes, d], got {tuple(hidden.shape)} and {tuple(table.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [{hidden.size(0)}], got {tuple(targets.shape)}")
    fused = (
        hidden.device.type == "cpu"
        and hidden.dtype in (torch.float32, torch.float64)
        and table.dtype == hidden.dtype
        and hidden.size(0) > 0
    )
    if not fused:
        return tied_cross_entropy_reference(hidden, table, targets)
    return _FusedTiedCrossEntropy.apply(hidden, table, targets)


def tied_cross_entropy_reference(hidden, table, targets):
    """torch's unfused composition (the fused path's oracle in tests, and the path off CPU); half
    precision scores are promoted to float32 first."""
    scores = hidden @ table.t()
    return F.cross_entropy(scores.to(torch.promote_types(scores.dtype, torch.float32)), targets)


def _row_blocks(rows: int, classes: int, itemsize: int) -> tuple[range, int]:
    """Block starts and the block length in rows (at least one row, however many classes)."""
    block = max(1, _ROW_BLOCK_BYTES // max(1, classes * itemsize))
    return range(0, rows, block), block


class _FusedTiedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, targets):
        scores = hidden @ table.t()  # becomes d(sum of losses) / d scores, block by block
        losses = hidden.new_empty(hidden.size(0))
        starts, block = _row_blocks(*scores.shape, scores.element_size())
        for start in starts:
            rows = slice(start, start + block)
            part, target = scores[rows], targets[rows, None]
            picked = part.gather(1, target)
            top = part.amax(dim=1, keepdim=True)
            total = part.sub_(top).exp_().sum(dim=1, keepdim=True)
            losses[rows] = (total.log() + top - picked).squeeze(1)
            part.div_(total).scatter_add_(1, target, part.new_full(target.shape, -1.0))
        ctx.save_for_backward(hidden, table, scores)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_output):
        hidden, table, score_grad = ctx.saved_tensors
        # the mean's 1/n and the upstream gradient scale the small products, not the score matrix
        scale = grad_output / hidden.size(0)
        grad_hidden = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (score_grad @ table).mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_table = (score_grad.t() @ hidden).mul_(scale)
        return grad_hidden, grad_table, None
