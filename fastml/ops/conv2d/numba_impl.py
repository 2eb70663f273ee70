"""2-D convolution on numba: direct (no im2col) loops over contiguous NCHW tensors; signatures and
shapes as in reference.py: x (N, C, H, W), weight (K, C / groups, R, S), bias (K,) or None,
grad / out (N, K, OH, OW).

Work is split so that each task owns what it writes, with no partials to combine:
- forward: one (n, k) output plane per task, built row by row (``conv_row``, which the fused
  conv + ReLU + max-pool kernel shares);
- grad_x: one (n, c) input plane per task, scattering every output of the channels in c's group;
- grad_weight / grad_bias: one (k, c) weight slice per task (grad_bias[k] with its c = 0 slice),
  summed over the batch and the output positions.

The innermost loop always runs along an output row (contiguous) with the kernel tap fixed, on
slices indexed from 0, so LLVM vectorises it (for stride 1; a larger stride makes the input side
a strided gather, or in grad_x a scatter). Its bounds are clipped to the columns whose input lies
inside x: zero padding contributes nothing and is skipped, never materialised nor tested per
element. (Hence a non-finite weight or gradient meeting the padding gives no NaN here, where
torch's im2col paths compute 0 · inf; torch's own paths disagree on this.) The grad_weight sums
along a row carry only LLVM's reassoc flag (fastmath={"reassoc"}, see fastml/_numba.py), so they
run in SIMD lanes; everything else is strict IEEE arithmetic.
"""

from __future__ import annotations

import numba
import numpy as np

from fastml import _numba as nb
from fastml._numba import jit, pjit
from fastml.ops.conv2d import reference
from fastml.ops.conv2d.reference import output_size


@jit
def valid_columns(width, out_width, kw, sw, pw, dw):
    """bounds (kw, 2): for each kernel column s, [lo, hi) = the output columns ow < out_width whose
    input column ow·sw − pw + s·dw lies in [0, width). The rest read the zero padding, so they
    contribute nothing and are skipped. Computed once per call: the integer divisions would
    otherwise cost more than the short rows they bound."""
    bounds = np.empty((kw, 2), np.int64)
    for s in range(kw):
        offset = s * dw - pw
        lo = 0 if offset >= 0 else (-offset + sw - 1) // sw
        hi = 0 if width - offset <= 0 else (width - offset + sw - 1) // sw
        bounds[s, 0], bounds[s, 1] = lo, max(lo, min(hi, out_width))
    return bounds


@jit
def add_scaled(dst, src, a):
    """dst[i] += a · src[i] for i < dst.shape[0]. The callers pass slices, so the index runs from
    0: numba's negative-index wraparound then folds away and LLVM vectorises the loop."""
    for i in range(dst.shape[0]):
        dst[i] += a * src[i]


@jit
def taps(row, lo, hi, stride, offset):
    """row[i·stride + offset] for lo ≤ i < hi, as a strided view. Callers take row[lo + offset:
    hi + offset] themselves for stride 1: a contiguous slice keeps a contiguous type (numba would
    type a function returning either as strided), which LLVM vectorises best."""
    begin = lo * stride + offset
    return row[begin:begin + (hi - lo - 1) * stride + 1:stride]


@jit
def conv_row(x, c0, w, bias_value, oh, row, bounds, sh, sw, ph, pw, dh, dw):
    """row[ow] = bias_value + Σ_{c, r, s} w[c, r, s] · x[c0 + c, oh·sh − ph + r·dh, ow·sw − pw + s·dw]
    for ow < row.shape[0], zero outside x. x (C, H, W) one image, w (C / groups, R, S) one output
    channel's filter, c0 the first channel of its group, row (≥ 0,) the output row (or its first
    columns), bounds = valid_columns(W, row.shape[0], S, sw, pw, dw). Each output sums its taps in
    the same order (c, r, s), so equal windows of x give bitwise-equal outputs (the max-pool's ties)."""
    h = x.shape[1]
    cg, kh, kw = w.shape
    row[:] = bias_value
    for c in range(cg):
        xc = x[c0 + c]
        for r in range(kh):
            ih = oh * sh - ph + r * dh
            if ih < 0 or ih >= h:
                continue
            xr = xc[ih]
            for s in range(kw):
                lo, hi, offset = bounds[s, 0], bounds[s, 1], s * dw - pw
                if lo >= hi:
                    continue
                if sw == 1:
                    add_scaled(row[lo:hi], xr[lo + offset:hi + offset], w[c, r, s])
                else:
                    add_scaled(row[lo:hi], taps(xr, lo, hi, sw, offset), w[c, r, s])


