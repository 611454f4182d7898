"""Dropout on the CPU in one pass forward and one backward (dropout_cpu.cpp), its mask never stored.

torch's CPU dropout (and `models.base.drop_mask`) draws a random tensor, compares it, multiplies and fills:
four passes over memory and a boolean mask kept for the backward pass, which made dropout a sixth of a TiM4Rec
training step. Here each call draws one 64-bit seed from torch's generator (so `torch.manual_seed` still fixes
every mask) and the C++ kernel derives each element's keep bit from (seed, element index) with a counter-based
generator, in the forward pass and again in the backward pass. A seed gives other masks than torch's dropout
(the same distribution: each element dropped independently with probability p, the rest scaled by 1 / (1 - p)).

An activation followed by dropout (the FFNs' up -> act -> dropout) runs as one kernel too (`activated_dropout_cpp`):
act(x) * keep forward, grad * act'(x) * keep backward, from the activation's input, which torch's activation saves
anyway; the same seed gives the same mask as plain dropout. The up projection's bias can be left to it
(act(x + bias), x the product without its bias): the kernel adds it where it reads x, and sums its gradient where it
writes x's, where addmm broadcast it over the product first and its backward summed the gradient in a pass of its
own (at hidden 64, [2048 x 50, 256] products: 16 ms and 8 ms per FFN, against 22 ms for the product itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .cpu_extension import cpu_extension

#: the activations the fused kernel knows, each with its torch twin (what the other backends run)
ACTIVATIONS = {"hardswish": F.hardswish, "gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def _extension():
    return cpu_extension("dropout")


def _seed() -> int:
    """One 64-bit mask seed from torch's generator, so that torch.manual_seed fixes every mask."""
    return int(torch.empty((), dtype=torch.int64).random_())


class _DropoutCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, p):
        ctx.seed, ctx.p = seed, p
        return _extension().apply(x, seed, p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # d out / d x is the same keep factor: the backward pass is the forward map applied to the gradient
        return _extension().apply(grad_out, ctx.seed, ctx.p), None, None


@torch.compiler.disable  # an opaque C++ call: dynamo breaks the graph here anyway, this says so without a warning
def dropout_cpp(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of a CPU tensor with probability p in [0, 1), the mask seeded from torch's generator.
    The output is contiguous, in x's logical element order."""
    return _DropoutCpp.apply(x, _seed(), p)


class _ActivatedDropoutCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, activation, seed, p):
        ctx.save_for_backward(x, bias)
        ctx.activation, ctx.seed, ctx.p = activation, seed, p
        return _extension().activate(x, activation, seed, p, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x, grad_bias = _extension().activate_backward(grad_out, x, ctx.activation, ctx.seed, ctx.p, bias)
        return grad_x, grad_bias, None, None, None


@torch.compiler.disable  # see dropout_cpp
def activated_dropout_cpp(x: torch.Tensor, activation: str, p: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """dropout(activation(x + bias)) in training mode on a CPU tensor, one pass each way; `activation` is a key of
    ACTIVATIONS, p in [0, 1), `bias` (optional) one value per element of x's last axis. The mask is the one
    `dropout_cpp` draws after the same torch seed."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; one of {tuple(ACTIVATIONS)}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
            raise ValueError(f"expected a bias of {x.shape[-1]} values (x's last axis), got {tuple(bias.shape)}")
        bias = bias.to(x.dtype).contiguous()
    return _ActivatedDropoutCpp.apply(x, bias, activation, _seed(), p)


def keep_factors(seed: int, count: int, p: float) -> torch.Tensor:
    """The keep factors (0 or 1 / (1 - p)) of the first `count` elements under `seed`, float32. Tests only."""
    return _extension().keep_factors(seed, count, p)
