"""Full-softmax cross-entropy of tied item scores: mean_i [logsumexp(h_i W^T) - h_i . W_{t_i}].

Every model trains with it (hidden [n, d], item table W [n_items, d], targets [n]). Unfused, the
[n, n_items] score matrix is the largest tensor of a step (at batch 2048 over Amazon-Beauty's 12k items,
100 MB) and autograd walks it six to eight times from memory: log_softmax forward, the zero-filled
gradient of nll_loss, log_softmax backward. On CPU the fused path below never holds the whole matrix: it
takes the rows in blocks whose scores stay in L2, and per block computes the scores, takes the max,
exponentiates in place, normalises and subtracts the one-hot target (which turns the scores into
d loss / d scores), then at once the block's share of both gradients (the two matrix products of the
linear layer, d loss / d hidden for the block's rows and its sum into d loss / d table). The forward pass
thus computes the gradients, and backward only scales them by the upstream gradient; at low widths,
where the step is mostly this loss, the score matrix's round trips to memory were most of its cost
(epochs 1.07-1.13x faster, reports/bench_cpu/ce_blocks; 100 MB less memory per step at batch 2048). Where no gradient is wanted (grad
mode off, or no input requires one) neither product is computed (the softmax pass still turns each
block into its gradient: one pass, kept so that both backends run one row function). The result equals F.cross_entropy to
float rounding. It has no second derivative: a backward pass that builds a graph (create_graph) is refused.

Other devices, half precision and CPU autocast keep torch's own kernels (fused there already, or in bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import CPU_BACKEND
from .cpu_extension import cpu_extension

#: bytes of scores per row block of the CPU path: about a core's L2 cache (2 MiB on the project machines; a
#: block of 43 rows of amazon-beauty's 12k items); blocks of half and twice the size measured within 10%
_ROW_BLOCK_BYTES = 2 << 20


def tied_cross_entropy(
    hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """Mean cross-entropy of the scores hidden @ table.T (every row of table a class) against targets.
    `backend` "cpp" runs each block's softmax part as C++ (cross_entropy_cpu.cpp), "torch" as torch ops."""
    if hidden.dim() != 2 or table.dim() != 2 or hidden.size(1) != table.size(1):
        raise ValueError(
            f"expected hidden [n, d] and table [classes, d], got {tuple(hidden.shape)} and {tuple(table.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [{hidden.size(0)}], got {tuple(targets.shape)}")
    fused = (
        hidden.device.type == "cpu"
        and hidden.dtype in (torch.float32, torch.float64)
        and table.dtype == hidden.dtype
        and hidden.size(0) > 0
        and not torch.is_autocast_enabled("cpu")  # autocast's bfloat16 products would not fit the float buffers
    )
    if not fused:
        return tied_cross_entropy_reference(hidden, table, targets)
    # the gradients are computed in the forward pass: only those that backward can ask for
    grads = torch.is_grad_enabled()
    rows_to_grad = _softmax_grad_cpp if backend == CPU_BACKEND else _softmax_grad_torch
    return _FusedTiedCrossEntropy.apply(
        hidden, table, targets, grads and hidden.requires_grad, grads and table.requires_grad, rows_to_grad
    )


def tied_cross_entropy_reference(hidden, table, targets):
    """torch's unfused composition (the fused path's oracle in tests, and the path off CPU); half
    precision scores are promoted to float32 first."""
    scores = hidden @ table.t()
    return F.cross_entropy(scores.to(torch.promote_types(scores.dtype, torch.float32)), targets)


def _block_rows(classes: int, itemsize: int) -> int:
    """Rows per block of scores (at least one, however many classes)."""
    return max(1, _ROW_BLOCK_BYTES // max(1, classes * itemsize))


@torch.compiler.disable  # an opaque C++ call, like every kernel of cpu_extension
def _softmax_grad_cpp(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cpu_extension("cross_entropy").softmax_grad(scores, targets)


def _softmax_grad_torch(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """In place, scores [rows, classes] -> softmax - one_hot(targets) (d loss / d scores); returns the rows'
    losses. The C++ twin (cross_entropy_cpu.cpp) does the same in three passes over each row instead of seven."""
    target = targets[:, None]
    picked = scores.gather(1, target)
    top = scores.amax(dim=1, keepdim=True)
    total = scores.sub_(top).exp_().sum(dim=1, keepdim=True)
    losses = (total.log() + top - picked).squeeze(1)
    scores.div_(total).scatter_add_(1, target, scores.new_full(target.shape, -1.0))
    return losses


class _FusedTiedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, targets, want_grad_hidden, want_grad_table, rows_to_grad):
        hidden, table = hidden.contiguous(), table.contiguous()
        losses = hidden.new_empty(hidden.size(0))
        # the gradients of the summed losses; backward scales them
        grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
        grad_table = torch.zeros_like(table) if want_grad_table else None
        block = _block_rows(table.size(0), table.element_size())
        for start in range(0, hidden.size(0), block):
            rows = slice(start, start + block)
            part_hidden = hidden[rows]
            score_grad = part_hidden @ table.t()  # the scores, until rows_to_grad turns them into their gradient
            losses[rows] = rows_to_grad(score_grad, targets[rows])
            if grad_hidden is not None:
                torch.mm(score_grad, table, out=grad_hidden[rows])
            if grad_table is not None:
                grad_table.addmm_(score_grad.t(), part_hidden)
        ctx.save_for_backward(grad_hidden, grad_table)
        ctx.rows = hidden.size(0)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph: the saved gradients are constants, a second derivative would be 0
            raise RuntimeError(
                "tied_cross_entropy (fused) has no second derivative; use tied_cross_entropy_reference for that"
            )
        grad_hidden, grad_table = ctx.saved_tensors
        # the mean's 1/n and the upstream gradient scale the small gradients, never a score matrix
        scale = grad_output / ctx.rows
        return (
            grad_hidden * scale if grad_hidden is not None and ctx.needs_input_grad[0] else None,
            grad_table * scale if grad_table is not None and ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )
