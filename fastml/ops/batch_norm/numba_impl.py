"""Batch normalisation (training statistics, optional ReLU) on numba, the twin of
csrc/batch_norm.cpp; signatures as in reference.py.

x is seen as planes (N·C planes of H·W values, the contiguous layout) or rows (N·H·W rows of C
values, channels-last). Each chunk (one per thread) takes a contiguous share of the planes or
rows and sums per channel into its own row of partial sums, in double, about a per-channel shift
(the channel's first value where finite: a large mean then does not cancel the variance away);
the chunks' sums are combined in a fixed order. The pre-ReLU value is ``x · scale + shift`` with
scale and shift formed once per channel (reference.affine), as one fused multiply-add
(``_pre_relu``) in forward and in backward alike, so the ReLU's mask there matches forward's output
bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from fastml import _numba as nb
from fastml._numba import fma, jit, pjit
from fastml.ops.batch_norm import reference


@jit
def _pre_relu(x, scale, shift):
    """x · scale + shift, forward's output before the ReLU, rounded once, as torch's addcmul
    (reference.py) and the C++ kernel's fused multiply-add form it on a CPU with FMA: for equal
    statistics, the same outputs and ReLU mask as theirs to the bit."""
    return fma(x, scale, shift)


@jit
def _masked(g, pre, relu, zero):
    """The ReLU's backward: 0 where its output is ≤ 0 (a NaN output passes the gradient)."""
    return zero if relu and pre <= 0 else g


@pjit
def _plane_sums(x, shift, chunks, sums):
    """x (planes, l) of n·c planes, plane q of channel q % c → sums[k, 0 | 1, ch]: Σ(x − shift),
    Σ(x − shift)² of chunk k's planes."""
    planes, c = x.shape[0], shift.shape[0]
    for k in numba.prange(chunks):
        begin, end = nb.split_range(planes, chunks, k)
        for ch in range(c):
            sums[k, 0, ch] = 0.0
            sums[k, 1, ch] = 0.0
        for q in range(begin, end):
            ch = q % c
            s, first, second = np.float64(shift[ch]), 0.0, 0.0
            for p in range(x.shape[1]):
                d = np.float64(x[q, p]) - s
                first += d
                second += d * d
            sums[k, 0, ch] += first
            sums[k, 1, ch] += second


@pjit
def _row_sums(x, shift, chunks, sums):
    """x (rows, c) → sums[k, 0 | 1, ch] as _plane_sums', over chunk k's rows."""
    rows, c = x.shape
    for k in numba.prange(chunks):
        begin, end = nb.split_range(rows, chunks, k)
        for ch in range(c):
            sums[k, 0, ch] = 0.0
            sums[k, 1, ch] = 0.0
        for r in range(begin, end):
            for ch in range(c):
                d = np.float64(x[r, ch]) - np.float64(shift[ch])
                sums[k, 0, ch] += d
                sums[k, 1, ch] += d * d


@pjit
def _normalise_planes(x, scale, shift, relu, chunks, out):
    planes, c = x.shape[0], scale.shape[0]
    zero = x.dtype.type(0)
    for k in numba.prange(chunks):
        begin, end = nb.split_range(planes, chunks, k)
        for q in range(begin, end):
            a, b = scale[q % c], shift[q % c]
            for p in range(x.shape[1]):
                y = _pre_relu(x[q, p], a, b)
                out[q, p] = zero if relu and y < zero else y


@pjit
def _normalise_rows(x, scale, shift, relu, chunks, out):
    rows, c = x.shape
    zero = x.dtype.type(0)
    for k in numba.prange(chunks):
        begin, end = nb.split_range(rows, chunks, k)
        for r in range(begin, end):
            for ch in range(c):
                y = _pre_relu(x[r, ch], scale[ch], shift[ch])
                out[r, ch] = zero if relu and y < zero else y


@pjit
def _gradient_plane_sums(grad, x, mean, scale, shift, relu, chunks, sums):
    """sums[k, 0 | 1, ch]: Σg and Σg·(x − mean) over chunk k's planes, g the masked gradient."""
    planes, c = x.shape[0], mean.shape[0]
    zero = grad.dtype.type(0)
    for k in numba.prange(chunks):
        begin, end = nb.split_range(planes, chunks, k)
        for ch in range(c):
            sums[k, 0, ch] = 0.0
            sums[k, 1, ch] = 0.0
        for q in range(begin, end):
            ch = q % c
            m, a, b = np.float64(mean[ch]), scale[ch], shift[ch]
            first, second = 0.0, 0.0
            for p in range(x.shape[1]):
                g = np.float64(_masked(grad[q, p], _pre_relu(x[q, p], a, b), relu, zero))
                first += g
                second += g * (np.float64(x[q, p]) - m)
            sums[k, 0, ch] += first
            sums[k, 1, ch] += second


