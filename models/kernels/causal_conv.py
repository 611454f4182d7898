"""Depthwise causal 1-D convolution, with the semantics of causal-conv1d's `causal_conv1d_fn`.

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]),   x[..., < 0] = 0

Shapes: x [batch, dim, seqlen]; weight [dim, width]; bias [dim] or None; activation None, "silu" or "swish", or
"hardswish" (the official SSD models' convolution activation when n_heads % 8 != 0; causal-conv1d has no such
option, so on a GPU it follows the kernel, while the C++ twin fuses it like SiLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backends import CPU_BACKEND, gpu_kernel, resolve_backend
from .cpu_extension import cpu_extension, time_major_view

_ACTIVATIONS = (None, "silu", "swish", "hardswish")
# the C++ kernel's activation codes (causal_conv_cpu.cpp, kActivation*)
_CPP_ACTIVATION = {None: 0, "silu": 1, "swish": 1, "hardswish": 2}


def _activate(out, activation):
    if activation == "hardswish":
        return F.hardswish(out)
    return F.silu(out) if activation is not None else out


def _check(x, weight, activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"expected x [batch, dim, seqlen] and weight [dim, width], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )


def causal_conv1d(x, weight, bias=None, activation=None, *, backend: str = "torch"):
    """Causal depthwise convolution on the requested backend ("torch", "cpp", "cuda"/"triton" or "auto")."""
    _check(x, weight, activation)
    chosen = resolve_backend("causal_conv1d", backend, x.device)
    if chosen == "torch":
        return causal_conv1d_torch(x, weight, bias, activation)
    if chosen == CPU_BACKEND:
        return causal_conv1d_cpp(x, weight, bias, activation)
    if activation == "hardswish":  # causal-conv1d fuses SiLU only
        return F.hardswish(gpu_kernel("causal_conv1d")(x, weight, bias, activation=None))
    return gpu_kernel("causal_conv1d")(x, weight, bias, activation=activation)


def causal_conv1d_torch(x, weight, bias=None, activation=None):
    _check(x, weight, activation)
    dim, width = weight.shape
    # Left-only padding by width-1: output t sees inputs t-width+1 .. t and nothing later.
    # Run as a depthwise conv2d over [batch, dim, 1, seqlen] in channels-last memory: the callers' x is a
    # transposed [batch, seqlen, dim] tensor, which is already that layout (no copy), and on CPU oneDNN's
    # channels-last depthwise kernels are about 3x faster forward+backward than grouped conv1d.
    x4 = F.pad(x.unsqueeze(2), (width - 1, 0)).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(x4, weight[:, None, None, :], bias, groups=dim).squeeze(2)
    return _activate(out, activation)


@torch.compiler.disable  # an opaque C++ call: dynamo breaks the graph here anyway, this says so without a warning
def causal_conv1d_cpp(x, weight, bias=None, activation=None):
    """The C++ twin (causal_conv_cpu.cpp, built on first use): CPU tensors, differentiable in x, weight and bias.
    float32 and float64 run in C++; other dtypes run the torch twin."""
    _check(x, weight, activation)
    if x.dtype not in (torch.float32, torch.float64):
        return causal_conv1d_torch(x, weight, bias, activation)
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    # the time-major result, seen as [batch, dim, seqlen]: the view is taken outside the Function, so callers may
    # modify it in place
    return _CausalConv1dCpp.apply(x, weight, bias, _CPP_ACTIVATION[activation]).transpose(1, 2)


class _CausalConv1dCpp(torch.autograd.Function):
    """x [batch, dim, seqlen] handed to the kernel time-major, [batch, seqlen, dim]: the callers' x is a transposed
    view of that layout, used without a copy. Returns the time-major output [batch, seqlen, dim]."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        x_t = time_major_view(x)
        weight_t = weight.t().contiguous()  # [width, dim]: one contiguous vector per tap
        bias = bias.contiguous() if bias is not None else None
        ctx.activation = activation
        ctx.save_for_backward(x_t, weight_t, bias)
        return cpu_extension("causal_conv1d").forward(x_t, weight_t, bias, activation)

    @staticmethod
    @once_differentiable  # the C++ backward is opaque to autograd: no second derivatives
    def backward(ctx, grad_out):
        x_t, weight_t, bias = ctx.saved_tensors
        grad_x, grad_weight_t, grad_bias = cpu_extension("causal_conv1d").backward(
            grad_out.contiguous(), x_t, weight_t, bias, ctx.activation
        )
        return grad_x.transpose(1, 2), grad_weight_t.t(), grad_bias if bias is not None else None, None


def causal_conv1d_reference(x, weight, bias=None, activation=None):
    """Slow, obviously correct oracle: the sum over taps written out. Tests only."""
    _check(x, weight, activation)
    width = weight.shape[1]
    seqlen = x.shape[-1]
    out = x.new_zeros(x.shape) if bias is None else bias[None, :, None].expand(x.shape).clone()
    for k in range(width):
        shift = width - 1 - k  # tap k looks `shift` steps into the past
        if shift < seqlen:
            out[..., shift:] = out[..., shift:] + weight[None, :, k, None] * x[..., : seqlen - shift]
    return _activate(out, activation)
