"""Gated RMSNorm, with the semantics of mamba-ssm's `RMSNormGated` / `rmsnorm_fn` (no bias).

    norm_before_gate=False (Mamba2):  y = rmsnorm(x * silu(z)) * weight
    norm_before_gate=True:            y = rmsnorm(x) * weight * silu(z)

rmsnorm(v) = v / sqrt(mean(v^2) + eps), the mean taken over the last dimension or, with group_size, over each
contiguous group of group_size features of it (Mamba2 uses one group per SSD group, so heads sharing B and C
are normalised together).

On CPU the "cpp" backend (the default there when a C++ compiler is present) runs it in C++, one group at a time
in cache, forward and backward one pass each: `rms_norm_gated_cpp`, rmsnorm_gated_cpu.cpp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .backends import CPU_BACKEND, gpu_kernel, resolve_backend
from .cpu_extension import cpu_extension


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False, *, backend="torch"):
    """Gated RMSNorm over the last dimension of x on the requested backend ("torch", "cpp", "triton"/"cuda",
    "auto")."""
    chosen = resolve_backend("rmsnorm_gated", backend, x.device)
    if chosen == "torch":
        return rms_norm_gated_torch(x, weight, z, eps, group_size, norm_before_gate)
    if chosen == CPU_BACKEND:
        return rms_norm_gated_cpp(x, weight, z, eps, group_size, norm_before_gate)
    return gpu_kernel("rmsnorm_gated")(
        x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate
    )


def _group_size(x: torch.Tensor, group_size: int | None) -> int:
    features = x.shape[-1]
    group_size = features if group_size is None else group_size
    if features % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension {features}")
    return group_size


class _GatedRMSNormCpp(torch.autograd.Function):
    """The C++ twin; the backward pass recomputes the statistics from x and z, so only the inputs are saved."""

    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size, norm_before_gate):
        x, weight = x.contiguous(), weight.contiguous()
        z = None if z is None else z.contiguous()
        ctx.options = (eps, group_size, norm_before_gate)
        ctx.save_for_backward(x, weight, z)
        return cpu_extension("rmsnorm_gated").forward(x, weight, z, eps, group_size, norm_before_gate)

    @staticmethod
    @once_differentiable  # the C++ backward is opaque to autograd: no second derivatives
    def backward(ctx, grad_y):
        x, weight, z = ctx.saved_tensors
        grad_x, grad_weight, grad_z = cpu_extension("rmsnorm_gated").backward(
            grad_y.contiguous(), x, weight, z, *ctx.options
        )
        return grad_x, grad_weight, grad_z if z is not None else None, None, None, None


@torch.compiler.disable  # an opaque C++ call: dynamo breaks the graph here anyway, this says so without a warning
def rms_norm_gated_cpp(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False):
    """The C++ twin (rmsnorm_gated_cpu.cpp, built on first use): CPU tensors, differentiable in x, weight and z."""
    group_size = _group_size(x, group_size)
    out_dtype = x.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in at least float32, as in the torch twin
    z = None if z is None else z.to(dtype)
    y = _GatedRMSNormCpp.apply(x.to(dtype), weight.to(dtype), z, float(eps), group_size, bool(norm_before_gate))
    return y.to(out_dtype)


def rms_norm_gated_torch(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False):
    features = x.shape[-1]
    group_size = _group_size(x, group_size)
    out_dtype = x.dtype
    # Statistics in at least float32, as the Triton kernel accumulates them.
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    gate = None if z is None else F.silu(z.to(dtype))
    if gate is not None and not norm_before_gate:
        x = x * gate
    groups = x.unflatten(-1, (features // group_size, group_size))
    normed = groups * torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + eps)
    y = normed.flatten(-2) * weight.to(dtype)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(out_dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm with an optional SiLU gate; defaults follow Mamba2's use of mamba-ssm's RMSNormGated."""

    def __init__(self, dim, eps=1e-5, group_size=None, norm_before_gate=False, backend="torch"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.backend = backend

    def forward(self, x, z=None):
        return rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate, backend=self.backend)

    def extra_repr(self):
        return (
            f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}, backend={self.backend!r}"
        )
