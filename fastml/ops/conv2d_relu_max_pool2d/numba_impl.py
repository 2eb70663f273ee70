"""Fused conv + bias + ReLU + max-pool on numba; signatures and shapes as in reference.py.

Forward: the N·K output planes split into one contiguous range per thread. For each pooled row a
thread computes the pool_kernel[0] convolution rows that row's windows cover into its scratch
(conv2d's ``conv_row``, only the columns some window reads), applies ReLU there and pools them
with torch's rule (row by row, a value replacing the maximum when greater or NaN). The pre-pool
activation (N, K, OH, OW) is never stored; rows shared by overlapping windows (pool_stride[0] <
pool_kernel[0]) are recomputed.

Backward: one (n, k) plane per task rebuilds the gradient of the pre-ReLU activation from (grad,
argmax), each plane's windows added in row-major order (overlapping windows sum in a fixed
order), then conv2d's numba backward does the rest.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from fastml import _numba as nb
from fastml._numba import pjit
from fastml.ops.conv2d import numba_impl as conv_numba
from fastml.ops.conv2d.numba_impl import conv_row, valid_columns
from fastml.ops.conv2d.reference import output_size
from fastml.ops.conv2d_relu_max_pool2d.reference import empty_outputs


@pjit
def _forward_kernel(x, w, bias, has_bias, out, argmax, groups, sh, sw, ph, pw, dh, dw, pkh, pkw, psh, psw, chunks):
    """out (N, K, PH, PW) = max_pool(relu(conv(x (N, C, H, W), w (K, C / groups, R, S)) + bias (K,)));
    argmax (N, K, PH, PW) int8: i·pkw + j of each window's maximum, -1 where the ReLU passes no
    gradient (the maximum <= 0; a NaN passes). The N·K planes are split into
    ``chunks`` contiguous ranges, one per thread."""
    k_out, ph_count, pw_count = out.shape[1], out.shape[2], out.shape[3]
    cg, kg = w.shape[1], k_out // groups
    columns = (pw_count - 1) * psw + pkw  # conv columns any window reads (≤ OW)
    zero = x.dtype.type(0)
    bounds = valid_columns(x.shape[3], columns, w.shape[3], sw, pw, dw)
    # One scratch per chunk, allocated out here: the parallel body receives it as an argument, so
    # its row slices carry no reference counting (an array allocated inside the body costs an
    # atomic increment and decrement per slice, which doubled the time of these short rows).
    scratch = np.empty((chunks, pkh, columns), x.dtype)
    for t in numba.prange(chunks):
        begin, end = nb.split_range(out.shape[0] * k_out, chunks, t)
        rows = scratch[t]
        for plane in range(begin, end):
            n, k = plane // k_out, plane % k_out
            b = bias[k] if has_bias else zero
            c0 = k // kg * cg
            for pi in range(ph_count):
                for i in range(pkh):
                    row = rows[i]
                    conv_row(x[n], c0, w[k], b, pi * psh + i, row, bounds, sh, sw, ph, pw, dh, dw)
                    for j in range(columns):
                        if row[j] <= 0:  # torch's threshold: NaN passes through, -0 becomes 0
                            row[j] = zero
                for pj in range(pw_count):
                    j0 = pj * psw
                    best = x.dtype.type(-math.inf)
                    at = 0
                    for i in range(pkh):
                        for j in range(pkw):
                            v = rows[i, j0 + j]
                            if v > best or math.isnan(v):  # every NaN replaces, as in torch's max_pool2d
                                best, at = v, i * pkw + j
                    out[n, k, pi, pj] = best
                    argmax[n, k, pi, pj] = -1 if best <= 0 else at


@pjit
def _activation_grad_kernel(grad, argmax, grad_z, pkw, psh, psw):
    """grad_z (N, K, OH, OW) zeroed += grad (N, K, PH, PW) at each window's argmax, except where
    it is -1 (the ReLU passes nothing)."""
    k_out, ph_count, pw_count = grad.shape[1], grad.shape[2], grad.shape[3]
    for p in numba.prange(grad.shape[0] * k_out):
        t = np.int64(p)
        n, k = t // k_out, t % k_out
        g, a, gz = grad[n, k], argmax[n, k], grad_z[n, k]
        for pi in range(ph_count):
            for pj in range(pw_count):
                if a[pi, pj] >= 0:
                    at = np.int64(a[pi, pj])
                    gz[pi * psh + at // pkw, pj * psw + at % pkw] += g[pi, pj]


def forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    _, cg, kh, kw = weight.shape
    out, argmax = empty_outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride)
    if out.numel() == 0:
        return out, argmax
    chunks = nb.threads_for(out.numel() * pool_kernel[0] * pool_kernel[1] * cg * kh * kw)
    _forward_kernel(nb.view(x), nb.view(weight), nb.view_or_absent(bias, x.dtype, 1), bias is not None,
                    out.numpy(), argmax.numpy(), int(groups), *stride, *padding, *dilation, *pool_kernel,
                    *pool_stride, chunks)
    return out, argmax


def backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs):
    conv_size = tuple(output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d])
                      for d in range(2))
    grad_z = grad.new_zeros((grad.shape[0], grad.shape[1], *conv_size))
    if grad.numel() > 0:
        nb.threads_for(grad.numel())
        _activation_grad_kernel(nb.view(grad), nb.view(argmax), grad_z.numpy(), pool_kernel[1], *pool_stride)
    return conv_numba.backward(grad_z, x, weight, stride, padding, dilation, groups, needs)
