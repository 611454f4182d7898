"""Depthwise causal 1-D convolution, with the semantics of causal-conv1d's `causal_conv1d_fn`.

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]),   x[..., < 0] = 0

Shapes: x [batch, dim, seqlen]; weight [dim, width]; bias [dim] or None; activation None, "silu" or "swish", or
"hardswish" (the official SSD models' convolution activation when n_heads % 8 != 0; causal-conv1d has no such
option, so on a GPU it follows the kernel, while the C++ twin fuses it like SiLU).

`input_bias` [dim] (or None) is a bias of x itself, added before the convolution: the result is that of
x + input_bias[:, None], padded with zeros as before. The SSD block's input projection has a bias; handed to the C++
twin this way, it costs no pass over the data (the twin folds it into the convolution's own bias, per step: a
[width, dim] table built each call), where the projection's addmm spent a pass over its output broadcasting it and
its backward another summing its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backends import CPU_BACKEND, gpu_kernel, resolve_backend
from .cpu_extension import cpu_extension

_ACTIVATIONS = (None, "silu", "swish", "hardswish")
# the C++ kernel's activation codes (causal_conv_cpu.cpp, kActivation*)
_CPP_ACTIVATION = {None: 0, "silu": 1, "swish": 1, "hardswish": 2}


def _activate(out, activation):
    if activation == "hardswish":
        return F.hardswish(out)
    return F.silu(out) if activation is not None else out


def _check(x, weight, activation, input_bias=None):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"expected x [batch, dim, seqlen] and weight [dim, width], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if input_bias is not None and tuple(input_bias.shape) != (x.shape[1],):
        raise ValueError(f"expected input_bias [dim] = [{x.shape[1]}], got {tuple(input_bias.shape)}")


def causal_conv1d(x, weight, bias=None, activation=None, *, input_bias=None, backend: str = "torch"):
    """Causal depthwise convolution on the requested backend ("torch", "cpp", "cuda"/"triton" or "auto")."""
    _check(x, weight, activation, input_bias)
    chosen = resolve_backend("causal_conv1d", backend, x.device)
    if chosen == CPU_BACKEND:
        return causal_conv1d_cpp(x, weight, bias, activation, input_bias=input_bias)
    x = _with_input_bias(x, input_bias)
    if chosen == "torch":
        return causal_conv1d_torch(x, weight, bias, activation)
    if activation == "hardswish":  # causal-conv1d fuses SiLU only
        return F.hardswish(gpu_kernel("causal_conv1d")(x, weight, bias, activation=None))
    return gpu_kernel("causal_conv1d")(x, weight, bias, activation=activation)


def _with_input_bias(x, input_bias):
    return x if input_bias is None else x + input_bias.to(x.dtype)[:, None]


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


#: from this many channels the C++ kernel runs over channels (time-major, x a transposed view of [batch, seqlen,
#: dim]); fewer channels, or x in another layout, run along time: a vector over 4 channels would be mostly empty
#: (TiM4Rec's time path, one channel per head: 2048 x 4 x 50 took 2.0 ms forward and 4.9 ms backward time-major,
#: 0.3 ms and 2.1 ms along time)
_TIME_MAJOR_MIN_CHANNELS = 8


@torch.compiler.disable  # an opaque C++ call: dynamo breaks the graph here anyway, this says so without a warning
def causal_conv1d_cpp(x, weight, bias=None, activation=None, *, input_bias=None):
    """The C++ twin (causal_conv_cpu.cpp, built on first use): CPU tensors, differentiable in x, weight, bias and
    input_bias. float32 and float64 run in C++; other dtypes run the torch twin."""
    _check(x, weight, activation, input_bias)
    if x.dtype not in (torch.float32, torch.float64):
        return causal_conv1d_torch(_with_input_bias(x, input_bias), weight, bias, activation)
    weight = weight.to(x.dtype)
    time_major = x.shape[1] >= _TIME_MAJOR_MIN_CHANNELS and x.stride(1) == 1
    start = _steps_start(weight, bias, input_bias)
    out = _CausalConv1dCpp.apply(x, weight, start, _CPP_ACTIVATION[activation], time_major)
    # the time-major result seen as [batch, dim, seqlen]: the view is taken outside the Function, so callers may
    # modify it in place
    return out.transpose(1, 2) if time_major else out


def _steps_start(weight, bias, input_bias):
    """[width, dim]: what each step's pre-activation starts from before the taps over x, the C++ kernel's `start`.
    Row j holds the bias plus input_bias times the last j + 1 taps (step j < width - 1 reads only those taps of
    the input; the padding before it carries no input bias), the last row applies to every later step. Built with
    torch ops, so autograd carries its gradient on to bias, input_bias and the weight."""
    width = weight.shape[1]
    start = weight.new_zeros(width, weight.shape[0])
    if bias is not None:
        start = start + bias.to(weight.dtype)
    if input_bias is not None:
        taps_reached = weight.flip(1).cumsum(1).t()  # [width, dim]: row j sums the last j + 1 taps
        start = start + input_bias.to(weight.dtype) * taps_reached
    return start.contiguous()


class _CausalConv1dCpp(torch.autograd.Function):
    """x [batch, dim, seqlen] read where it lies. Time-major: the kernel reads it as the [batch, seqlen, dim] tensor it
    is a transposed view of (the SSD and Mamba blocks' layout, no copy) and returns [batch, seqlen, dim]. Otherwise it
    runs along time through x's strides and returns [batch, dim, seqlen]."""

    @staticmethod
    def forward(ctx, x, weight, start, activation, time_major):
        x_read = x.transpose(1, 2) if time_major else x
        weight_t = weight.t().contiguous()  # [width, dim]: one contiguous vector per tap
        ctx.activation, ctx.time_major = activation, time_major
        ctx.save_for_backward(x_read, weight_t, start)
        kernel = cpu_extension("causal_conv1d")
        return (kernel.forward if time_major else kernel.forward_along_time)(x_read, weight_t, start, activation)

    @staticmethod
    @once_differentiable  # the C++ backward is opaque to autograd: no second derivatives
    def backward(ctx, grad_out):
        x_read, weight_t, start = ctx.saved_tensors
        kernel = cpu_extension("causal_conv1d")
        grad_x, grad_weight_t, grad_start = (kernel.backward if ctx.time_major else kernel.backward_along_time)(
            grad_out.contiguous(), x_read, weight_t, start, ctx.activation
        )
        grad_x = grad_x.transpose(1, 2) if ctx.time_major else grad_x
        return grad_x, grad_weight_t.t(), grad_start, None, None


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
