"""SSD (Mamba2) scan, with the semantics of mamba-ssm's `mamba_chunk_scan_combined`.

Per head h (scalar decay A_h < 0) and group g(h) = h // (nheads / ngroups), with dt already biased/softplus'd:

    H_t = exp(dt_t A) H_{t-1} + dt_t * x_t B_t^T            H: [headdim, dstate], H_{-1} = 0
    y_t = H_t C_t + D * x_t,      then y_t * silu(z_t) when a gate z is given.

Shapes: x, z [batch, seqlen, nheads, headdim]; dt [batch, seqlen, nheads]; A, dt_bias [nheads];
B, C [batch, seqlen, ngroups, dstate]; D [nheads] or [nheads, headdim].

Because the decay is a scalar per head and step, the scan is a masked attention-like product inside a chunk
and a short recurrence over chunk states between chunks (the SSD block decomposition): the torch backend does
exactly that with batched matrix products, and plain autograd differentiates it.

On CPU the "cpp" backend (the default there when a C++ compiler is present) runs the plain recurrence in C++,
one (row, head) state at a time in cache: `ssd_scan_cpp`, ssd_scan_cpu.cpp. It is exact for any chunk size, so it
ignores chunk_size: a chunk-size comparison on CPU asks for the torch backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backends import CPU_BACKEND, gpu_kernel, resolve_backend
from .cpu_extension import cpu_extension


def ssd_scan(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, backend: str = "torch"):
    """SSD scan on the requested backend ("torch", "cpp", "triton"/"cuda" or "auto"); returns y like x."""
    chosen = resolve_backend("ssd_scan", backend, x.device)
    options = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    if chosen == "torch":
        return ssd_scan_torch(x, dt, A, B, C, **options)
    if chosen == CPU_BACKEND:
        return ssd_scan_cpp(x, dt, A, B, C, **options)
    return gpu_kernel("ssd_scan")(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus):
    batch, seqlen, nheads, headdim = x.shape
    if dt.shape != (batch, seqlen, nheads) or A.shape != (nheads,):
        raise ValueError(
            f"dt must be {(batch, seqlen, nheads)} and A {(nheads,)}, got {tuple(dt.shape)} and {tuple(A.shape)}"
        )
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen) or C.shape != B.shape:
        raise ValueError(f"B and C must be [batch, seqlen, ngroups, dstate], got {tuple(B.shape)}, {tuple(C.shape)}")
    if nheads % B.shape[2]:
        raise ValueError(f"ngroups={B.shape[2]} must divide nheads={nheads}")
    # Half-precision inputs are scanned in float32, like the Triton kernels' accumulators.
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return x, dt, A, B, C


def _finish(y, x, D, z, out_dtype):
    if D is not None:
        D = D.to(y.dtype)
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _segment_sum(a):
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j (0 on the diagonal), -inf above it.

    Summing masked copies is exact, unlike differences of one long cumulative sum, which lose precision when
    the running total is large; exp(out) is the decay from step j to step i and 0 where j is in the future.
    """
    size = a.shape[-1]
    ones = torch.ones(size, size, dtype=torch.bool, device=a.device)
    # `where` broadcasts a [..., l, 1] against the [l, s] mask in one pass (no expanded copy, no clone)
    spans = torch.where(torch.tril(ones, -1), a.unsqueeze(-1), a.new_zeros(()))
    return torch.where(torch.tril(ones), torch.cumsum(spans, dim=-2), a.new_full((), float("-inf")))


