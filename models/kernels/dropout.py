"""Dropout on the CPU in one pass forward and one backward (dropout_cpu.cpp), its mask never stored.

torch's CPU dropout (and `models.base.drop_mask`) draws a random tensor, compares it, multiplies and fills:
four passes over memory and a boolean mask kept for the backward pass, which made dropout a sixth of a TiM4Rec
training step. Here each call draws one 64-bit seed from torch's generator (so `torch.manual_seed` still fixes
every mask) and the C++ kernel derives each element's keep bit from (seed, element index) with a counter-based
generator, in the forward pass and again in the backward pass. A seed gives other masks than torch's dropout
(the same distribution: each element dropped independently with probability p, the rest scaled by 1 / (1 - p)).

An activation followed by dropout (the FFNs' up -> act -> dropout) runs as one kernel too (`activated_dropout_cpp`):
act(x) * keep forward, grad * act'(x) * keep backward, from the activation's input, which torch's activation saves
anyway; the same seed gives the same mask as plain dropout.
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
    def forward(ctx, x, activation, seed, p):
        ctx.save_for_backward(x)
        ctx.activation, ctx.seed, ctx.p = activation, seed, p
        return _extension().activate(x, activation, seed, p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return _extension().activate_backward(grad_out, x, ctx.activation, ctx.seed, ctx.p), None, None, None


@torch.compiler.disable  # see dropout_cpp
def activated_dropout_cpp(x: torch.Tensor, activation: str, p: float) -> torch.Tensor:
    """dropout(activation(x)) in training mode on a CPU tensor, one pass each way; `activation` is a key of
    ACTIVATIONS, p in [0, 1). The mask is the one `dropout_cpp` draws after the same torch seed."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; one of {tuple(ACTIVATIONS)}")
    return _ActivatedDropoutCpp.apply(x, activation, _seed(), p)


def keep_factors(seed: int, count: int, p: float) -> torch.Tensor:
    """The keep factors (0 or 1 / (1 - p)) of the first `count` elements under `seed`, float32. Tests only."""
    return _extension().keep_factors(seed, count, p)
