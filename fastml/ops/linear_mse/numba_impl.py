"""Linear + squared loss on numba, the twin of csrc/linear_mse.cpp; signatures as in reference.py.

One pass over x: for each block of BLOCK_ROWS rows, the prediction x W^T + b, the residual, the
loss (summed in float64) and, for "mean" / "sum", the weight / bias gradients (residual-weighted
sums of the same rows, while they are in cache). The N × O prediction never exists whole.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from fastml import _numba as nb
from fastml._numba import (BLOCK_ROWS, TWO_LEVEL_ELEMENTS, accumulate_outer, dot_block, dot_row, jit, pjit,
                           reduce_partials, split_range)


@jit
def _process_rows(x, w, bias, has_bias, y, row_begin, row_end, col_begin, col_end,
                  residual, keep_residual, loss_elems, write_loss_elems,
                  grad_acc, need_gw, grad_b_acc, need_gb):
    """Rows [row_begin, row_end) × outputs [col_begin, col_end) of the problem → their summed
    squared residual (float64). residual and loss_elems (n, o) are indexed by global column;
    grad_acc (cols, d) and grad_b_acc (cols,) by local column, accumulated into (unscaled)."""
    d = x.shape[1]
    cols = col_end - col_begin
    # Small gradients are summed per block first, then per thread (closer to pairwise
    # summation, so float32 sums over many rows stay accurate).
    two_level = need_gw and cols * d <= TWO_LEVEL_ELEMENTS
    pred = np.empty((BLOCK_ROWS, cols), x.dtype)
    block_grad = np.empty((cols if two_level else 0, d), x.dtype)
    # the bias gradient is summed in a thread-local copy: the threads' slots in grad_b_acc's
    # array share cache lines, and storing there every row would bounce them between cores
    grad_b_local = np.zeros(cols if need_gb else 0, x.dtype)
    loss = 0.0
    for r0 in range(row_begin, row_end, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, row_end - r0)
        dot_block(x, r0, rows, w, col_begin, cols, bias, has_bias, pred, 0)
        # pred becomes the block's residual. The optional outputs get loops of their own: flags
        # tested inside one loop would make LLVM compile a copy of it per combination.
        for r in range(rows):
            for c in range(cols):
                diff = pred[r, c] - y[r0 + r, col_begin + c]
                pred[r, c] = diff
                loss += np.float64(diff) * np.float64(diff)
        if keep_residual:
            for r in range(rows):
                for c in range(cols):
                    residual[r0 + r, col_begin + c] = pred[r, c]
        if write_loss_elems:
            for r in range(rows):
                for c in range(cols):
                    loss_elems[r0 + r, col_begin + c] = pred[r, c] * pred[r, c]
        if need_gb:
            for r in range(rows):
                for c in range(cols):
                    grad_b_local[c] += pred[r, c]
        if need_gw:
            if two_level:
                block_grad[:] = 0
            accumulate_outer(pred, 0, 0, x, r0, rows, block_grad if two_level else grad_acc)
            if two_level:
                for c in range(cols):
                    for k in range(d):
                        grad_acc[c, k] += block_grad[c, k]
    if need_gb:
        for c in range(cols):
            grad_b_acc[c] += grad_b_local[c]
    return loss


@pjit
def _linear_mse_kernel(x, w, bias, has_bias, y, chunks, split,
                       residual, keep_residual, loss_elems, write_loss_elems,
                       grad_w, need_gw, grad_b, need_gb, scale, grad_scale, loss_out, write_loss):
    """x (n, d), w (o, d), bias (o,), y (n, o); outputs residual, loss_elems (n, o), grad_w (o, d),
    grad_b (o,), loss_out (1,), each written only when its flag is set (else a placeholder).

    chunks: parts of the work, one per thread. split: threads own output columns over all rows
    (when per-thread gradient copies would be large); otherwise they own rows over all columns
    and their partial gradients are summed in a fixed order."""
    n, d = x.shape
    o = w.shape[0]
    by_rows_grad = need_gw and not split
    grad_parts = np.empty((chunks, o if by_rows_grad else 0, d), x.dtype)
    grad_b_parts = np.zeros((chunks, o), x.dtype)
    loss_parts = np.zeros(chunks)
    for t in numba.prange(chunks):
        # one call site with run-time bounds: one compiled _process_rows, not one per branch
        if split:  # need_gw is set: thread t owns output columns [col_begin, col_end), all rows
            row_begin, row_end = 0, n
            col_begin, col_end = split_range(o, chunks, t)
            acc = grad_w[col_begin:col_end]
        else:  # thread t owns rows [row_begin, row_end), all columns
            row_begin, row_end = split_range(n, chunks, t)
            col_begin, col_end = 0, o
            acc = grad_parts[t]
        acc[:] = 0
        loss_parts[t] = _process_rows(x, w, bias, has_bias, y, row_begin, row_end, col_begin, col_end,
                                      residual, keep_residual, loss_elems, write_loss_elems,
                                      acc, need_gw, grad_b_parts[t, col_begin:col_end], need_gb)
    gs = x.dtype.type(grad_scale)
    if need_gw:
        if split:
            flat = grad_w.reshape(o * d)
            for i in range(o * d):
                flat[i] *= gs
        else:
            reduce_partials(grad_parts.reshape((chunks, o * d)), gs, grad_w.reshape(o * d))
    if need_gb:
        for j in range(o):
            s = x.dtype.type(0)
            for t in range(chunks):
                s += grad_b_parts[t, j]
            grad_b[j] = s * gs
    if write_loss:
        total = 0.0
        for t in range(chunks):
            total += loss_parts[t]
        loss_out[0] = total * scale


def forward(x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual):
    """→ (loss, residual, grad_weight, grad_bias), as reference.forward."""
    n, d = x.shape
    o = weight.shape[0]
    dtype, new = x.dtype, x.new_empty
    loss = new((n, o)) if reduction == "none" else new(())
    residual = new((n, o)) if keep_residual else None
    fused_grads = reduction != "none"
    grad_w = new((o, d)) if fused_grads and need_weight_grad else None
    grad_b = new((o,)) if fused_grads and need_bias_grad else None

    # mean over no elements is NaN (0 / 0), as in torch; the gradient of an empty sum is 0.
    count = n * o
    scale = (1.0 / count if count else math.nan) if reduction == "mean" else 1.0
    grad_scale = 2.0 * scale if count else 0.0

    threads = nb.threads_for(n * d * max(o, 1))
    split = grad_w is not None and nb.split_outputs(threads, o, d, x.element_size())
    _linear_mse_kernel(
        nb.view(x), nb.view(weight), nb.view_or_absent(bias, dtype, 1), bias is not None, nb.view(target),
        threads, split,
        nb.view_or_absent(residual, dtype, 2), residual is not None,
        nb.view(loss) if reduction == "none" else nb.absent(dtype, 2), reduction == "none",
        nb.view_or_absent(grad_w, dtype, 2), grad_w is not None,
        nb.view_or_absent(grad_b, dtype, 1), grad_b is not None,
        scale, grad_scale, nb.absent(dtype, 1) if reduction == "none" else nb.flat(loss), reduction != "none")
    return loss, residual, grad_w, grad_b


@jit
def _sgd_epoch_kernel(x, y, order, w, bias, has_bias, lr, batch_size):
    """One epoch in place. x (n, d), y (n, o), order (n,) int64, w (o, d), bias (o,)."""
    n, d = x.shape
    o = w.shape[0]
    grad_w = np.empty((o, d), x.dtype)
    grad_b = np.empty(o, x.dtype)
    step = x.dtype.type(lr / batch_size)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        grad_w[:] = 0
        grad_b[:] = 0
        for s in range(start, stop):
            i = order[s]
            for j in range(o):
                diff = dot_row(x, i, w, j) + (bias[j] if has_bias else x.dtype.type(0)) - y[i, j]
                if has_bias:
                    grad_b[j] += diff
                for k in range(d):
                    grad_w[j, k] += diff * x[i, k]
        for j in range(o):
            for k in range(d):
                w[j, k] -= step * grad_w[j, k]
        if has_bias:
            for j in range(o):
                bias[j] -= step * grad_b[j]


def sgd_epoch(x, target, order, weight, bias, lr, batch_size):
    """One epoch of the course's minibatch SGD, in place (see reference.sgd_epoch). Sequential by
    nature (each step needs the last) and tiny per step: one thread."""
    batch_size = int(batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _sgd_epoch_kernel(nb.view(x), nb.view(target), nb.view(order), nb.view(weight),
                      nb.view_or_absent(bias, x.dtype, 1), bias is not None, float(lr), batch_size)