def ssd_scan_torch(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The chunked SSD scan in torch: exact for any chunk_size, differentiable by autograd."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dtype = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    per_group = nheads // ngroups

    # The decomposition is exact for any chunk length, so keep the number of chunks chunk_size asks for
    # but spread the steps evenly over them: a batch trimmed to 7 steps scans one chunk of 7, not 32,
    # and 50 steps with chunk_size 32 scan two chunks of 25 instead of padding to 64.
    nchunks = -(-seqlen // chunk_size)
    chunk_size = -(-seqlen // nchunks)
    # Zero-pad to whole chunks: a padded step has dt = 0 (no decay, no input) and comes after every real
    # step, so by causality it cannot change a real output; its own outputs are sliced away.
    pad = -seqlen % chunk_size
    xp, dtp, Bp, Cp = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nchunks = (seqlen + pad) // chunk_size
    # Heads are split as (group, head-in-group) so B and C are shared across a group without copies.
    xc = xp.view(batch, nchunks, chunk_size, ngroups, per_group, headdim)
    dtc = dtp.view(batch, nchunks, chunk_size, ngroups, per_group)
    Bc = Bp.view(batch, nchunks, chunk_size, ngroups, dstate)
    Cc = Cp.view(batch, nchunks, chunk_size, ngroups, dstate)

    log_decay = (dtc * A.view(ngroups, per_group)).permute(0, 1, 3, 4, 2)  # [b, c, g, r, l]
    decay_matrix = torch.exp(_segment_sum(log_decay))  # [b, c, g, r, l, s]: decay from step s to step l
    decay_from_start = torch.exp(torch.cumsum(log_decay, dim=-1))  # from the chunk's start to step l
    decay_to_end = decay_matrix[..., -1, :]  # from step s to the chunk's end
    inputs = xc * dtc.unsqueeze(-1)  # dt_s x_s: [b, c, s, g, r, p]

    # 1. Within a chunk: y_l = sum_{s<=l} (C_l . B_s) decay(s->l) dt_s x_s, a masked attention product.
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc).unsqueeze(3) * decay_matrix
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores, inputs)

    # The first chunk starts from the zero state and the last one's state is never read, so steps 2-4 run
    # only with several chunks and only where they contribute (a batch of short sequences is one chunk).
    if nchunks > 1:
        # 2. The state each chunk but the last leaves behind from its own inputs:
        #    sum_s decay(s->end) dt_s x_s B_s^T.
        own_states = torch.einsum(
            "bcsgn,bcgrs,bcsgrp->bcgrpn", Bc[:, :-1], decay_to_end[:, :-1], inputs[:, :-1]
        ).unbind(1)
        # 3. The state entering chunk c+1: H_c = exp(sum of chunk c's log-decays) H_{c-1} + own_states_c.
        # (unbind, not indexing: the backward of each index op would zero-fill a full-size gradient.)
        chunk_decay = decay_from_start[:, 1:-1, ..., -1, None, None].unbind(1)  # chunks 1..n-2: [b, g, r, 1, 1]
        entering = [own_states[0]]
        for c in range(1, nchunks - 1):
            entering.append(entering[-1] * chunk_decay[c - 1] + own_states[c])
        incoming = torch.stack(entering, dim=1)  # entering chunks 1..n-1: [b, c-1, g, r, p, n]

        # 4. What the incoming state contributes at each step: decay(start->l) * (H_in C_l).
        y[:, 1:] += torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", Cc[:, 1:], incoming, decay_from_start[:, 1:])

    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    return _finish(y, x, D, z, out_dtype)


def _unpack(xBC, nheads, ngroups, dstate):
    """The column blocks [x | B | C] of xBC [batch, seqlen, nheads * headdim + 2 * ngroups * dstate] as views:
    x [batch, seqlen, nheads, headdim], B and C [batch, seqlen, ngroups, dstate]."""
    width = xBC.shape[-1] - 2 * ngroups * dstate
    if width <= 0 or width % nheads:
        raise ValueError(
            f"xBC's {xBC.shape[-1]} columns do not hold x for {nheads} heads and B, C of {ngroups} x {dstate}"
        )
    x, B, C = xBC.split([width, ngroups * dstate, ngroups * dstate], dim=-1)
    return (
        x.unflatten(-1, (nheads, width // nheads)),
        B.unflatten(-1, (ngroups, dstate)),
        C.unflatten(-1, (ngroups, dstate)),
    )


def _channel_skip(D, nheads, headdim, like):
    """D as one value per channel, [nheads, headdim] (zeros without a skip): what the C++ scan adds as D x."""
    if D is None:
        return like.new_zeros(nheads, headdim)
    D = D.to(like.dtype)
    return (D[:, None] if D.dim() == 1 else D).expand(nheads, headdim).contiguous()


class _SSDScanCpp(torch.autograd.Function):
    """y = scan(x, step, A, B, C) + D x on the C++ twin, y [batch, seqlen, nheads, headdim], with the step (dt after
    bias and softplus) [batch, seqlen, nheads] and D one value per channel. x, B and C come as three tensors, or
    packed (`packed` = (nheads, ngroups, dstate), B and C None) as the column blocks of one xBC, which the kernel
    reads in place and whose gradient it writes as one tensor: no split forwards, no join backwards. The kernel's
    backward recomputes the states, so only the inputs are saved."""

    @staticmethod
    def forward(ctx, x, step, A, D, B, C, packed):
        ctx.packed = packed
        if packed:  # contiguous (as the convolution's output is), so that the gradient gets the same strides
            x = x.contiguous()
            scanned = _unpack(x, *packed)
        else:
            x, B, C = scanned = tuple(t.contiguous() for t in (x, B, C))
        step, A = step.contiguous(), A.contiguous()
        ctx.save_for_backward(x, step, A, D, B, C)
        return cpu_extension("ssd_scan").forward(scanned[0], step, A, scanned[1], scanned[2], D)

    @staticmethod
    @once_differentiable  # the C++ backward is opaque to autograd: no second derivatives
    def backward(ctx, grad_y):
        x, step, A, D, B, C = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        if ctx.packed:
            scanned, grads = _unpack(x, *ctx.packed), _unpack(grad_x, *ctx.packed)
        else:
            scanned, grads = (x, B, C), (grad_x, torch.empty_like(B), torch.empty_like(C))
        grad_step, grad_A, grad_D = cpu_extension("ssd_scan").backward(
            grad_y.contiguous(), scanned[0], step, A, scanned[1], scanned[2], D, *grads
        )
        if ctx.packed:
            return grad_x, grad_step, grad_A, grad_D, None, None, None
        return grad_x, grad_step, grad_A, grad_D, grads[1], grads[2], None


@torch.compiler.disable  # an opaque C++ call: dynamo breaks the graph here anyway, this says so without a warning
def ssd_scan_cpp(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The C++ twin (ssd_scan_cpu.cpp, built on first use): CPU tensors, differentiable in every tensor. Exact for
    any chunk_size, which is checked and otherwise ignored."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dtype = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    skip = _channel_skip(D, x.shape[2], x.shape[3], x)
    return _finish(_SSDScanCpp.apply(x, dt, A, skip, B, C, None), x, None, z, out_dtype)


def ssd_scan_packed(
    xBC, dt, A, *, nheads, ngroups, dstate, chunk_size, D=None, dt_bias=None, dt_softplus=False, backend="torch"
):
    """`ssd_scan` of x, B and C packed as the column blocks [x | B | C] of xBC [batch, seqlen, nheads * headdim +
    2 * ngroups * dstate] (an SSD block's convolved projection); y [batch, seqlen, nheads, headdim]. On the C++ twin
    the blocks are read in place and their gradients written into one tensor (the split's backward would join
    three into a fresh copy, and the scan would copy x, B and C to make them contiguous: about 5% of a TiM4Rec
    training step at hidden 64); elsewhere xBC is split and scanned by `ssd_scan`."""
    chosen = resolve_backend("ssd_scan", backend, xBC.device)
    x, B, C = _unpack(xBC, nheads, ngroups, dstate)
    if chosen != CPU_BACKEND or xBC.dtype not in (torch.float32, torch.float64):
        return ssd_scan(
            x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, backend=chosen
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _ssd_scan_packed_cpp(xBC, dt, A, (nheads, ngroups, dstate), D, dt_bias, dt_softplus)


@torch.compiler.disable  # as ssd_scan_cpp
def _ssd_scan_packed_cpp(xBC, dt, A, packed, D, dt_bias, dt_softplus):
    x, B, C = _unpack(xBC, *packed)
    _, dt, A, _, _ = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)  # checks the shapes; x, B, C keep their dtype
    return _SSDScanCpp.apply(xBC, dt, A, _channel_skip(D, packed[0], x.shape[3], xBC), None, None, packed)


def ssd_scan_at(x, dt, A, B, C, at, *, D=None, dt_bias=None, dt_softplus=False):
    """The scan's output at one position T = at[b] per row, [batch, nheads, headdim], on any device.

    y_T = sum_{s<=T} (C_T . B_s) exp(sum_{s<r<=T} dt_r A) dt_s x_s + D x_T: linear in the length, where the
    chunked form is quadratic within a chunk, and what a causal model's last layer needs when only one
    position is read (prefix training, evaluation). Same sums as `ssd_scan`, so equal to float rounding;
    every decay exponent is a cumulative sum of masked terms (no differences of long sums). No gate z.
    """
    out_dtype = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    reached = torch.arange(seqlen, device=x.device) <= at[:, None]  # [b, s]: s <= T
    log_decay = (dt * A).masked_fill(~reached[..., None], 0.0)  # [b, s, h], 0 after T
    # after[s] = sum_{r>s} log_decay[r]: the reversed cumulative sum of the sequence shifted by one step
    following = F.pad(log_decay[:, 1:], (0, 0, 0, 1))
    after = following.flip(1).cumsum(1).flip(1)
    weights = (torch.exp(after) * dt).masked_fill(~reached[..., None], 0.0)  # decay(s->T) dt_s
    C_T = C.gather(1, at.view(-1, 1, 1, 1).expand(-1, 1, *C.shape[2:])).squeeze(1)  # [b, g, n]
    overlap = torch.einsum("bgn,bsgn->bsg", C_T, B)  # C_T . B_s
    coefficients = weights.view(batch, seqlen, ngroups, -1) * overlap.unsqueeze(-1)
    y = torch.einsum("bsh,bshp->bhp", coefficients.view(batch, seqlen, nheads), x)
    if D is not None:
        x_T = x.gather(1, at.view(-1, 1, 1, 1).expand(-1, 1, nheads, headdim)).squeeze(1)
        D = D.to(y.dtype)
        y = y + x_T * (D[:, None] if D.dim() == 1 else D)
    return y.to(out_dtype)


def ssd_scan_reference(x, dt, A, B, C, *, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Slow, obviously correct oracle: the per-step recurrence. chunk_size is accepted and ignored. Tests only."""
    out_dtype = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    batch, seqlen, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    B = B.repeat_interleave(per_group, dim=2)  # [b, l, h, n]
    C = C.repeat_interleave(per_group, dim=2)
    state = x.new_zeros(batch, nheads, headdim, B.shape[-1])
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1))
    return _finish(torch.stack(ys, dim=1), x, D, z, out_dtype)
