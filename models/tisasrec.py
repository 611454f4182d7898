"""TiSASRec (Li, Wang & McAuley, WSDM 2020): self-attention aware of the time intervals between items.

Follows the baseline the TiM4Rec paper ran (`baseline/TiSASRec` of github.com/AlwaysFHao/TiM4Rec, built on
RecBole's SASRec and pmixer/TiSASRec.pytorch), with the original paper's options available:

    x = dropout(LayerNorm(item_emb + pos_emb))                  (position_encoding="input", the repo's)
    r_ij = clip(relative time between items i and j, time_span)  an integer in 0..time_span
    attention (per head, post-LayerNorm RecBole block):
        score_ij = (q_i . k_j + q_i . K_t[r_ij] [+ q_i . K_p[j]]) / sqrt(d_head) + causal/padding mask
        out_i    = sum_j p_ij (v_j + V_t[r_ij] [+ V_p[j]])
    K_t, V_t: Embedding(time_span + 1, hidden), dropout applied to the looked-up [L, L, hidden] tensors (once per
    forward, shared by the layers); then dense -> dropout -> LayerNorm(+x); FFN (GELU) -> dropout -> LayerNorm(+x).

Time encodings (`time_encoding`):
  "repo"      the TiM4Rec repository's: r_ij = min(|t_i - t_j|, time_span) on raw float32 seconds (the default,
              as in the baseline the paper ran). On second-resolution data almost every pair saturates at the
              span; on day-resolution data (Amazon) r is 0 for same-day pairs and time_span otherwise.
  "personal"  the original paper's: times shifted and divided by the user's smallest non-zero interval,
              rounded, r_ij = min(|t'_i - t'_j|, time_span). The scale is taken causally: query row i uses the
              smallest non-zero gap among the items up to i, and times shifted by the window's first item, so
              the last position (the prefix protocol's) sees the scale of the whole visible history and
              no position sees a later one. (The original computes one scale from the user's whole sequence,
              which the model does not see.)
Position encodings (`position_encoding`): "input" (the repo's: SASRec's absolute position embedding added to the
input) or "kv" (the original's: absolute-position key and value embeddings inside attention, with dropout).

Cost: the repo's dropout on the looked-up time K/V tensors makes training materialise [batch, L, L, hidden]
tensors (what makes TiSASRec several times slower than SASRec in the TiM4Rec paper's Table 5). Only the causal
pairs (key j <= query i) are materialised, in blocks of query rows (`CausalPairs`): the pairs above the
diagonal are masked out of every attention row, so their embeddings, dropout masks and gradients are never
needed (the masks drawn differ from a full [L, L] draw in layout only, not in distribution). On CPU the "cpp"
backend of the `time_pairs` kernel (the "auto" choice there, `DroppedPairs`) materialises nothing: C++ kernels
recompute each pair's dropped embedding where it is used, redrawing its mask from a counter-based generator keyed
by a per-forward seed (models/kernels/time_pairs.py; about 2x faster training at hidden 64). Without dropout
(evaluation) the time terms are computed exactly per bucket instead: q . K_t[r] for the span+1 buckets, gathered,
and the attention mass summed per bucket times V_t. `time_dropout="table"` (NOT the repo's) applies dropout to
the embedding tables instead, so training uses the bucketed path too.

Defaults are the TiM4Rec baseline config: hidden 64, inner 256, 2 layers, 4 heads, dropout 0.2/0.2, GELU,
LayerNorm eps 1e-12, init N(0, 0.02), time_span 256. Causal (with the key padding mask), trims padding.
Masked scores get -10000 added, as in RecBole 1.2.0, so a row with no visible key cannot produce NaN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Dropout, ModelConfigError, SequentialRecommender, at_positions, recbole_init_
from models.kernels.backends import CPU_BACKEND
from models.kernels.time_pairs import PairDropout, time_pair_context, time_pair_scores
from models.registry import register
from models.sasrec import FeedForward, SASRecConfig

TIME_ENCODINGS = ("repo", "personal")
POSITION_ENCODINGS = ("input", "kv")
TIME_DROPOUTS = ("pairwise", "table")
_MASKED = -10000.0  # RecBole's additive mask value


@dataclasses.dataclass
class TiSASRecConfig(SASRecConfig):
    """SASRec's options (same defaults except 4 heads, the TiM4Rec baseline config) plus the time path."""

    n_heads: int = 4
    time_span: int = 256
    time_encoding: str = "repo"
    position_encoding: str = "input"
    #: "pairwise" (the repo's: dropout on every looked-up [L, L, hidden] time K/V tensor) or "table" (NOT the
    #: repo's: dropout on the [time_span+1, hidden] tables once per forward; far cheaper, see module docstring)
    time_dropout: str = "pairwise"

    HELP: ClassVar[dict[str, str]] = {
        "time_span": "largest time interval kept; longer ones are clipped to it (the number of interval embeddings)",
        "time_encoding": "repo: clipped raw-second gaps, as the TiM4Rec repository; personal: the TiSASRec "
        "paper's gaps in units of the user's smallest interval",
        "position_encoding": "input: a position embedding added to the input (the repository's); kv: "
        "position key and value embeddings inside attention (the original paper's)",
        "time_dropout": "pairwise: dropout on every looked-up time key/value, as the repository; table: once "
        "on the embedding tables, far cheaper and NOT the repository's",
    }
    CHOICES: ClassVar[dict[str, tuple]] = {
        "time_encoding": TIME_ENCODINGS,
        "position_encoding": POSITION_ENCODINGS,
        "time_dropout": TIME_DROPOUTS,
    }

    def validate(self) -> None:
        super().validate()
        if self.time_span < 1:
            raise ModelConfigError(f"time_span must be a positive integer, got {self.time_span}")
        if self.time_encoding not in TIME_ENCODINGS:
            raise ModelConfigError(f"time_encoding must be one of {TIME_ENCODINGS}, got {self.time_encoding!r}")
        if self.time_dropout not in TIME_DROPOUTS:
            raise ModelConfigError(f"time_dropout must be one of {TIME_DROPOUTS}, got {self.time_dropout!r}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ModelConfigError(
                f"position_encoding must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}"
            )


