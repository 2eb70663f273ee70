"""Squared error in Triton; signatures and semantics as in reference.py.

forward: persistent programs stream blocks of the flattened input; each keeps its sum of squares
in registers and writes one partial, which fastml._triton.reduce_partials sums in a fixed order.
backward: one elementwise pass, scale · diff · grad.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastml import _triton as tt


@triton.jit
def _forward_kernel(
    a_ptr,       # (n,) input
    b_ptr,       # (n,) target
    loss_ptr,    # (n,) squared difference, written for reduction "none"
    diff_ptr,    # (n,) input - target, written when KEEP_DIFF
    part_ptr,    # (P, 1) per-program sums of squares when REDUCE
    n,
    REDUCE: tl.constexpr, KEEP_DIFF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 block starts: n may pass 2**31
    acc = tl.zeros([BLOCK], ACC)
    for blk in range(pid, tl.cdiv(n, BLOCK), tl.num_programs(0)):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        d = tl.load(a_ptr + offs, mask=mask, other=0).to(ACC) - tl.load(b_ptr + offs, mask=mask, other=0).to(ACC)
        if KEEP_DIFF:
            tl.store(diff_ptr + offs, d.to(diff_ptr.dtype.element_ty), mask=mask)
        if REDUCE:
            acc += d * d
        else:
            tl.store(loss_ptr + offs, (d * d).to(loss_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _backward_kernel(
    diff_ptr,    # (n,) input - target
    grad_ptr,    # () or (n,) incoming gradient
    out_ptr,     # (n,) d loss / d input
    n,
    scale_hi, scale_lo,  # scale as a float32 pair (fastml._triton.split_float)
    GRAD_SCALAR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    scale = (tl.zeros([], ACC) + scale_hi) + scale_lo
    if GRAD_SCALAR:
        gs = tl.load(grad_ptr).to(ACC) * scale
    for blk in range(pid, tl.cdiv(n, BLOCK), tl.num_programs(0)):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        d = tl.load(diff_ptr + offs, mask=mask, other=0).to(ACC)
        if GRAD_SCALAR:
            g = d * gs
        else:
            g = d * (tl.load(grad_ptr + offs, mask=mask, other=0).to(ACC) * scale)
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(n: int, device):
    """(block, programs) for a persistent elementwise pass over n elements."""
    block = 4096 if tt.interpreted() else 2048
    return block, tt.persistent_programs(tt.cdiv(n, block), device)


def forward(input, target, reduction, keep_diff):
    reduce = reduction != "none"
    loss = input.new_empty(() if reduce else input.shape)
    diff = input.new_empty(input.shape) if keep_diff else None
    n = input.numel()
    if n == 0:
        if reduce:
            loss.fill_(float("nan") if reduction == "mean" else 0.0)
        return loss, diff
    block, programs = _launch(n, input.device)
    part = input.new_empty((programs, 1), dtype=tt.torch_acc_dtype(input.dtype)) if reduce else None
    _forward_kernel[(programs,)](
        input, target, None if reduce else loss, diff, part, n,
        REDUCE=reduce, KEEP_DIFF=bool(keep_diff), ACC=tt.acc_dtype(input.dtype), BLOCK=block,
        num_warps=4 if tt.interpreted() else 8)
    if reduce:
        tt.reduce_partials(part, 0, 0, n, reduction == "mean", None, None, loss)
    return loss, diff


def backward(diff, grad, scale):
    grad = grad.to(diff.dtype).contiguous()
    out = diff.new_empty(diff.shape)
    n = diff.numel()
    if n == 0:
        return out
    scalar = grad.dim() == 0 or grad.numel() == 1 and n != 1
    block, programs = _launch(n, diff.device)
    hi, lo = tt.split_float(scale)
    _backward_kernel[(programs,)](
        diff, grad, out, n, hi, lo, GRAD_SCALAR=scalar, ACC=tt.acc_dtype(diff.dtype), BLOCK=block,
        num_warps=4 if tt.interpreted() else 8)
    return out
