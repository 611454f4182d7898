"""TiSASRec's per-pair time terms under the repository's pairwise dropout, fused on the CPU (time_pairs_cpu.cpp).

For query row r of sequence b at position i = rows[b, r], every key j <= i, bucket k = relation[b, i, j] and
dropped embeddings e(b, i, j) = table[k] * keep(b, i, j) / (1 - p), [hidden] split into heads:

    time_pair_scores:   scores[b, h, r, j] = query[b, h, r] . e_K(b, i, j)[h]        (0 for j > i)
    time_pair_context:  context[b, h, r]   = sum_{j <= i} probs[b, h, r, j] e_V(b, i, j)[h]

The torch path materialises the dropped [batch, L, L, hidden] tensors (their causal half) and their boolean masks;
here the masks are drawn from a counter-based generator keyed by (seed, stream, b, i, j, channel) and redrawn in
the backward pass, so no per-pair tensor exists. A given seed and stream give one set of masks for the whole
forward pass: every layer and every query row (the full rows and the rows at `at`) see the same dropped
embeddings, as in the repository, where the dropped tensors are computed once and shared by the layers.
The masks come from another generator than torch's, so a seed gives other masks than the torch path (the same
distribution: each channel of each pair dropped independently with probability p).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from .cpu_extension import cpu_extension


def _extension():
    return cpu_extension("time_pairs")


@dataclasses.dataclass(frozen=True)
class PairDropout:
    """Which masks: `seed` (one draw per forward pass), `stream` (one per embedding table), probability `p`."""

    seed: int
    stream: int
    p: float


class _Scores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, table, relation, rows, heads, dropout):
        ctx.heads, ctx.dropout = heads, dropout
        ctx.save_for_backward(query, table, relation, rows)
        return _extension().scores_forward(query, table, relation, rows, heads, dropout.seed, dropout.stream, dropout.p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        query, table, relation, rows = ctx.saved_tensors
        d = ctx.dropout
        grad_query, grad_table = _extension().scores_backward(
            grad_scores.contiguous(), query, table, relation, rows, ctx.heads, d.seed, d.stream, d.p
        )
        return grad_query, grad_table, None, None, None, None


class _Context(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs, table, relation, rows, dropout):
        ctx.dropout = dropout
        ctx.save_for_backward(probs, table, relation, rows)
        return _extension().context_forward(probs, table, relation, rows, dropout.seed, dropout.stream, dropout.p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_context):
        probs, table, relation, rows = ctx.saved_tensors
        d = ctx.dropout
        grad_probs, grad_table = _extension().context_backward(
            grad_context.contiguous(), probs, table, relation, rows, d.seed, d.stream, d.p
        )
        return grad_probs, grad_table, None, None, None


def _index(relation: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return relation.long().contiguous(), rows.long().contiguous()


@torch.compiler.disable  # an opaque C++ call: dynamo breaks the graph here anyway, this says so without a warning
def time_pair_scores(query, table, relation, rows, dropout: PairDropout):
    """query [b, h, R, d], table [buckets, h*d], relation [b, L, L], rows [b, R] -> scores [b, h, R, L]."""
    batch, heads, count, size = query.shape
    flat_query = query.transpose(1, 2).reshape(batch, count, heads * size).contiguous()
    relation, rows = _index(relation, rows)
    return _Scores.apply(flat_query, table.contiguous(), relation, rows, heads, dropout)


@torch.compiler.disable
def time_pair_context(probs, table, relation, rows, dropout: PairDropout):
    """probs [b, h, R, L], table [buckets, h*d], relation [b, L, L], rows [b, R] -> context [b, h, R, d]."""
    batch, heads, count, _ = probs.shape
    relation, rows = _index(relation, rows)
    context = _Context.apply(probs.contiguous(), table.contiguous(), relation, rows, dropout)
    return context.view(batch, count, heads, -1).transpose(1, 2)


def keep_factors(dropout: PairDropout, batch: int, length: int, hidden: int) -> torch.Tensor:
    """The keep factors (0 or 1 / (1 - p)) of every pair, [batch, L, L, hidden] float32. Tests only."""
    return _extension().keep_factors(dropout.seed, dropout.stream, batch, length, hidden, dropout.p)


def time_pair_scores_reference(query, table, relation, rows, dropout: PairDropout):
    """The same scores from the materialised dropped embeddings, by autograd. Tests only."""
    batch, heads, count, size = query.shape
    length = relation.size(1)
    keep = keep_factors(dropout, batch, length, table.size(1)).to(table.dtype)
    picked = torch.arange(batch)[:, None]
    dropped = (table[relation] * keep)[picked, rows]  # [b, R, L, hidden]
    dropped = dropped.view(batch, count, length, heads, size).permute(0, 3, 1, 2, 4)  # [b, h, R, L, d]
    scores = (dropped * query.unsqueeze(-2)).sum(-1)
    causal = torch.arange(length)[None, None, :] <= rows[:, :, None]  # [b, R, L]
    return scores * causal.unsqueeze(1)


def time_pair_context_reference(probs, table, relation, rows, dropout: PairDropout):
    """The same context from the materialised dropped embeddings, by autograd. Tests only."""
    batch, heads, count, length = probs.shape
    keep = keep_factors(dropout, batch, length, table.size(1)).to(table.dtype)
    picked = torch.arange(batch)[:, None]
    dropped = (table[relation] * keep)[picked, rows]  # [b, R, L, hidden]
    dropped = dropped.view(batch, count, length, heads, -1).permute(0, 3, 1, 2, 4)  # [b, h, R, L, d]
    causal = (torch.arange(length)[None, None, :] <= rows[:, :, None]).unsqueeze(1)
    return ((probs * causal).unsqueeze(-1) * dropped).sum(-2)