def repo_time_matrix(timestamps: torch.Tensor, time_span: int) -> torch.Tensor:
    """[batch, L, L] long: min(|t_i - t_j|, span) on float32 raw timestamps, truncated toward zero.

    The repository computes `clamp(|diff|.int(), max=span)`; clamping before the integer cast gives the same
    values without its int32 overflow on millisecond timestamps.
    """
    stamps = timestamps.float()
    diff = (stamps[:, :, None] - stamps[:, None, :]).abs()
    return diff.clamp(max=time_span).long()


def personal_time_matrix(items: torch.Tensor, timestamps: torch.Tensor, time_span: int) -> torch.Tensor:
    """[batch, L, L] long: the original TiSASRec relation with a causal personal scale per query row."""
    stamps = timestamps.double()
    real = items != 0
    gaps = stamps[:, 1:] - stamps[:, :-1]
    usable = real[:, 1:] & (gaps != 0)
    gaps = torch.where(usable, gaps.abs(), torch.full_like(gaps, math.inf))
    gaps = F.pad(gaps, (1, 0), value=math.inf)  # position 0 has no gap
    scale = torch.cummin(gaps, dim=1).values  # smallest non-zero gap up to each position
    scale = torch.where(torch.isinf(scale), torch.ones_like(scale), scale)
    shifted = stamps - stamps[:, :1]
    # row i: both times in row i's unit, rounded (round half to even, as Python's round)
    ticks_query = torch.round(shifted / scale)  # [batch, L]
    ticks_keys = torch.round(shifted[:, None, :] / scale[:, :, None])  # [batch, L(query), L(key)]
    relation = (ticks_query[:, :, None] - ticks_keys).abs()
    return relation.clamp(max=time_span).long()


