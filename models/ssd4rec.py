"""SSD4Rec*: the TiM4Rec authors' 64-d replica of SSD4Rec (`baseline/SSD4Rec_r` in the TiM4Rec repository),
i.e. TiM4Rec without its time path.

    item embedding (padding 0) -> dropout -> LayerNorm(eps norm_eps)      (no positional embedding)
    num_layers x [SSD block -> dropout -> LayerNorm(+ residual if num_layers > 1) -> FFN(Hardswish)]

Unidirectional, fixed length, right padding; none of the official SSD4Rec's sequence registers or
bidirectional scan. Causal: every operation is position-wise or a causal convolution / scan, so trailing
padding can be trimmed and all_positions training is valid. Defaults are the replica's config.yaml: hidden 64,
2 layers, dropout 0.2, d_state 32, d_conv 4, expand 2, head_dim 32 (n_heads 4, hence the Hardswish conv),
chunk_size 32, norm_eps 1e-12, is_ffn True, no Kaiming init.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from models.base import Dropout, ModelConfig, ModelConfigError, SequentialRecommender, recbole_init_
from models.registry import register
from models.ssd_mixer import (
    CONV_ACTIVATIONS,
    FFN_ACTIVATIONS,
    FFN_KERNELS,
    SSD_KERNELS,
    SSDLayer,
    run_layers,
)


@dataclasses.dataclass
class SSDConfig(ModelConfig):
    """The options of the SSD stack that SSD4Rec* and TiM4Rec share, with SSD4Rec*'s defaults
    (TiM4Rec's config overrides those its official configuration sets otherwise), and their checks."""

    num_layers: int = 2
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 32
    chunk_size: int = 32
    norm_eps: float = 1e-12
    is_ffn: bool = True
    is_kai_ming_init: bool = False
    #: "auto" = official rule (Hardswish unless n_heads % 8 == 0), or force "hardswish" / "silu"
    conv_activation: str = "auto"
    ffn_activation: str = "hardswish"
    #: the official FeedForward keeps its default LayerNorm eps (1e-12) whatever norm_eps is
    ffn_norm_eps: float = 1e-12

    HELP: ClassVar[dict[str, str]] = {
        "num_layers": "SSD layers",
        "d_state": "state size of the SSD scan",
        "d_conv": "width of the causal depthwise convolution",
        "expand": "inner width of an SSD block as a multiple of hidden_size",
        "head_dim": "width of an SSD head; hidden_size * expand must be divisible by it (heads = the quotient)",
        "chunk_size": "chunk length of the SSD chunked scan (both kernel backends honour it)",
        "norm_eps": "epsilon of the LayerNorms and the gated RMSNorm",
        "is_ffn": "a feed-forward block after each SSD layer",
        "is_kai_ming_init": "Kaiming instead of RecBole's normal initialisation of the linear layers",
        "conv_activation": "activation of the convolutions: auto = the official rule (Hardswish unless the "
        "number of heads is a multiple of 8, then SiLU)",
        "ffn_activation": "activation of the feed-forward block",
        "ffn_norm_eps": "epsilon of the feed-forward block's LayerNorm (the official code keeps 1e-12 whatever norm_eps is)",
    }
    CHOICES: ClassVar[dict[str, tuple]] = {
        "conv_activation": CONV_ACTIVATIONS,
        "ffn_activation": FFN_ACTIVATIONS,
    }

    def validate(self) -> None:
        super().validate()
        for name in ("num_layers", "d_state", "d_conv", "expand", "head_dim", "chunk_size"):
            value = getattr(self, name)
            if value < 1:
                raise ModelConfigError(f"{name} must be a positive integer, got {value}")
        d_inner = self.hidden_size * self.expand
        if d_inner % self.head_dim:
            raise ModelConfigError(
                f"hidden_size*expand ({self.hidden_size}*{self.expand}={d_inner}) must be divisible by "
                f"head_dim ({self.head_dim})"
            )
        if self.norm_eps <= 0:
            raise ModelConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.conv_activation not in CONV_ACTIVATIONS:
            raise ModelConfigError(f"conv_activation must be one of {CONV_ACTIVATIONS}, got {self.conv_activation!r}")
        if self.ffn_activation not in FFN_ACTIVATIONS:
            raise ModelConfigError(f"ffn_activation must be one of {FFN_ACTIVATIONS}, got {self.ffn_activation!r}")


@dataclasses.dataclass
class SSD4RecConfig(SSDConfig):
    """SSD4Rec*: the SSD stack alone, at the stack's defaults (hidden 64, dropout 0.2)."""


def ssd_layers(config, mixer_extra: dict | None = None) -> nn.ModuleList:
    """The stack of SSD layers built from an SSD4Rec*/TiM4Rec config."""
    return nn.ModuleList(
        SSDLayer(
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout,
            norm_eps=config.norm_eps,
            is_ffn=config.is_ffn,
            ffn_activation=config.ffn_activation,
            ffn_norm_eps=config.ffn_norm_eps,
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand=config.expand,
            head_dim=config.head_dim,
            chunk_size=config.chunk_size,
            conv_activation=config.conv_activation,
            **(mixer_extra or {}),
        )
        for _ in range(config.num_layers)
    )


@register
class SSD4Rec(SequentialRecommender):
    name = "ssd4rec"
    config_class = SSD4RecConfig
    kernels = (*SSD_KERNELS, *FFN_KERNELS)

    def __init__(self, n_items: int, max_len: int, config: SSD4RecConfig):
        super().__init__(n_items, max_len, config)
        self.dropout = Dropout(config.dropout)
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.layers = ssd_layers(config)
        self.apply(lambda m: recbole_init_(m, kaiming_conv=config.is_kai_ming_init))

    def encode(self, items: torch.Tensor, timestamps: torch.Tensor | None = None, at=None) -> torch.Tensor:
        x = self.input_norm(self.dropout(self.item_embedding(items)))
        return run_layers(self.layers, x, at)
