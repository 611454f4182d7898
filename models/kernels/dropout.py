"""Dropout on the CPU in one pass forward and one backward (dropout_cpu.cpp), its mask never stored.

torch's CPU dropout (and `models.base.drop_mask`) draws a random tensor, compares it, multiplies and fills:
four passes over memory and a boolean mask kept for the backward pass, which made dropout a sixth of a TiM4Rec
training step. Here each call draws one 64-bit seed from torch's generator (so `torch.manual_seed` still fixes
every mask) and the C++ kernel derives each element's keep bit from (seed, element index) with a counter-based
generator, in the forward pass and again in the backward pass. A seed gives other masks than torch's dropout
(the same distribution: each element dropped independently with probability p, the rest scaled by 1 / (1 - p)).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .cpu_extension import cpu_extension


def _extension():
    return cpu_extension("dropout")


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
    seed = int(torch.empty((), dtype=torch.int64).random_())
    return _DropoutCpp.apply(x, seed, p)


def keep_factors(seed: int, count: int, p: float) -> torch.Tensor:
    """The keep factors (0 or 1 / (1 - p)) of the first `count` elements under `seed`, float32. Tests only."""
    return _extension().keep_factors(seed, count, p)