class TimeAwareAttention(nn.Module):
    def __init__(self, config: TiSASRecConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_size = config.hidden_size // config.n_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = Dropout(config.attn_dropout)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_dropout = Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_size).transpose(1, 2)  # [b, h, L, d]

    def forward(self, x, mask, time_k, time_v, pos_k=None, pos_v=None, at=None):
        """time_k/time_v: materialised per-pair tensors [b, h, L, L, d], their causal blocks (CausalPairs), the
        C++ kernels' unmaterialised pairs (DroppedPairs), or, without dropout, the pair (table [h, span+1, d], relation [b, L, L]), equivalent and far cheaper.

        With `at` ([batch] positions) only those query rows are computed: [batch, 1, hidden]."""
        residual = x
        if at is not None:
            residual = at_positions(x, at)
            mask = query_rows(mask, at)
            time_k, time_v = (query_rows(t, at) for t in (time_k, time_v))
        q, k, v = self._heads(self.query(residual)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = q @ k.transpose(-1, -2)
        if isinstance(time_k, tuple):
            table_k, relation = time_k
            index = relation.unsqueeze(1).expand(-1, self.n_heads, -1, -1)  # [b, h, L, L]
            scores = scores + torch.einsum("bhid,hrd->bhir", q, table_k).gather(-1, index)
        elif isinstance(time_k, CausalPairs | DroppedPairs):
            scores = scores + time_k.scores(q)
        else:
            # a multiply-and-sum beats a batch of [L, d] x [d] products on the CPU
            scores = scores + (time_k * q.unsqueeze(-2)).sum(-1)
        if pos_k is not None:
            scores = scores + q @ pos_k.transpose(-1, -2)
        scores = scores / math.sqrt(self.head_size) + mask
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        context = probs @ v
        if isinstance(time_v, tuple):
            table_v, relation = time_v
            index = relation.unsqueeze(1).expand(-1, self.n_heads, -1, -1)
            buckets = probs.new_zeros(*probs.shape[:3], table_v.size(1)).scatter_add_(-1, index, probs)
            context = context + torch.einsum("bhir,hrd->bhid", buckets, table_v)
        elif isinstance(time_v, CausalPairs | DroppedPairs):
            context = context + time_v.context(probs)
        else:
            context = context + (probs.unsqueeze(-1) * time_v).sum(-2)
        if pos_v is not None:
            context = context + probs @ pos_v
        batch, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, length, -1)
        return self.norm(self.out_dropout(self.dense(context)) + residual)


def attention_mask(items: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, 1, L(query), L(key)] additive mask: 0 where the key is not later than the query and is a real
    item, RecBole's -10000 elsewhere."""
    length = items.size(1)
    visible = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    visible = visible.unsqueeze(0) & (items != 0).unsqueeze(1)
    return torch.zeros(visible.shape, dtype=dtype, device=items.device).masked_fill(~visible, _MASKED).unsqueeze(1)


def query_rows(pairs, at: torch.Tensor):
    """The query rows `at` of a per-pair tensor: the mask [b, 1, L, L], materialised time embeddings
    [b, h, L, L, d] (query axis 2), their causal blocks, the C++ kernels' DroppedPairs, or the (table, relation
    [b, L, L]) pair; query axis kept, size 1."""
    if isinstance(pairs, tuple):
        table, relation = pairs
        return table, at_positions(relation, at)
    if isinstance(pairs, CausalPairs | DroppedPairs):
        return pairs.rows(at)
    return at_positions(pairs.transpose(1, 2), at).transpose(1, 2)


# Query rows per block of CausalPairs, as a fraction of the length: with n blocks the blocks hold
# (n + 1) / 2n of the [L, L] pairs (55% at 10 blocks, against the triangle's ~51% at L = 50), and each
# block costs a few more small operations per layer.
_CAUSAL_BLOCKS = 10


@dataclasses.dataclass
class CausalPairs:
    """Per-pair time embeddings (dropout applied) of the causal pairs only: the query rows cut into blocks,
    block (i0, pairs) holding rows i0..i1-1 against keys 0..i1-1 as pairs [b, h, i1 - i0, i1, d]."""

    blocks: list[tuple[int, torch.Tensor]]
    length: int

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """q . pair for every pair: [b, h, L, L], zero above the blocks (masked there anyway)."""
        parts = []
        for i0, pairs in self.blocks:
            rows, keys = pairs.shape[2:4]
            # a multiply-and-sum beats a batch of [keys, d] x [d] products on the CPU
            term = (pairs * q[:, :, i0 : i0 + rows].unsqueeze(-2)).sum(-1)
            parts.append(F.pad(term, (0, self.length - keys)))
        return torch.cat(parts, dim=2)

    def context(self, probs: torch.Tensor) -> torch.Tensor:
        """sum_j p_ij pair_ij per query row: [b, h, L, d] (p is zero above each block's keys)."""
        parts = []
        for i0, pairs in self.blocks:
            rows, keys = pairs.shape[2:4]
            parts.append((probs[:, :, i0 : i0 + rows, :keys].unsqueeze(-1) * pairs).sum(-2))
        return torch.cat(parts, dim=2)

    def rows(self, at: torch.Tensor) -> torch.Tensor:
        """Query row at[b] of every sequence b as materialised pairs [b, h, 1, L, d], keys past the block
        zero (masked). Every block offers its clamped row and the owning block's is kept: no
        data-dependent shapes or host syncs (torch.compile, CUDA)."""
        batch = torch.arange(at.size(0), device=at.device)
        chosen = None
        for i0, pairs in self.blocks:
            rows, keys = pairs.shape[2:4]
            picked = F.pad(pairs[batch, :, (at - i0).clamp(0, rows - 1)], (0, 0, 0, self.length - keys))
            owner = ((at >= i0) & (at < i0 + rows)).view(-1, 1, 1, 1)
            chosen = picked if chosen is None else torch.where(owner, picked, chosen)
        return chosen.unsqueeze(2)


@dataclasses.dataclass
class DroppedPairs:
    """Per-pair time embeddings under pairwise dropout, never materialised: the C++ kernels (the "cpp" backend of
    time_pairs, models/kernels/time_pairs.py) redraw each pair's dropout mask from (seed, stream) where the pair is
    used. The same interface as CausalPairs; `positions` [b, R] are the query rows' positions."""

    table: torch.Tensor  # [span + 1, hidden]
    relation: torch.Tensor  # [b, L, L]
    positions: torch.Tensor
    dropout: PairDropout

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        return time_pair_scores(q, self.table, self.relation, self.positions, self.dropout)

    def context(self, probs: torch.Tensor) -> torch.Tensor:
        return time_pair_context(probs, self.table, self.relation, self.positions, self.dropout)

    def rows(self, at: torch.Tensor) -> DroppedPairs:
        """The query rows at[b]: the same pairs and masks, one row per sequence."""
        return dataclasses.replace(self, positions=at.view(-1, 1))


@register
class TiSASRec(SequentialRecommender):
    name = "tisasrec"
    config_class = TiSASRecConfig
    uses_timestamps = True
    kernels = ("time_pairs",)

    def __init__(self, n_items: int, max_len: int, config: TiSASRecConfig):
        super().__init__(n_items, max_len, config)
        hidden = config.hidden_size
        if config.position_encoding == "input":
            self.position_embedding = nn.Embedding(max_len, hidden)
        else:
            self.position_k = nn.Embedding(max_len, hidden)
            self.position_v = nn.Embedding(max_len, hidden)
        self.time_k = nn.Embedding(config.time_span + 1, hidden)
        self.time_v = nn.Embedding(config.time_span + 1, hidden)
        self.input_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)
        self.attention = nn.ModuleList(TimeAwareAttention(config) for _ in range(config.n_layers))
        self.feed_forward = nn.ModuleList(
            FeedForward(hidden, config.inner_size, config.dropout, config.layer_norm_eps)
            for _ in range(config.n_layers)
        )
        self.apply(lambda m: recbole_init_(m, config.initializer_range))
        #: force materialised per-pair time embeddings even without dropout (tests compare both paths)
        self.materialise_time = False

    def time_matrix(self, items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        if self.config.time_encoding == "repo":
            return repo_time_matrix(timestamps, self.config.time_span)
        return personal_time_matrix(items, timestamps, self.config.time_span)

    def _per_head_table(self, weight: torch.Tensor) -> torch.Tensor:
        """[span+1, hidden] -> [heads, span+1, head_size]."""
        return weight.view(weight.size(0), self.config.n_heads, -1).transpose(0, 1)

    @property
    def _pairwise_dropout(self) -> bool:
        """Training with the repository's dropout on every looked-up time embedding."""
        return self.training and self.dropout.p > 0 and self.config.time_dropout == "pairwise"

    def _pair_embeddings(self, embedding: nn.Embedding, relation: torch.Tensor, dropout: PairDropout):
        """Time K or V for every causal (query, key) pair with dropout, as DroppedPairs (the "cpp" backend, drawing
        its masks by `dropout`) or CausalPairs (the torch twin); or, when no per-pair dropout is needed, (table,
        relation) for the bucketed computation (the same result without any [b, L, L, d] tensor); or every pair
        [b, h, L, L, d] without dropout when `materialise_time` is set."""
        pairwise = self._pairwise_dropout
        weight = embedding.weight
        if pairwise and self._backends["time_pairs"] == CPU_BACKEND:
            positions = torch.arange(relation.size(1), device=relation.device).expand(relation.size(0), -1)
            return DroppedPairs(weight, relation, positions, dropout)
        if self.config.time_dropout == "table":
            weight = self.dropout(weight)
        table = self._per_head_table(weight)
        if not pairwise and not self.materialise_time:
            return table.contiguous(), relation
        heads, buckets, _ = table.shape
        offsets = torch.arange(heads, device=relation.device).view(1, heads, 1, 1) * buckets
        flat = table.reshape(heads * buckets, -1)
        if not pairwise:
            return F.embedding(relation.unsqueeze(1) + offsets, flat)
        length = relation.size(1)
        rows = -(-length // _CAUSAL_BLOCKS)
        blocks = []
        for i0 in range(0, length, rows):
            i1 = min(length, i0 + rows)
            blocks.append((i0, self.dropout(F.embedding(relation[:, i0:i1, :i1].unsqueeze(1) + offsets, flat))))
        return CausalPairs(blocks, length)

    def encode(self, items: torch.Tensor, timestamps: torch.Tensor | None, at=None) -> torch.Tensor:
        if timestamps is None:
            raise ValueError("tisasrec needs the timestamp sequence")
        length = items.size(1)
        positions = torch.arange(length, device=items.device)
        x = self.item_embedding(items)
        pos_k = pos_v = None
        if self.config.position_encoding == "input":
            x = x + self.position_embedding(positions)
        else:
            # per-sequence dropout on the position K/V embeddings, as in pmixer's port: [b, h, L, d]
            shape = (items.size(0), length, self.config.n_heads, -1)
            pos_k = self.dropout(self.position_k(positions).expand(items.size(0), -1, -1))
            pos_v = self.dropout(self.position_v(positions).expand(items.size(0), -1, -1))
            pos_k, pos_v = (t.reshape(shape).transpose(1, 2) for t in (pos_k, pos_v))
        x = self.dropout(self.input_norm(x))
        relation = self.time_matrix(items, timestamps)
        # One draw per forward pass from torch's generator (so a run's seed fixes it) keys the fused kernels' masks.
        fused = self._pairwise_dropout and self._backends["time_pairs"] == CPU_BACKEND
        seed = int(torch.randint(0, 2**62, ())) if fused else 0
        time_k = self._pair_embeddings(self.time_k, relation, PairDropout(seed, 0, self.dropout.p))
        time_v = self._pair_embeddings(self.time_v, relation, PairDropout(seed, 1, self.dropout.p))
        mask = attention_mask(items, x.dtype)
        last = len(self.attention) - 1
        for index, (attention, feed_forward) in enumerate(zip(self.attention, self.feed_forward)):
            x = feed_forward(attention(x, mask, time_k, time_v, pos_k, pos_v, at if index == last else None))
        return x if at is None else x.squeeze(1)
