"""Mamba4Rec (Liu et al., arXiv 2403.03900): Mamba1 blocks over item embeddings.

From the official code (github.com/chengkai-liu/Mamba4Rec `mamba4rec.py`, identical to the copy in TiM4Rec's
`baseline/Mamba4Rec`) and mamba-ssm's `Mamba` module (mamba_simple.py):

    item embedding (padding 0) -> dropout -> LayerNorm(1e-12)                     (no positional embedding)
    layer: h = Mamba(x);  h = LayerNorm(dropout(h))            if num_layers == 1 (no residual)
                          h = LayerNorm(dropout(h) + x)        otherwise
           x = LayerNorm(dropout(W2 dropout(GELU(W1 h))) + h)  (FFN 4x)
    Mamba(x): [x', z] = in_proj(x) (no bias); x' = SiLU(depthwise causal conv(x', d_conv) + bias);
              [dt, B, C] = x_proj(x') (no bias, dt_rank = ceil(d/16)); dt = dt_proj.weight @ dt;
              y = selective_scan(x', dt, A = -exp(A_log), B, C, D, z, delta_bias = dt_proj.bias, softplus);
              out_proj(y) (no bias)
    init: A_log = log(1..d_state) per channel (S4D real), D = 1, dt_proj with Mamba's dt init
          (weight U(+-dt_rank^-0.5), bias = softplus^-1(logU[1e-3, 0.1] floored at 1e-4)).

Initialisation quirk kept by default: the official model applies RecBole's `_init_weights` to every submodule
*after* building Mamba, which re-draws every Linear weight N(0, 0.02) and zeroes every Linear bias, Mamba's
dt_proj included (its `_no_reinit` mark is only honoured by mamba-ssm's own init). So the official model starts
with dt_proj.bias = 0, i.e. step sizes near softplus(0) = 0.69, not Mamba's [1e-3, 0.1]. `mamba_dt_init=True`
restores Mamba's dt_proj initialisation after the RecBole init.

Defaults are the Mamba4Rec config.yaml (hidden 64, 1 layer, dropout 0.2, d_state 32, d_conv 4, expand 2);
the TiM4Rec authors' reruns use num_layers 2 (`OFFICIAL_CONFIGS`). Causal.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from models.base import Dropout, ModelConfig, ModelConfigError, SequentialRecommender, at_positions, recbole_init_
from models.kernels.selective_scan import selective_scan
from models.registry import register
from models.ssd_mixer import (
    FFN_KERNELS,
    SSMFeedForward,
    depthwise_causal_conv,
    run_layers,
)

MAMBA_KERNELS = ("selective_scan", "causal_conv1d")

OFFICIAL_CONFIGS: dict[str, dict] = {
    # chengkai-liu/Mamba4Rec config.yaml
    "mamba4rec": dict(hidden_size=64, num_layers=1, dropout=0.2, d_state=32, d_conv=4, expand=2),
    # TiM4Rec baseline/Mamba4Rec/config.yaml (the reruns behind the TiM4Rec tables)
    "tim4rec-baseline": dict(hidden_size=64, num_layers=2, dropout=0.2, d_state=32, d_conv=4, expand=2),
}


@dataclasses.dataclass
class Mamba4RecConfig(ModelConfig):
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.2
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    #: 0 = "auto" (ceil(hidden_size / 16), Mamba's default)
    dt_rank: int = 0
    layer_norm_eps: float = 1e-12
    #: keep Mamba's dt_proj init instead of the official RecBole re-initialisation (see module docstring)
    mamba_dt_init: bool = False

    HELP: ClassVar[dict[str, str]] = {
        "num_layers": "Mamba layers",
        "d_state": "state size of the selective scan (SSM state per channel)",
        "d_conv": "width of the causal depthwise convolution",
        "expand": "inner width of a Mamba block as a multiple of hidden_size",
        "dt_rank": "rank of the step-size projection; 0 = ceil(hidden_size / 16), Mamba's default",
        "layer_norm_eps": "epsilon of the LayerNorms",
        "mamba_dt_init": "keep Mamba's own step-size initialisation instead of RecBole's re-initialisation "
        "(the official Mamba4Rec re-initialises)",
    }

    def validate(self) -> None:
        super().validate()
        for name in ("num_layers", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if value < 1:
                raise ModelConfigError(f"{name} must be a positive integer, got {value}")
        if self.dt_rank < 0:
            raise ModelConfigError(f"dt_rank must be 0 (auto) or positive, got {self.dt_rank}")
        if self.layer_norm_eps <= 0:
            raise ModelConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")


class MambaMixer(nn.Module):
    """The Mamba1 block of mamba-ssm (mamba_simple.Mamba, default options), on models.kernels."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int = 0,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.backends = {kernel: "torch" for kernel in MAMBA_KERNELS}
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.reset_dt_proj()
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # S4D real
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def reset_dt_proj(self) -> None:
        """Mamba's dt init: weight U(+-dt_rank^-0.5); bias so that softplus(bias) ~ logU[dt_min, dt_max]."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        ).clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def set_backends(self, backends: dict[str, str]) -> None:
        self.backends.update({k: v for k, v in backends.items() if k in MAMBA_KERNELS})

    def forward(self, hidden: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, length, d_model] -> same shape, or [batch, 1, d_model] at positions `at` only."""
        # Split along the projection's own last axis, then transpose: the split's backward then joins two
        # time-major gradients row by row into the projection's layout. Split after the transpose, it joined them
        # channel-major and the projection's backward copied the result back: two transposing passes over
        # [batch, L, 2 * d_inner] per layer (about 7% of a hidden-64 training step on a CPU).
        x, z = (part.transpose(1, 2) for part in self.in_proj(hidden).chunk(2, dim=-1))  # [batch, d_inner, L] each
        x = depthwise_causal_conv(x, self.conv1d, "silu", self.backends["causal_conv1d"])
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # no bias here: it is the scan's delta_bias
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2),  # views of x_proj's output: each backend takes the layout it needs
            C.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.backends["selective_scan"],
        )
        y = y.transpose(1, 2)
        return self.out_proj(y if at is None else at_positions(y, at))


class MambaLayer(nn.Module):
    def __init__(self, config: Mamba4RecConfig):
        super().__init__()
        self.residual = config.num_layers > 1
        self.mamba = MambaMixer(config.hidden_size, config.d_state, config.d_conv, config.expand, config.dt_rank)
        self.dropout = Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = SSMFeedForward(
            config.hidden_size, 4 * config.hidden_size, config.dropout, config.layer_norm_eps, "gelu"
        )

    def forward(self, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.dropout(self.mamba(x, at))
        if at is not None:
            x = at_positions(x, at)
        return self.ffn(self.norm(hidden + x if self.residual else hidden))


@register
class Mamba4Rec(SequentialRecommender):
    name = "mamba4rec"
    config_class = Mamba4RecConfig
    kernels = (*MAMBA_KERNELS, *FFN_KERNELS)

    def __init__(self, n_items: int, max_len: int, config: Mamba4RecConfig):
        super().__init__(n_items, max_len, config)
        self.dropout = Dropout(config.dropout)
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(MambaLayer(config) for _ in range(config.num_layers))
        self.apply(recbole_init_)
        if config.mamba_dt_init:
            for layer in self.layers:
                layer.mamba.reset_dt_proj()

    def encode(self, items: torch.Tensor, timestamps: torch.Tensor | None = None, at=None) -> torch.Tensor:
        x = self.input_norm(self.dropout(self.item_embedding(items)))
        return run_layers(self.layers, x, at)