@pjit
def _forward_kernel(x, w, bias, has_bias, out, groups, sh, sw, ph, pw, dh, dw):
    """out (N, K, OH, OW) = conv(x (N, C, H, W), w (K, C / groups, R, S)) + bias (K,)."""
    n_planes, k_out = out.shape[0] * out.shape[1], out.shape[1]
    cg, kg = w.shape[1], out.shape[1] // groups
    zero = x.dtype.type(0)
    bounds = valid_columns(x.shape[3], out.shape[3], w.shape[3], sw, pw, dw)
    for p in numba.prange(n_planes):
        t = np.int64(p)  # a prange index may be unsigned; int64 keeps the arithmetic integral
        n, k = t // k_out, t % k_out
        b = bias[k] if has_bias else zero
        plane = out[n, k]
        for oh in range(out.shape[2]):
            conv_row(x[n], k // kg * cg, w[k], b, oh, plane[oh], bounds, sh, sw, ph, pw, dh, dw)


@pjit
def _backward_input_kernel(grad, w, grad_x, groups, sh, sw, ph, pw, dh, dw):
    """grad_x (N, C, H, W) = the transposed convolution of grad (N, K, OH, OW) with w (K, C / groups,
    R, S). Each task owns one input plane, so its scatter-adds need no atomics."""
    c_in, k_out = grad_x.shape[1], grad.shape[1]
    h, width = grad_x.shape[2], grad_x.shape[3]
    oh_count, ow_count = grad.shape[2], grad.shape[3]
    cg, kg = w.shape[1], k_out // groups
    kh, kw = w.shape[2], w.shape[3]
    bounds = valid_columns(width, ow_count, kw, sw, pw, dw)
    for p in numba.prange(grad_x.shape[0] * c_in):
        t = np.int64(p)
        n, c = t // c_in, t % c_in
        g, cl = c // cg, c % cg
        plane = grad_x[n, c]
        plane[:] = 0
        for k in range(g * kg, (g + 1) * kg):
            gk, wk = grad[n, k], w[k, cl]
            for oh in range(oh_count):
                gr = gk[oh]
                for r in range(kh):
                    ih = oh * sh - ph + r * dh
                    if ih < 0 or ih >= h:
                        continue
                    xr = plane[ih]
                    for s in range(kw):
                        lo, hi, offset = bounds[s, 0], bounds[s, 1], s * dw - pw
                        if lo >= hi:
                            continue
                        if sw == 1:
                            add_scaled(xr[lo + offset:hi + offset], gr[lo:hi], wk[r, s])
                        else:  # a strided scatter (not vectorised), still on this task's plane
                            add_scaled(taps(xr, lo, hi, sw, offset), gr[lo:hi], wk[r, s])


@nb._dot_jit
def dot(a, b):
    """Σ_i a[i] · b[i] for i < a.shape[0], in a's dtype (reassoc: SIMD lanes)."""
    acc = a.dtype.type(0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@pjit
def _backward_weight_kernel(grad, x, grad_w, need_w, grad_b, need_b, groups, sh, sw, ph, pw, dh, dw):
    """grad_w (K, C / groups, R, S)[k, c, r, s] = Σ_{n, oh, ow} grad[n, k, oh, ow] · x[n, g·C/groups + c,
    oh·sh − ph + r·dh, ow·sw − pw + s·dw] when need_w; grad_b (K,) = grad summed over n, oh, ow when need_b.
    One (k, c) slice per task: its R·S sums read grad[:, k] and x[:, channel] only."""
    k_out, cg = grad_w.shape[0], grad_w.shape[1]
    kh, kw = grad_w.shape[2], grad_w.shape[3]
    kg = k_out // groups
    h, width = x.shape[2], x.shape[3]
    oh_count, ow_count = grad.shape[2], grad.shape[3]
    bounds = valid_columns(width, ow_count, kw, sw, pw, dw)
    for p in numba.prange(k_out * cg):
        t = np.int64(p)
        k, cl = t // cg, t % cg
        c = k // kg * cg + cl
        acc = grad_w[k, cl]
        acc[:] = 0
        for n in range(grad.shape[0] if need_w else 0):
            gk, xc = grad[n, k], x[n, c]
            for oh in range(oh_count):
                gr = gk[oh]
                for r in range(kh):
                    ih = oh * sh - ph + r * dh
                    if ih < 0 or ih >= h:
                        continue
                    xr = xc[ih]
                    for s in range(kw):
                        lo, hi, offset = bounds[s, 0], bounds[s, 1], s * dw - pw
                        if lo >= hi:
                            continue
                        if sw == 1:
                            acc[r, s] += dot(gr[lo:hi], xr[lo + offset:hi + offset])
                        else:
                            acc[r, s] += dot(gr[lo:hi], taps(xr, lo, hi, sw, offset))
        if need_b and cl == 0:  # the bias gradient rides with one slice of its output channel
            total = grad.dtype.type(0)
            for n in range(grad.shape[0]):
                gk = grad[n, k]
                for oh in range(oh_count):
                    for ow in range(ow_count):
                        total += gk[oh, ow]
            grad_b[k] = total


def forward(x, weight, bias, stride, padding, dilation, groups):
    n, _, h, w = x.shape
    k, cg, kh, kw = weight.shape
    oh = output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = output_size(w, kw, stride[1], padding[1], dilation[1])
    out = x.new_empty((n, k, oh, ow))
    if out.numel() == 0:
        return out
    nb.threads_for(out.numel() * cg * kh * kw)
    _forward_kernel(nb.view(x), nb.view(weight), nb.view_or_absent(bias, x.dtype, 1), bias is not None,
                    out.numpy(), int(groups), *stride, *padding, *dilation)
    return out


def backward(grad, x, weight, stride, padding, dilation, groups, needs):
    need_x, need_w, need_b = needs
    k, cg, kh, kw = weight.shape
    work = grad.numel() * cg * kh * kw
    # An empty batch (or output) gives no terms: every gradient is zero, no kernel runs.
    empty = grad.numel() == 0 or x.numel() == 0
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = x.new_zeros(x.shape) if empty else x.new_empty(x.shape)
        if not empty:
            nb.threads_for(work)
            _backward_input_kernel(nb.view(grad), nb.view(weight), grad_x.numpy(), int(groups),
                                   *stride, *padding, *dilation)
    # The kernel sums valid taps only; torch's weight gradient multiplies the zero padding too,
    # and an infinite or NaN gradient times a padded 0 is NaN there: torch's own weight gradient
    # then, for torch's result (one pass over grad to find out, rather than padded taps in every
    # call), and the kernel computes the bias gradient alone.
    torch_weight = need_w and not empty and any(padding) and not bool(grad.isfinite().all())
    kernel_w = need_w and not torch_weight
    if kernel_w or need_b:
        grad_w = weight.new_zeros(weight.shape) if empty else weight.new_empty(weight.shape)
        grad_b = grad.new_zeros((k,)) if empty or not need_b else grad.new_empty((k,))
        if not empty:
            nb.threads_for(work)
            _backward_weight_kernel(nb.view(grad), nb.view(x), grad_w.numpy(), bool(kernel_w), grad_b.numpy(),
                                    bool(need_b), int(groups), *stride, *padding, *dilation)
        grad_w = grad_w if kernel_w else None
        grad_b = grad_b if need_b else None
    if torch_weight:
        grad_w = reference.backward(grad, x, weight, stride, padding, dilation, groups, (False, True, False))[1]
    return grad_x, grad_w, grad_b
