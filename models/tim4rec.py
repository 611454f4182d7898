"""TiM4Rec (Fan et al., arXiv 2409.16182, Neurocomputing 2025): SSD with a time-aware structured mask.

Reimplemented from the official code (github.com/AlwaysFHao/TiM4Rec `tim4rec.py` + `ssd.py`, commit 8d4a6ce):

    item embedding (padding 0) -> dropout -> LayerNorm(norm_eps)                  (no positional embedding)
    gaps d = [0, t_1 - t_0, ..., t_{L-1} - t_{L-2}]   on float32 raw-second timestamps, padding included
    T_1 = repeat_heads( LayerNorm_L( dropout(d) ) )                              [batch, heads, L]
    layer k:  s = MLP_L(T_k) = Linear(L,L)(SiLU(Linear(L,L)(dropout_t(T_k))))   (mixes all L positions)
              tdt = act(conv2(act(conv1(T_k * s))))       depthwise causal convs over the heads, width d_conv
              x = SSDLayer(x, dt modulated by tdt^T)       final_dt = dt * tdt^T inside the SSD block
              g = sigmoid(Linear(L, L if p2p_residual else 1)(dropout_t(T_k)))
              T_{k+1} = LayerNorm_L(g * T_k + (1 - g) * tdt)
    SSDLayer = SSD block -> dropout -> LayerNorm(+ residual if num_layers > 1) -> FFN(4x, Hardswish, eps 1e-12)

Quirks of the official model are named options whose defaults reproduce it (docs/design.md#official-tim4rec-quirks):
  timestamp_dtype="float32"   raw timestamps rounded to float32 before differencing (64-128 s quantisation)
  first_gap="zero"            the first gap is 0 ("learned": the start token the official code comments out)
  pad_gap="include"           the gap into the zero padding (about -t_{n-1}) stays in the sequence-axis
                              LayerNorm ("zero": gaps at padding positions are set to 0 first)
  conv_activation="auto"      Hardswish convolutions when n_heads % 8 != 0 (all released configs), else SiLU
  position_embedding=False    no positional embedding
  ffn_activation="hardswish", ffn_norm_eps=1e-12

Time encodings (`time_encoding`):
  "official"  raw gaps as above (the paper's model; the default).
  "log"       sign(d) * log1p(|d| / time_unit_seconds), then the same sequence-axis LayerNorm/MLP.
  "causal"    NOT the paper's model: a causal variant of the time path. Gaps log1p(max(d, 0) / unit), a per-head
              affine instead of the LayerNorm over L, per-position MLP and gate over the heads axis instead of
              Linear(L, L), the same causal convolutions, and no LayerNorm over L between layers. No position
              sees a later one, so all_positions training is valid and trailing padding can be trimmed.

Causality and padding. With the official/log encodings (and is_time) the time path mixes all L = max_len
positions, padding included: the model is not causal (prefix training only) and its outputs depend on the
padded width, so the harness must pass full max_len batches (trims_padding False; narrower input is padded
here). The time path depends only on the timestamps and is cheap ([batch, heads, max_len]); it is computed at
full width, then the expensive causal item path (convolution, SSD scan, FFN) runs only up to the longest real
sequence in the batch. That is exact (`trim_item_path`, on by default).

Official configurations: `OFFICIAL_CONFIGS` (config/*.yaml of the repository; dataset max_len in
`OFFICIAL_MAX_LEN`). Defaults = the amazon-beauty 64-d config.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Dropout, ModelConfigError, SequentialRecommender, recbole_init_, round_up_width
from models.kernels.backends import CPU_BACKEND
from models.registry import register
from models.ssd4rec import SSDConfig, ssd_layers
from models.ssd_mixer import (
    FFN_KERNELS,
    SSD_KERNELS,
    depthwise_causal_conv,
    resolve_conv_activation,
    run_layers,
)

TIME_ENCODINGS = ("official", "log", "causal")
TIMESTAMP_DTYPES = {"float32": torch.float32, "float64": torch.float64}
FIRST_GAPS = ("zero", "learned")
PAD_GAPS = ("include", "zero")

_SHARED = dict(num_layers=2, d_conv=4, expand=2, chunk_size=32, is_ffn=True)
#: The released configs (config/config4*.yaml). Note is_time False in kuairand and ml-1m-256d, as released.
OFFICIAL_CONFIGS: dict[str, dict] = {
    "amazon-beauty": dict(
        _SHARED,
        hidden_size=64,
        d_state=32,
        head_dim=32,
        dropout=0.4,
        time_drop_out=0.0,
        norm_eps=1e-5,
        is_time=True,
        p2p_residual=True,
        is_kai_ming_init=False,
    ),
    "ml-1m": dict(
        _SHARED,
        hidden_size=64,
        d_state=32,
        head_dim=32,
        dropout=0.2,
        time_drop_out=0.2,
        norm_eps=1e-12,
        is_time=True,
        p2p_residual=False,
        is_kai_ming_init=True,
    ),
    "ml-1m-256d": dict(
        _SHARED,
        hidden_size=256,
        d_state=64,
        head_dim=128,
        dropout=0.2,
        time_drop_out=0.2,
        norm_eps=1e-12,
        is_time=False,
        p2p_residual=False,
        is_kai_ming_init=True,
    ),
    "kuairand": dict(
        _SHARED,
        hidden_size=64,
        d_state=32,
        head_dim=32,
        dropout=0.2,
        time_drop_out=0.0,
        norm_eps=1e-10,
        is_time=False,
        p2p_residual=False,
        is_kai_ming_init=False,
    ),
    "steam": dict(
        _SHARED,
        hidden_size=64,
        d_state=32,
        head_dim=32,
        dropout=0.2,
        time_drop_out=0.2,
        norm_eps=1e-10,
        is_time=True,
        p2p_residual=False,
        is_kai_ming_init=True,
    ),
}
OFFICIAL_MAX_LEN = {"amazon-beauty": 50, "ml-1m": 200, "ml-1m-256d": 200, "kuairand": 50, "steam": 50}


@dataclasses.dataclass
class TiM4RecConfig(SSDConfig):
    # the SSD stack's options (SSDConfig) where the official TiM4Rec configuration differs
    dropout: float = 0.4
    norm_eps: float = 1e-5
    # the time path
    time_drop_out: float = 0.0
    is_time: bool = True
    p2p_residual: bool = True
    #: "official" (raw gaps), "log" (log gaps, same sequence-axis path) or "causal" (a causal variant)
    time_encoding: str = "official"
    #: unit of the gaps for the log/causal encodings
    time_unit_seconds: float = 3600.0
    timestamp_dtype: str = "float32"
    first_gap: str = "zero"
    pad_gap: str = "include"
    position_embedding: bool = False
    #: run the item path only up to the longest real sequence (exact; False computes the full max_len)
    trim_item_path: bool = True

    HELP: ClassVar[dict[str, str]] = {
        "dropout": "dropout on the item path, in [0, 1)",
        "time_drop_out": "dropout inside the time path, in [0, 1)",
        "is_time": "the time-aware mask; false = SSD4Rec* with TiM4Rec's other settings",
        "p2p_residual": "a gate per position between layers' time features (false: one gate for the sequence)",
        "time_encoding": "official: raw gaps, the paper's model; log: log gaps through the same sequence-axis "
        "path; causal: NOT the paper's model, a causal time path (allows all_positions training)",
        "time_unit_seconds": "unit of the gaps for the log and causal encodings",
        "timestamp_dtype": "precision of the timestamps before differencing (the official float32 rounds "
        "gaps to 64-128 s)",
        "first_gap": "zero: the first gap is 0 (official); learned: a learned start value",
        "pad_gap": "include: the gap into the padding stays in the sequence-axis LayerNorm (official); zero: "
        "gaps at padding positions are zeroed first",
        "position_embedding": "add a position embedding (the official model has none)",
        "trim_item_path": "run the item path only up to the longest real sequence of a batch (exact and "
        "faster; false computes the full max_len)",
    }
    CHOICES: ClassVar[dict[str, tuple]] = {
        "time_encoding": TIME_ENCODINGS,
        "timestamp_dtype": tuple(TIMESTAMP_DTYPES),
        "first_gap": FIRST_GAPS,
        "pad_gap": PAD_GAPS,
    }

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.time_drop_out < 1.0:
            raise ModelConfigError(f"time_drop_out must be in [0, 1), got {self.time_drop_out}")
        for name, allowed in (
            ("time_encoding", TIME_ENCODINGS),
            ("timestamp_dtype", tuple(TIMESTAMP_DTYPES)),
            ("first_gap", FIRST_GAPS),
            ("pad_gap", PAD_GAPS),
        ):
            if getattr(self, name) not in allowed:
                raise ModelConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.time_unit_seconds <= 0:
            raise ModelConfigError(f"time_unit_seconds must be positive, got {self.time_unit_seconds}")

    def variant(self) -> str:
        # the causal time path is NOT the paper's model (docs/design.md#official-tim4rec-quirks): a
        # study names it tim4rec-causal, and a plain training of it goes by the same name
        return "causal" if self.is_time and self.time_encoding == "causal" else ""

    @property
    def sequence_axis_time(self) -> bool:
        """The time path mixes all positions (official/log encodings with is_time)."""
        return self.is_time and self.time_encoding != "causal"


class TimeConvolutions(nn.Module):
    """The two depthwise causal convolutions over time that end every time layer, one channel per head."""

    def __init__(self, n_heads: int, d_conv: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_heads, n_heads, d_conv, groups=n_heads, padding=d_conv - 1)
        self.conv2 = nn.Conv1d(n_heads, n_heads, d_conv, groups=n_heads, padding=d_conv - 1)
        self.conv_backend = "torch"

    def set_backends(self, backends: dict[str, str]) -> None:
        # The compiled CPU convolution when the item path has it; on a GPU the torch twin as before: these
        # convolutions have one channel per head (4 in the released configurations), too few for a GPU kernel
        # to buy anything.
        self.conv_backend = backends["causal_conv1d"] if backends["causal_conv1d"] == CPU_BACKEND else "torch"

    def convolve(self, time_dt: torch.Tensor, activation: str) -> torch.Tensor:
        time_dt = depthwise_causal_conv(time_dt, self.conv1, activation, self.conv_backend)
        return depthwise_causal_conv(time_dt, self.conv2, activation, self.conv_backend)


class SequenceTimeLayer(TimeConvolutions):
    """The official per-layer time path: everything over the sequence axis is a Linear / LayerNorm over L."""

    def __init__(
        self, seq_len: int, n_heads: int, d_conv: int, time_drop_out: float, p2p_residual: bool, norm_eps: float
    ):
        super().__init__(n_heads, d_conv)
        self.scale = nn.Sequential(
            Dropout(time_drop_out), nn.Linear(seq_len, seq_len), nn.SiLU(), nn.Linear(seq_len, seq_len)
        )
        self.gate = nn.Sequential(
            Dropout(time_drop_out), nn.Linear(seq_len, seq_len if p2p_residual else 1), nn.Sigmoid()
        )
        self.norm = nn.LayerNorm(seq_len, eps=norm_eps)

    def forward(self, time: torch.Tensor, activation: str, need_next: bool):
        """time [batch, heads, L] -> (dt modulation [batch, L, heads], next layer's time or None)."""
        time_dt = time * self.scale(time)
        time_dt = self.convolve(time_dt, activation)
        following = None
        if need_next:  # the official code also computes it after the last layer, then drops it
            gate = self.gate(time)
            following = self.norm(gate * time + (1 - gate) * time_dt)
        return time_dt.transpose(1, 2), following


class CausalTimeLayer(TimeConvolutions):
    """The causal variant: per-position MLP and gate over the heads axis, causal convolutions over time."""

    def __init__(self, n_heads: int, d_conv: int, time_drop_out: float, p2p_residual: bool):
        super().__init__(n_heads, d_conv)
        self.scale = nn.Sequential(
            Dropout(time_drop_out), nn.Linear(n_heads, n_heads), nn.SiLU(), nn.Linear(n_heads, n_heads)
        )
        self.gate = nn.Sequential(
            Dropout(time_drop_out), nn.Linear(n_heads, n_heads if p2p_residual else 1), nn.Sigmoid()
        )

    def forward(self, time: torch.Tensor, activation: str, need_next: bool):
        per_position = time.transpose(1, 2)  # [batch, L, heads]
        time_dt = time * self.scale(per_position).transpose(1, 2)
        time_dt = self.convolve(time_dt, activation)
        following = None
        if need_next:
            gate = self.gate(per_position).transpose(1, 2)
            following = gate * time + (1 - gate) * time_dt
        return time_dt.transpose(1, 2), following


@register
class TiM4Rec(SequentialRecommender):
    name = "tim4rec"
    config_class = TiM4RecConfig
    uses_timestamps = True
    kernels = (*SSD_KERNELS, *FFN_KERNELS)

    def __init__(self, n_items: int, max_len: int, config: TiM4RecConfig):
        super().__init__(n_items, max_len, config)
        self.n_heads = config.hidden_size * config.expand // config.head_dim
        self.time_activation = resolve_conv_activation(config.conv_activation, self.n_heads)
        self.dropout = Dropout(config.dropout)
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.position_embedding = nn.Embedding(max_len, config.hidden_size) if config.position_embedding else None
        self.time_layers = None
        if config.is_time:
            if config.first_gap == "learned":
                self.time_start_token = nn.Parameter(torch.zeros(1))
            if config.sequence_axis_time:
                self.time_norm = nn.LayerNorm(max_len, eps=config.norm_eps)
                self.time_layers = nn.ModuleList(
                    SequenceTimeLayer(
                        max_len, self.n_heads, config.d_conv, config.time_drop_out, config.p2p_residual, config.norm_eps
                    )
                    for _ in range(config.num_layers)
                )
            else:
                self.time_weight = nn.Parameter(torch.ones(self.n_heads))
                self.time_bias = nn.Parameter(torch.zeros(self.n_heads))
                self.time_layers = nn.ModuleList(
                    CausalTimeLayer(self.n_heads, config.d_conv, config.time_drop_out, config.p2p_residual)
                    for _ in range(config.num_layers)
                )
        self.layers = ssd_layers(config)
        self.apply(lambda m: recbole_init_(m, kaiming_conv=config.is_kai_ming_init))

    # ------------------------------------------------------------------ capabilities
    @property
    def is_causal(self) -> bool:
        return not self.config.sequence_axis_time

    @property
    def trims_padding(self) -> bool:
        return not self.config.sequence_axis_time

    # ------------------------------------------------------------------ time path
    def time_gaps(self, items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """The encoded gap sequence [batch, L] before dropout and normalisation."""
        config = self.config
        stamps = timestamps.to(TIMESTAMP_DTYPES[config.timestamp_dtype])
        gaps = F.pad(stamps[:, 1:] - stamps[:, :-1], (1, 0))  # first gap 0
        if config.time_encoding == "log":
            gaps = torch.sign(gaps) * torch.log1p(gaps.abs() / config.time_unit_seconds)
        elif config.time_encoding == "causal":
            gaps = torch.log1p(gaps.clamp(min=0) / config.time_unit_seconds)
        if config.pad_gap == "zero" or config.time_encoding == "causal":
            gaps = gaps.masked_fill(items == 0, 0.0)
        gaps = gaps.to(self.item_embedding.weight.dtype)
        if config.first_gap == "learned":
            start = self.time_start_token.expand(gaps.size(0), 1)
            gaps = torch.cat([start, gaps[:, 1:]], dim=1)
        return gaps

    def time_modulations(self, items: torch.Tensor, timestamps: torch.Tensor) -> list[torch.Tensor]:
        """The dt modulation [batch, L, heads] of every layer; depends only on the timestamps (and, through
        the padding mask, on which positions are real)."""
        gaps = self.dropout(self.time_gaps(items, timestamps))
        if self.config.sequence_axis_time:
            time = self.time_norm(gaps).unsqueeze(1).expand(-1, self.n_heads, -1)
        else:
            time = gaps.unsqueeze(1) * self.time_weight[:, None] + self.time_bias[:, None]
        modulations = []
        for index, layer in enumerate(self.time_layers):
            modulation, time = layer(time, self.time_activation, need_next=index + 1 < len(self.time_layers))
            modulations.append(modulation)
        return modulations

    # ------------------------------------------------------------------ encoder
    def _full_width(self, items: torch.Tensor, timestamps: torch.Tensor):
        width = items.size(1)
        if width > self.max_len:
            raise ValueError(f"tim4rec was built for max_len {self.max_len} but got sequences of length {width}")
        if width < self.max_len:  # the official model always sees max_len positions (right-padded)
            items = F.pad(items, (0, self.max_len - width))
            timestamps = F.pad(timestamps, (0, self.max_len - width))
        return items, timestamps

    def _real_width(self, items: torch.Tensor) -> int:
        """1 + the last position that is real in any row (at least 1), rounded up to a multiple of
        `width_multiple` (exact: the trimmed item path is causal, so trailing padding changes no real
        position; a compiled encoder sets the multiple so that it meets a few widths, not every one)."""
        occupied = (items != 0).any(dim=0).nonzero()
        width = int(occupied.max()) + 1 if occupied.numel() else 1
        return round_up_width(width, self.width_multiple, items.size(1))

    def encode(self, items: torch.Tensor, timestamps: torch.Tensor | None, at=None) -> torch.Tensor:
        config = self.config
        modulations: list = [None] * config.num_layers
        if config.is_time:
            if timestamps is None:
                raise ValueError("tim4rec with is_time needs the timestamp sequence")
            if config.sequence_axis_time:
                items, timestamps = self._full_width(items, timestamps)
            modulations = self.time_modulations(items, timestamps)
            if config.sequence_axis_time and config.trim_item_path:
                width = self._real_width(items)
                items = items[:, :width]
                modulations = [m[:, :width] for m in modulations]
        x = self.item_embedding(items)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(items.size(1), device=items.device))
        x = self.input_norm(self.dropout(x))
        return run_layers(self.layers, x, at, modulations)
