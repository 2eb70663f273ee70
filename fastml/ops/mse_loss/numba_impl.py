"""Squared error on numba, the twin of csrc/mse_loss.cpp; signatures as in reference.py.

One pass: the difference (which the backward pass needs) and the elementwise or reduced loss.
The reduced sum is accumulated in float64 per thread, as four interleaved sums (so the adds
pipeline: with fastmath=False the compiler may not split one sum itself), and the threads' sums
are combined in a fixed order.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from fastml import _numba as nb
from fastml._numba import pjit, split_range


@pjit
def _forward_kernel(input, target, diff, keep_diff, loss_elems, write_loss_elems, chunks):
    """input, target, diff, loss_elems: (n,) (the last two written only when flagged)
    → Σ (input - target)² in float64."""
    n = input.shape[0]
    parts = np.zeros(chunks)
    for t in numba.prange(chunks):
        begin, end = split_range(n, chunks, t)
        a0 = a1 = a2 = a3 = 0.0
        i = begin
        while i + 4 <= end:
            e0 = input[i] - target[i]
            e1 = input[i + 1] - target[i + 1]
            e2 = input[i + 2] - target[i + 2]
            e3 = input[i + 3] - target[i + 3]
            if keep_diff:
                diff[i], diff[i + 1], diff[i + 2], diff[i + 3] = e0, e1, e2, e3
            if write_loss_elems:
                loss_elems[i], loss_elems[i + 1] = e0 * e0, e1 * e1
                loss_elems[i + 2], loss_elems[i + 3] = e2 * e2, e3 * e3
            a0 += np.float64(e0) * np.float64(e0)
            a1 += np.float64(e1) * np.float64(e1)
            a2 += np.float64(e2) * np.float64(e2)
            a3 += np.float64(e3) * np.float64(e3)
            i += 4
        while i < end:
            e = input[i] - target[i]
            if keep_diff:
                diff[i] = e
            if write_loss_elems:
                loss_elems[i] = e * e
            a0 += np.float64(e) * np.float64(e)
            i += 1
        parts[t] = (a0 + a1) + (a2 + a3)
    total = 0.0
    for t in range(chunks):
        total += parts[t]
    return total


@pjit
def _backward_kernel(diff, g, g_stride, scale, out, chunks):
    """out[i] = scale · diff[i] · g[i · g_stride]: g is elementwise (stride 1) or one value (0)."""
    n = diff.shape[0]
    s = diff.dtype.type(scale)
    for t in numba.prange(chunks):
        begin, end = split_range(n, chunks, t)
        if g_stride == 0:
            g0 = g[0]
            for i in range(begin, end):
                out[i] = s * diff[i] * g0
        else:
            for i in range(begin, end):
                out[i] = s * diff[i] * g[i]


def forward(input, target, reduction, keep_diff):
    """→ (loss, diff), as reference.forward; input and target contiguous, equally shaped."""
    dtype = input.dtype
    loss = input.new_empty(input.shape if reduction == "none" else ())
    diff = input.new_empty(input.shape) if keep_diff else None
    n = input.numel()
    total = _forward_kernel(nb.flat(input), nb.flat(target),
                            nb.absent(dtype, 1) if diff is None else nb.flat(diff), diff is not None,
                            nb.flat(loss) if reduction == "none" else nb.absent(dtype, 1), reduction == "none",
                            nb.threads_for(n))
    if reduction == "mean":
        loss.copy_(torch.tensor(total / n if n else float("nan"), dtype=torch.float64))  # mean of nothing: NaN
    elif reduction == "sum":
        loss.copy_(torch.tensor(total, dtype=torch.float64))  # a cast, not fill_: overflow gives inf
    return loss, diff


def backward(diff, grad, scale):
    """d loss / d input = scale · diff · grad, grad 0-dim or diff-shaped."""
    grad = grad.contiguous()
    out = diff.new_empty(diff.shape)
    _backward_kernel(nb.flat(diff), nb.flat(grad), 0 if grad.dim() == 0 else 1, float(scale), nb.flat(out),
                     nb.threads_for(diff.numel()))
    return out
