"""Mamba1 selective scan, with the semantics of mamba-ssm's `selective_scan_fn`.

For every batch row b, channel d and state n, with a real diagonal A:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        (h_{-1} = 0)
    y_t = sum_n C_t * h_t  +  D * u_t,      then y_t * silu(z_t) when a gate z is given.

Shapes: u, delta, z [batch, dim, seqlen]; A [dim, dstate]; B, C [batch, dstate, seqlen]; D, delta_bias [dim].

The torch backend is a custom autograd function. A Python loop over time with autograd would record a graph
node per step for tensors of size batch*dim*dstate, and store every state; instead the forward pass runs the
recurrence in place without a graph and keeps one state every `_SEGMENT` steps, and the backward pass recomputes
a segment's states from its checkpoint and runs the adjoint recurrence backwards in time by hand. Work is done
in blocks of `_BLOCK` steps, and on a single CPU thread in blocks of batch rows small enough that a block's
state stays in cache for the whole time loop (rows are independent; at batch 2048 one step's state is 32 MiB,
so without the row blocks every elementwise step streams from memory). Every reduction over the dim or state axis is a
batched matrix product.

On CPU the "cpp" backend (the default there when a C++ compiler is present) runs the same scan in C++ with the
states in the L1 cache, the forward pass 16 channels of a row at a time (one vector lane each), the backward pass
one channel at a time along the state axis: `selective_scan_cpp`, selective_scan_cpu.cpp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backends import CPU_BACKEND, gpu_kernel, resolve_backend
from .cpu_extension import cpu_extension, time_major_view, unit_channel_stride

# Steps per block: the per-step state is batch*dim*dstate (2 MiB at 128x128x32 in float32); a few steps keep
# the block's buffers cache-resident while making the Python overhead per step negligible.
_BLOCK = 2
# Steps between saved states: memory for checkpoints is seqlen/_SEGMENT states, the backward recomputation
# buffer is _SEGMENT states. Must be a multiple of _BLOCK.
_SEGMENT = 16
# Bytes of state per row block on CPU with one torch thread: the block's state buffers (states, decay,
# adjoint) then stay in the core's L2 cache (1-2 MiB on current x86 cores).
_ROW_BLOCK_BYTES = 1 << 20


def _row_blocks(batch: int, dim: int, dstate: int, like: torch.Tensor) -> list[tuple[int, int]]:
    """[r0, r1) row ranges. Row blocks only on CPU with one thread (a study worker's setting): there they
    make the scan 1.3x faster at batch 2048; with several threads the small per-block operations parallelise
    badly and the whole batch at once is faster (`harness bench-kernels --batch 2048`, torch vs "one row
    block"). On GPU the whole batch runs in parallel."""
    if like.device.type != "cpu" or torch.get_num_threads() > 1:
        return [(0, batch)]
    rows = max(1, _ROW_BLOCK_BYTES // (dim * dstate * like.element_size()))
    return [(r0, min(batch, r0 + rows)) for r0 in range(0, batch, rows)]


def _rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1-1 of a time-major [seqlen, batch, ...] tensor, contiguous (no copy when it is all of them)."""
    return t[:, r0:r1].contiguous()


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, backend: str = "torch"):
    """Selective scan on the requested backend ("torch", "cpp", "cuda"/"triton" or "auto"); returns y [batch, dim,
    seqlen]."""
    chosen = resolve_backend("selective_scan", backend, u.device)
    if chosen == "torch":
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chosen == CPU_BACKEND:
        return selective_scan_cpp(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return gpu_kernel("selective_scan")(  # mamba-ssm's layout: B and C [batch, dstate, seqlen] contiguous
        u, delta, A, B.contiguous(), C.contiguous(), D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus
    )


def _check_shapes(u, delta, A, B, C):
    batch, dim, seqlen = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be a real [dim, dstate] tensor with dim={dim}, got {tuple(A.shape)} {A.dtype}")
    expected = (batch, A.shape[1], seqlen)
    for name, t in (("B", B), ("C", C)):
        if t.shape != expected:
            raise ValueError(f"{name} must be [batch, dstate, seqlen] = {expected}, got {tuple(t.shape)}")


def _promote(*tensors):
    # Half-precision inputs are scanned in float32 (as mamba-ssm does); float64 stays float64 for gradcheck.
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [None if t is None else t.to(dtype) for t in tensors]


def _finish(y, u, D, z, out_dtype):
    """The parts outside the recurrence: skip connection D*u and the SiLU gate."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The fast CPU twin of `selective_scan_fn`; differentiable in every tensor argument."""
    _check_shapes(u, delta, A, B, C)
    out_dtype = u.dtype
    u, delta, A, B, C, delta_bias = _promote(u, delta, A, B, C, delta_bias)
    core_inputs = (u, delta, A, B, C, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in core_inputs):
        y = _SelectiveScanCore.apply(*core_inputs, bool(delta_softplus))
    else:
        u_t, B_t, C_t = _time_major(u, B, C)
        delta_t = _step_sizes(_private_time_major(delta), delta_bias, delta_softplus)
        y, _ = _scan_forward_rows(delta_t, delta_t * u_t, A.contiguous(), B_t, C_t, keep_checkpoints=False)
        y = y.permute(1, 2, 0)
    return _finish(y, u, D, z, out_dtype)


@torch.compiler.disable  # an opaque C++ call: dynamo breaks the graph here anyway, this says so without a warning
def selective_scan_cpp(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The C++ twin (selective_scan_cpu.cpp, built on first use): CPU tensors, differentiable in every tensor.
    The step sizes' bias and softplus, the skip D*u and the gate run inside the kernel."""
    _check_shapes(u, delta, A, B, C)
    out_dtype = u.dtype
    u, delta, A, B, C, D, z, delta_bias = _promote(u, delta, A, B, C, D, z, delta_bias)
    # the [batch, seqlen, dim] result, seen as [batch, dim, seqlen]: the view is taken outside the Function, so
    # callers may modify it in place
    y = _SelectiveScanCpp.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return y.transpose(1, 2).to(out_dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Slow, obviously correct oracle: the recurrence one step at a time with plain autograd. Tests only."""
    _check_shapes(u, delta, A, B, C)
    out_dtype = u.dtype
    u, delta, A, B, C, delta_bias = _promote(u, delta, A, B, C, delta_bias)
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seqlen = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(seqlen):
        decay = torch.exp(delta[:, :, t, None] * A)
        h = decay * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return _finish(torch.stack(ys, dim=-1), u, D, z, out_dtype)


# ----------------------------------------------------------------------------------------------------------
# The hand-written forward and backward of the core scan y_t = C_t . h_t, h_t = exp(delta_t A) h_{t-1} + x_t B_t
# (x = delta*u). Internally everything is time-major, [seqlen, batch, ...], so one step is a contiguous slice;
# the layout change, the step-size transform and x = delta*u happen inside the function, on tensors it owns,
# so that autograd records no extra full-size intermediates around it.


def _time_major(*tensors):
    """[batch, dim|dstate, seqlen] -> contiguous [seqlen, batch, dim|dstate]."""
    return [t.permute(2, 0, 1).contiguous() for t in tensors]


def _private_time_major(t):
    """Like _time_major, but always a fresh copy, even when the permuted input happens to be contiguous."""
    return t.permute(2, 0, 1).clone(memory_format=torch.contiguous_format)


def _step_sizes(delta_t, delta_bias, softplus):
    """delta <- softplus(delta + bias); in place, so delta_t must be a private copy (see _private_time_major)."""
    if delta_bias is not None:
        delta_t += delta_bias
    if softplus:
        delta_t = F.softplus(delta_t)
    return delta_t


def _through_step_sizes(grad_step, step, softplus):
    """The gradient with respect to delta + bias from the one with respect to the step size (in place)."""
    if softplus:
        # softplus'(r) = sigmoid(r) = 1 - exp(-softplus(r)), from the saved output.
        grad_step.mul_(torch.expm1(-step).neg_())
    return grad_step


def _advance(delta, x, A, B, t0, t1, prev, states, decay):
    """Run steps t0..t1-1 from prev = h_{t0-1}: fills states with h_t0..h_{t1-1} and decay with exp(delta A).

    prev may alias states[-1] of the previous block: step 0 reads it before anything overwrites it.
    """
    torch.mul(delta[t0:t1, :, :, None], A, out=decay)
    decay.exp_()
    for i in range(t1 - t0):
        torch.mul(prev if i == 0 else states[i - 1], decay[i], out=states[i])
        states[i].addcmul_(x[t0 + i].unsqueeze(-1), B[t0 + i].unsqueeze(1))


def _contract_state(vectors, matrices, out=None):
    """out[r, j] = sum_n vectors[r, n] * matrices[r, j, n] as one batched product.

    A matrix-vector product over the short state axis is about 1.3x slower in MKL than the same product
    written vector-times-transposed-matrix, so the reductions over dstate are phrased this way.
    """
    rows, width, _ = matrices.shape
    return torch.bmm(
        vectors.unsqueeze(1), matrices.transpose(1, 2), out=None if out is None else out.view(rows, 1, width)
    )


def _scan_forward_rows(delta, x, A, B, C, keep_checkpoints):
    """_scan_forward one row block at a time (see _row_blocks); same results."""
    seqlen, batch, dim = x.shape
    blocks = _row_blocks(batch, dim, A.shape[1], x)
    if len(blocks) == 1:
        return _scan_forward(delta, x, A, B, C, keep_checkpoints)
    y = x.new_empty(seqlen, batch, dim)
    checkpoints = x.new_empty(-(-seqlen // _SEGMENT), batch, dim, A.shape[1]) if keep_checkpoints else None
    for r0, r1 in blocks:
        y_rows, checkpoints_rows = _scan_forward(
            _rows(delta, r0, r1), _rows(x, r0, r1), A, _rows(B, r0, r1), _rows(C, r0, r1), keep_checkpoints
        )
        y[:, r0:r1] = y_rows
        if keep_checkpoints:
            checkpoints[:, r0:r1] = checkpoints_rows
    return y, checkpoints


def _scan_backward_rows(grad_y, delta, x, A, B, C, checkpoints, needs):
    """_scan_backward one row block at a time; dA sums over the blocks."""
    seqlen, batch, dim = x.shape
    blocks = _row_blocks(batch, dim, A.shape[1], x)
    if len(blocks) == 1:
        return _scan_backward(grad_y, delta, x, A, B, C, checkpoints, needs)
    grads = [None] * 5
    for r0, r1 in blocks:
        parts = _scan_backward(
            _rows(grad_y, r0, r1),
            _rows(delta, r0, r1),
            _rows(x, r0, r1),
            A,
            _rows(B, r0, r1),
            _rows(C, r0, r1),
            checkpoints[:, r0:r1],
            needs,
        )
        for i, part in enumerate(parts):
            if part is None:
                continue
            if i == 2:  # dA: a sum over rows
                grads[i] = part if grads[i] is None else grads[i].add_(part)
            else:
                if grads[i] is None:
                    grads[i] = part.new_empty(seqlen, batch, part.shape[2])
                grads[i][:, r0:r1] = part
    return tuple(grads)


def _scan_forward(delta, x, A, B, C, keep_checkpoints):
    """Returns y [seqlen, batch, dim] and, if asked, the states h_{s-1} at every segment start s."""
    seqlen, batch, dim = x.shape
    dstate = A.shape[1]
    y = x.new_empty(seqlen, batch, dim)
    checkpoints = None
    if keep_checkpoints:
        checkpoints = x.new_empty(-(-seqlen // _SEGMENT), batch, dim, dstate)
    states = x.new_empty(_BLOCK, batch, dim, dstate)
    decay = x.new_empty(_BLOCK, batch, dim, dstate)
    prev = x.new_zeros(batch, dim, dstate)  # h_{t0-1}; later a view of the previous block's last state
    for t0 in range(0, seqlen, _BLOCK):
        t1 = min(seqlen, t0 + _BLOCK)
        k = t1 - t0
        if checkpoints is not None and t0 % _SEGMENT == 0:
            checkpoints[t0 // _SEGMENT].copy_(prev)
        _advance(delta, x, A, B, t0, t1, prev, states[:k], decay[:k])
        # y_t = h_t . C_t for every step of the block in one batched product.
        _contract_state(C[t0:t1].view(k * batch, dstate), states[:k].view(k * batch, dim, dstate), out=y[t0:t1])
        prev = states[k - 1]
    return y, checkpoints


def _scan_backward(grad_y, delta, x, A, B, C, checkpoints, needs):
    """Adjoint recurrence, backwards in time; delta here is the step size after bias and softplus.

    With lam_t = dL/dh_t = g_t C_t + exp(delta_{t+1} A) lam_{t+1}:
      dx_t = lam_t . B_t,  dB_t = x_t . lam_t,  dC_t = g_t . h_t,
    and the gradient of the log-decay a_t = delta_t A is v_t = lam_t * exp(a_t) * h_{t-1}, which gives
      d delta_t = v_t . A   and   dA = sum_t,b delta_t v_t.
    """
    seqlen, batch, dim = x.shape
    dstate = A.shape[1]
    need_delta, need_x, need_A, need_B, need_C = needs
    grad_delta = x.new_empty(seqlen, batch, dim) if need_delta else None
    grad_x = x.new_empty(seqlen, batch, dim) if need_x else None
    grad_B = x.new_empty(seqlen, batch, dstate) if need_B else None
    grad_C = x.new_empty(seqlen, batch, dstate) if need_C else None
    grad_A = x.new_zeros(dim, 1, dstate) if need_A else None

    seg_states = x.new_empty(_SEGMENT + 1, batch, dim, dstate)
    seg_decay = x.new_empty(_SEGMENT, batch, dim, dstate)
    adjoint = x.new_empty(_BLOCK, batch, dim, dstate)  # lam_t
    decayed_adjoint = x.new_empty(_BLOCK, batch, dim, dstate)  # exp(a_t) lam_t: feeds lam_{t-1} and v_t
    log_decay_grad = x.new_empty(dim * _BLOCK * batch * dstate)  # v_t, dim-major
    # exp(a_{t1}) lam_{t1} from the block after the current one: a view of decayed_adjoint[0], read by the next
    # block's first operation before that buffer is overwritten.
    carry = x.new_zeros(batch, dim, dstate)

    for seg in reversed(range(checkpoints.shape[0])):
        s0, s1 = seg * _SEGMENT, min(seqlen, (seg + 1) * _SEGMENT)
        seg_states[0].copy_(checkpoints[seg])  # so that h_{t-1} of every step in the segment is contiguous
        _advance(delta, x, A, B, s0, s1, seg_states[0], seg_states[1 : s1 - s0 + 1], seg_decay[: s1 - s0])
        for t0 in reversed(range(s0, s1, _BLOCK)):
            t1 = min(s1, t0 + _BLOCK)
            k, rows = t1 - t0, (t1 - t0) * batch
            decay = seg_decay[t0 - s0 : t1 - s0]
            states = seg_states[t0 - s0 : t1 - s0 + 1]  # states[i] = h_{t0+i-1}
            lam, decayed = adjoint[:k], decayed_adjoint[:k]
            torch.addcmul(carry, grad_y[t1 - 1].unsqueeze(-1), C[t1 - 1].unsqueeze(1), out=lam[k - 1])
            for i in range(k - 1, -1, -1):
                torch.mul(lam[i], decay[i], out=decayed[i])
                if i:
                    torch.addcmul(
                        decayed[i], grad_y[t0 + i - 1].unsqueeze(-1), C[t0 + i - 1].unsqueeze(1), out=lam[i - 1]
                    )
            carry = decayed[0]

            if need_delta or need_A:
                v = log_decay_grad[: dim * rows * dstate].view(dim, k, batch, dstate)
                torch.mul(decayed, states[:k], out=v.permute(1, 2, 0, 3))
                v = v.view(dim, rows, dstate)
                if need_delta:
                    grad_delta[t0:t1].copy_(_contract_state(A, v).view(dim, k, batch).permute(1, 2, 0))
                if need_A:
                    grad_A.baddbmm_(delta[t0:t1].view(rows, dim).t().unsqueeze(1), v)
            if need_x:
                _contract_state(B[t0:t1].view(rows, dstate), lam.view(rows, dim, dstate), out=grad_x[t0:t1])
            if need_B:
                torch.bmm(
                    x[t0:t1].view(rows, 1, dim), lam.view(rows, dim, dstate), out=grad_B[t0:t1].view(rows, 1, dstate)
                )
            if need_C:
                torch.bmm(
                    grad_y[t0:t1].view(rows, 1, dim),
                    states[1:].view(rows, dim, dstate),
                    out=grad_C[t0:t1].view(rows, 1, dstate),
                )

    return grad_delta, grad_x, None if grad_A is None else grad_A.view(dim, dstate), grad_B, grad_C


class _SelectiveScanCore(torch.autograd.Function):
    """y = scan(softplus?(delta + bias), u, A, B, C) with checkpointed states and a hand-written adjoint."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, delta_bias, softplus):
        u_t, B_t, C_t = _time_major(u, B, C)
        delta_t = _step_sizes(_private_time_major(delta), delta_bias, softplus)
        x_t = delta_t * u_t
        A = A.contiguous()
        y, checkpoints = _scan_forward_rows(delta_t, x_t, A, B_t, C_t, keep_checkpoints=True)
        ctx.softplus = softplus
        ctx.save_for_backward(u_t, delta_t, x_t, A, B_t, C_t, checkpoints)
        return y.permute(1, 2, 0)

    @staticmethod
    def backward(ctx, grad_y):
        u_t, delta_t, x_t, A, B_t, C_t, checkpoints = ctx.saved_tensors
        need_u, need_delta, need_A, need_B, need_C, need_bias, _ = ctx.needs_input_grad
        need_delta = need_delta or need_bias
        grad_y = grad_y.permute(2, 0, 1).contiguous()
        needs = (need_delta, need_u or need_delta, need_A, need_B, need_C)
        grad_step, grad_x, grad_A, grad_B, grad_C = _scan_backward_rows(
            grad_y, delta_t, x_t, A, B_t, C_t, checkpoints, needs
        )
        # x = delta*u: its gradient flows to both; then back through the softplus and the bias.
        grad_u = grad_x * delta_t if need_u else None
        grad_delta = grad_bias = None
        if need_delta:
            grad_step.addcmul_(grad_x, u_t)
            grad_delta = _through_step_sizes(grad_step, delta_t, ctx.softplus)
            grad_bias = grad_delta.sum((0, 1)) if need_bias else None
        return (
            grad_u.permute(1, 2, 0) if need_u else None,
            grad_delta.permute(1, 2, 0) if ctx.needs_input_grad[1] else None,
            grad_A,
            grad_B.permute(1, 2, 0) if need_B else None,
            grad_C.permute(1, 2, 0) if need_C else None,
            grad_bias,
            None,
        )


class _SelectiveScanCpp(torch.autograd.Function):
    """The whole scan (bias, softplus, recurrence, skip, gate) in the C++ twin, which reads every sequence tensor
    time-major, [batch, seqlen, channels]: Mamba's u, delta, z, B and C are transposed views of that layout, used
    without a copy. Returns y time-major, [batch, seqlen, dim]. The kernel's backward recomputes the step sizes
    and states, so only the inputs are saved."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        u_t, delta_t, B_t, C_t = (time_major_view(t) for t in (u, delta, B, C))
        z_t = time_major_view(z) if z is not None else None
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        ctx.softplus = softplus
        ctx.save_for_backward(u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias)
        return cpu_extension("selective_scan").forward(u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, softplus)

    @staticmethod
    @once_differentiable  # the C++ backward is opaque to autograd: no second derivatives
    def backward(ctx, grad_y):
        u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias = ctx.saved_tensors
        grads = cpu_extension("selective_scan").backward(
            unit_channel_stride(grad_y), u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, ctx.softplus
        )
        grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias = grads
        time_major = (grad_u, grad_delta, grad_B, grad_C, grad_z)
        grad_u, grad_delta, grad_B, grad_C, grad_z = (None if g is None else g.transpose(1, 2) for g in time_major)
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, None
