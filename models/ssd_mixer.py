"""The SSD (Mamba2) block shared by SSD4Rec* and TiM4Rec, and the pieces around it.

Follows the TiM4Rec repository's `ssd.py` (TiSSD / SSD, itself Mamba2's `mamba2_simple.py` without the MLP
branch), read at commit 8d4a6ce:

    in_proj: d -> [z (d_inner) | xBC (d_inner + 2 d_state) | dt (n_heads)]       (bias=True)
    xBC = act(depthwise causal conv1d(xBC, width d_conv))                      (conv bias=True)
    y = SSD scan(x, dt [* modulation], A = -exp(A_log), B, C, D, dt_bias, softplus, chunk_size), one group
    y = RMSNorm(y * silu(z)) * w        (gated RMSNorm, norm_before_gate=False, eps = norm_eps, one group)
    out = out_proj(y)                                                          (bias=True)

Initialisation as there: A ~ U(1, 16) per head (A_log = log A), dt_bias = softplus^-1(dt) with
dt ~ logU[1e-3, 0.1] clamped at 1e-4, D = 1 per head; the model-level RecBole init (`models.base.recbole_init_`) then
overwrites Linear/Embedding weights with N(0, 0.02) and zeroes Linear biases; Conv1d keeps PyTorch's default
init unless Kaiming init is asked for.

Convolution activation (`conv_activation`): the official code calls causal_conv1d's fused SiLU ("swish") only
when n_heads is a multiple of 8; otherwise (n_heads = 4 in every released config) it runs nn.Conv1d followed by
**Hardswish**. "auto" reproduces that rule (assuming causal-conv1d is installed, as in the official
environment); "hardswish" and "silu" force one activation.

Kernels run through models.kernels (ssd_scan, causal_conv1d, rmsnorm_gated); the backend of each is chosen
once by the owning model (`set_backends`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Dropout, ModelConfigError, at_positions
from models.kernels.backends import CPU_BACKEND
from models.kernels.causal_conv import causal_conv1d
from models.kernels.dropout import ACTIVATIONS
from models.kernels.rmsnorm_gated import GatedRMSNorm
from models.kernels.ssd_scan import ssd_scan_at, ssd_scan_packed

SSD_KERNELS = ("ssd_scan", "causal_conv1d", "rmsnorm_gated")
#: the kernel of SSMFeedForward (its activation and the dropout after it), for the models that have one
FFN_KERNELS = ("activation_dropout",)
CONV_ACTIVATIONS = ("auto", "hardswish", "silu")
FFN_ACTIVATIONS = tuple(ACTIVATIONS)


# ----------------------------------------------------------------------------------------------- helpers
def resolve_conv_activation(option: str, n_heads: int) -> str:
    """The activation after the xBC convolution: the official rule is Hardswish unless n_heads % 8 == 0."""
    if option == "auto":
        return "silu" if n_heads % 8 == 0 else "hardswish"
    return option


def depthwise_causal_conv(
    x: torch.Tensor, conv: nn.Conv1d, activation: str, backend: str = "torch", input_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [batch, channels, length] (plus `input_bias` [channels], when given) through the depthwise causal Conv1d
    `conv` (its weights) and activation.

    Equals nn.Conv1d(padding=width-1) truncated to the first `length` outputs, then the activation.
    """
    weight = conv.weight.squeeze(1)
    if backend not in ("torch", CPU_BACKEND):  # the GPU kernel's layout; the C++ one reads the callers' in place
        x = x.contiguous()
    return causal_conv1d(x, weight, conv.bias, activation, input_bias=input_bias, backend=backend)


class SSMFeedForward(nn.Module):
    """The FFN of the Mamba4Rec / TiM4Rec / SSD4Rec* code: up -> act -> dropout -> down -> dropout ->
    residual LayerNorm (one dropout module used twice; SASRec's RecBole FFN has only the second)."""

    def __init__(self, hidden: int, inner: int, dropout: float, eps: float, activation: str):
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.activation = activation  # a name: the dropout after it may run both in one kernel
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout.after_activation(self.activation, self.up(x))
        return self.norm(self.dropout(self.down(hidden)) + x)


