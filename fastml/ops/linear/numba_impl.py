"""Linear layer on numba, the twin of csrc/linear.cpp. Inputs are contiguous; shapes as in
reference.py: x (N, D), weight (O, D), bias (O,) or None, grad (N, O).

The forward pass and grad_input are parallel over contiguous row chunks; grad_weight sums
per-thread partials in a fixed order (or, when o × d partials per thread would be large, splits
the outputs between threads).
"""

from __future__ import annotations

import numba
import numpy as np

from fastml import _numba as nb
from fastml._numba import BLOCK_ROWS, accumulate_outer, dot_block, pjit, reduce_partials, split_range


@pjit
def _forward_kernel(x, w, bias, has_bias, out, chunks):
    """out (n, o) = x (n, d) @ w (o, d)^T + bias (o,)."""
    n = x.shape[0]
    o = w.shape[0]
    for t in numba.prange(chunks):
        begin, end = split_range(n, chunks, t)
        for r0 in range(begin, end, BLOCK_ROWS):
            dot_block(x, r0, min(BLOCK_ROWS, end - r0), w, 0, o, bias, has_bias, out, r0)


@pjit
def _backward_input_kernel(g, w, out, chunks):
    """out (n, d) = g (n, o) @ w (o, d): four rows share each loaded weight row."""
    n, o = g.shape
    d = w.shape[1]
    for t in numba.prange(chunks):
        begin, end = split_range(n, chunks, t)
        out[begin:end] = 0
        r = begin
        while r + 4 <= end:
            o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
            for j in range(o):
                c0, c1, c2, c3 = g[r, j], g[r + 1, j], g[r + 2, j], g[r + 3, j]
                wj = w[j]
                for k in range(d):
                    wk = wj[k]
                    o0[k] += c0 * wk
                    o1[k] += c1 * wk
                    o2[k] += c2 * wk
                    o3[k] += c3 * wk
            r += 4
        while r < end:
            orow = out[r]
            for j in range(o):
                c = g[r, j]
                wj = w[j]
                for k in range(d):
                    orow[k] += c * wj[k]
            r += 1


@pjit
def _backward_weight_kernel(g, x, grad_w, grad_b, need_gb, chunks, split):
    """grad_w (o, d) = g (n, o)^T @ x (n, d); grad_b (o,) = column sums of g when need_gb."""
    n, o = g.shape
    d = x.shape[1]
    if need_gb:  # one pass in row order, as the C++ kernel
        grad_b[:] = 0
        for i in range(n):
            for j in range(o):
                grad_b[j] += g[i, j]
    parts = np.empty((0 if split else chunks, o, d), x.dtype)
    for t in numba.prange(chunks):
        if split:  # thread t owns rows [col_begin, col_end) of grad_w, over all of x
            row_begin, row_end = 0, n
            col_begin, col_end = split_range(o, chunks, t)
            acc = grad_w[col_begin:col_end]
        else:  # thread t owns rows [row_begin, row_end) of x, for all of grad_w
            row_begin, row_end = split_range(n, chunks, t)
            col_begin = 0
            acc = parts[t]
        acc[:] = 0
        for r0 in range(row_begin, row_end, BLOCK_ROWS):
            accumulate_outer(g, r0, col_begin, x, r0, min(BLOCK_ROWS, row_end - r0), acc)
    if not split:
        reduce_partials(parts.reshape((chunks, o * d)), x.dtype.type(1), grad_w.reshape(o * d))


def forward(x, weight, bias):
    n, d = x.shape
    o = weight.shape[0]
    out = x.new_empty((n, o))
    chunks = nb.threads_for(n * d * o)
    _forward_kernel(nb.view(x), nb.view(weight), nb.view_or_absent(bias, x.dtype, 1), bias is not None,
                    nb.view(out), chunks)
    return out


def backward_input(grad, weight):
    n, o = grad.shape
    d = weight.shape[1]
    out = grad.new_empty((n, d))
    chunks = nb.threads_for(n * d * o)
    _backward_input_kernel(nb.view(grad), nb.view(weight), nb.view(out), chunks)
    return out


def backward_weight(grad, x, need_bias):
    n, o = grad.shape
    d = x.shape[1]
    grad_w = grad.new_empty((o, d))
    grad_b = grad.new_empty((o,)) if need_bias else None
    chunks = nb.threads_for(n * d * max(o, 1))
    split = nb.split_outputs(chunks, o, d, grad.element_size())
    _backward_weight_kernel(nb.view(grad), nb.view(x), nb.view(grad_w), nb.view_or_absent(grad_b, grad.dtype, 1),
                            bool(need_bias), chunks, split)
    return grad_w, grad_b