@pjit
def _gradient_row_sums(grad, x, mean, scale, shift, relu, chunks, sums):
    rows, c = x.shape
    zero = grad.dtype.type(0)
    for k in numba.prange(chunks):
        begin, end = nb.split_range(rows, chunks, k)
        for ch in range(c):
            sums[k, 0, ch] = 0.0
            sums[k, 1, ch] = 0.0
        for r in range(begin, end):
            for ch in range(c):
                g = np.float64(_masked(grad[r, ch], _pre_relu(x[r, ch], scale[ch], shift[ch]), relu, zero))
                sums[k, 0, ch] += g
                sums[k, 1, ch] += g * (np.float64(x[r, ch]) - np.float64(mean[ch]))


@pjit
def _input_gradient_planes(grad, x, mean, scale, shift, relu, k_coef, mean_g, chunks, out):
    """out = (g − mean(g) − (x − mean) · k) · scale, reference.backward's formula."""
    planes, c = x.shape[0], mean.shape[0]
    zero = grad.dtype.type(0)
    for k in numba.prange(chunks):
        begin, end = nb.split_range(planes, chunks, k)
        for q in range(begin, end):
            ch = q % c
            m, a, b, kc, mg = mean[ch], scale[ch], shift[ch], k_coef[ch], mean_g[ch]
            for p in range(x.shape[1]):
                g = _masked(grad[q, p], _pre_relu(x[q, p], a, b), relu, zero)
                out[q, p] = (g - mg - (x[q, p] - m) * kc) * a


@pjit
def _input_gradient_rows(grad, x, mean, scale, shift, relu, k_coef, mean_g, chunks, out):
    rows, c = x.shape
    zero = grad.dtype.type(0)
    for k in numba.prange(chunks):
        begin, end = nb.split_range(rows, chunks, k)
        for r in range(begin, end):
            for ch in range(c):
                g = _masked(grad[r, ch], _pre_relu(x[r, ch], scale[ch], shift[ch]), relu, zero)
                out[r, ch] = (g - mean_g[ch] - (x[r, ch] - mean[ch]) * k_coef[ch]) * scale[ch]


def _as_2d(t: torch.Tensor, channels_last: bool) -> np.ndarray:
    """A dense (N, C, H, W) tensor as (planes, H·W) or, channels-last, (rows, C): a view."""
    n, c, h, w = t.shape
    t = t.detach()
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(n * h * w, c).numpy()
    return t.reshape(n * c, h * w).numpy()


def _split(x: torch.Tensor, channels_last: bool):
    n, c, h, w = x.shape
    units = n * h * w if channels_last else n * c  # rows or planes, the chunks' shares
    return units, nb.threads_for(x.numel(), nb.ELEMENTS_PER_THREAD) if units else 1


def forward(x, weight, bias, eps, relu):
    if x.numel() == 0:
        return reference.forward(x, weight, bias, eps, relu)
    channels_last = reference.layout_of(x) == torch.channels_last
    n, c, h, w = x.shape
    shift = reference.channel_shift(x)
    units, chunks = _split(x, channels_last)
    chunks = min(chunks, units)
    sums = np.empty((chunks, 2, c), dtype=np.float64)
    (_row_sums if channels_last else _plane_sums)(_as_2d(x, channels_last), shift.numpy(), chunks, sums)
    total = torch.from_numpy(sums.sum(axis=0))  # chunk by chunk, in order
    stats = reference.stats_from_sums(shift, total, n * h * w, eps, x.dtype)
    scale, offset = reference.affine(weight, bias, stats)
    out = reference.like(x)
    (_normalise_rows if channels_last else _normalise_planes)(
        _as_2d(x, channels_last), nb.view(scale.contiguous()), nb.view(offset.contiguous()), bool(relu), chunks,
        _as_2d(out, channels_last))
    return out, stats


def backward(grad, x, weight, bias, stats, relu):
    if x.numel() == 0:
        return reference.backward(grad, x, weight, bias, stats, relu)
    channels_last = reference.layout_of(x) == torch.channels_last
    n, c, h, w = x.shape
    count = n * h * w
    scale, offset = (t.contiguous() for t in reference.affine(weight, bias, stats))
    mean = stats[0].contiguous()
    units, chunks = _split(x, channels_last)
    chunks = min(chunks, units)
    x2, g2 = _as_2d(x, channels_last), _as_2d(grad, channels_last)
    sums = np.empty((chunks, 2, c), dtype=np.float64)
    (_gradient_row_sums if channels_last else _gradient_plane_sums)(
        g2, x2, nb.view(mean), nb.view(scale), nb.view(offset), bool(relu), chunks, sums)
    total = torch.from_numpy(sums.sum(axis=0))
    grad_weight, grad_bias, k_coef, mean_g = reference.gradient_terms(total, stats, count, weight, bias, x.dtype,
                                                                      x.dtype)
    grad_input = reference.like(x)
    (_input_gradient_rows if channels_last else _input_gradient_planes)(
        g2, x2, nb.view(mean), nb.view(scale), nb.view(offset), bool(relu), nb.view(k_coef), nb.view(mean_g),
        chunks, _as_2d(grad_input, channels_last))
    return grad_input, grad_weight, grad_bias