# ----------------------------------------------------------------------------------------------- SSD block
class SSDMixer(nn.Module):
    """One SSD block (Mamba2 mixer as in the TiM4Rec code): [batch, length, d_model] -> same shape.

    `forward(u, dt_modulation)` multiplies the raw step-size projection dt [batch, length, n_heads] by
    `dt_modulation` before dt_bias and softplus are applied inside the scan (TiM4Rec's `final_dt = dt *
    time_dt`); None leaves dt as is (SSD4Rec*).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 32,
        chunk_size: int = 32,
        norm_eps: float = 1e-12,
        conv_activation: str = "auto",
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = True,
        conv_bias: bool = True,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.head_dim = head_dim
        if self.d_inner % head_dim:
            raise ModelConfigError(f"hidden_size*expand ({self.d_inner}) must be divisible by head_dim ({head_dim})")
        self.n_heads = self.d_inner // head_dim
        self.chunk_size = chunk_size
        self.activation = resolve_conv_activation(conv_activation, self.n_heads)
        self.backends = {kernel: "torch" for kernel in SSD_KERNELS}

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.n_heads, bias=bias)
        conv_dim = self.d_inner + 2 * d_state
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias
        )
        # dt_bias: inverse softplus of dt ~ logU[dt_min, dt_max], floored (Mamba2's init).
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.n_heads, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps, group_size=None, norm_before_gate=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def set_backends(self, backends: dict[str, str]) -> None:
        self.backends.update({k: v for k, v in backends.items() if k in SSD_KERNELS})
        self.norm.backend = self.backends["rmsnorm_gated"]

    def forward(
        self, u: torch.Tensor, dt_modulation: torch.Tensor | None = None, at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u [batch, length, d_model] -> same shape, or [batch, 1, d_model] at positions `at` only (the
        gate z and everything after the scan at those positions; the scan's state still runs over all)."""
        batch, length, _ = u.shape
        # One product per part of in_proj (its rows), not one product split afterwards: the split's backward
        # joined the parts' gradients into a fresh [batch, L, in_proj width] copy every step (about 6% of a
        # training step at L 50, hidden 16 and 64). The gate z is needed at positions `at` only, when given.
        parts = [self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads]
        weight_z, weight_xBC, weight_dt = self.in_proj.weight.split(parts)
        bias_z, bias_xBC, bias_dt = (None,) * 3 if self.in_proj.bias is None else self.in_proj.bias.split(parts)
        # xBC's bias goes into the C++ convolution, which folds it into its own (causal_conv.py, input_bias): the
        # product's addmm would spend a pass broadcasting it and its backward another summing its gradient.
        conv_backend = self.backends["causal_conv1d"]
        bias_in_conv = bias_xBC if conv_backend == CPU_BACKEND else None
        z = F.linear(u if at is None else at_positions(u, at), weight_z, bias_z)
        xBC = F.linear(u, weight_xBC, bias_xBC if bias_in_conv is None else None)
        dt = F.linear(u, weight_dt, bias_dt)
        xBC = depthwise_causal_conv(
            xBC.transpose(1, 2), self.conv1d, self.activation, conv_backend, input_bias=bias_in_conv
        ).transpose(1, 2)
        if dt_modulation is not None:
            dt = dt * dt_modulation
        A = -torch.exp(self.A_log.float())
        if at is None:  # x, B and C stay packed in xBC: the C++ scan reads them in place
            y = ssd_scan_packed(
                xBC,
                dt,
                A,
                nheads=self.n_heads,
                ngroups=1,
                dstate=self.d_state,
                chunk_size=self.chunk_size,
                D=self.D,
                dt_bias=self.dt_bias,
                dt_softplus=True,
                backend=self.backends["ssd_scan"],
            )
        else:
            x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
            x = x.reshape(batch, length, self.n_heads, self.head_dim)
            B, C = B.reshape(batch, length, 1, self.d_state), C.reshape(batch, length, 1, self.d_state)
            y = ssd_scan_at(x, dt, A, B, C, at, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        y = self.norm(y.reshape(batch, -1, self.d_inner), z)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, head_dim={self.head_dim}, d_state={self.d_state}, "
            f"chunk_size={self.chunk_size}, conv_activation={self.activation!r}"
        )


class SSDLayer(nn.Module):
    """TiSSDLayer / SSDLayer of the official code: SSD block -> dropout -> LayerNorm (with the residual only
    when the model has more than one layer) -> FFN (4x, Hardswish by default, its LayerNorm eps 1e-12)."""

    def __init__(
        self,
        d_model: int,
        num_layers: int,
        dropout: float,
        norm_eps: float,
        is_ffn: bool = True,
        ffn_activation: str = "hardswish",
        ffn_norm_eps: float = 1e-12,
        **mixer_options,
    ):
        super().__init__()
        self.residual = num_layers > 1
        self.ssd = SSDMixer(d_model, norm_eps=norm_eps, **mixer_options)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = SSMFeedForward(d_model, 4 * d_model, dropout, ffn_norm_eps, ffn_activation) if is_ffn else None

    def forward(
        self, x: torch.Tensor, dt_modulation: torch.Tensor | None = None, at: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.dropout(self.ssd(x, dt_modulation, at))
        if at is not None:
            x = at_positions(x, at)
        hidden = self.norm(hidden + x if self.residual else hidden)
        return self.ffn(hidden) if self.ffn is not None else hidden


def run_layers(layers: nn.ModuleList, x: torch.Tensor, at: torch.Tensor | None, *per_layer) -> torch.Tensor:
    """x through `layers` (each called with its entry of every `per_layer` list), the last one only at
    positions `at` when given: [batch, hidden] then, else [batch, length, hidden]."""
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        x = layer(x, *(values[index] for values in per_layer), at=at if index == last else None)
    return x if at is None else x.squeeze(1)
