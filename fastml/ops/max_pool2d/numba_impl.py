"""2-D max pooling on numba, the twin of csrc/max_pool2d.cpp: one (n, c) plane per task, each
window scanned row by row with reference.py's rules (greater or NaN replaces the maximum, padding
skipped); signatures as in reference.py."""

from __future__ import annotations

import math

import numba

from fastml import _numba as nb
from fastml._numba import jit, pjit
from fastml.ops.max_pool2d.reference import empty_outputs


@jit
def _pool_plane(x, out, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    """x (H, W) → out, idx (OH, OW) for one plane."""
    h, w = x.shape
    for oi in range(out.shape[0]):
        h0 = oi * sh - ph
        for oj in range(out.shape[1]):
            w0 = oj * sw - pw
            best = x.dtype.type(-math.inf)
            at = -1  # < 0 until the first element inside the input, which is always taken
            for i in range(kh):
                ih = h0 + i * dh
                if ih < 0 or ih >= h:
                    continue
                for j in range(kw):
                    iw = w0 + j * dw
                    if iw < 0 or iw >= w:
                        continue
                    v = x[ih, iw]
                    if at < 0 or v > best or v != v:
                        best, at = v, ih * w + iw
            out[oi, oj] = best
            idx[oi, oj] = at


@pjit
def _forward_kernel(x, out, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    """x (P, H, W), out / idx (P, OH, OW): planes are independent."""
    for p in numba.prange(x.shape[0]):
        _pool_plane(x[p], out[p], idx[p], kh, kw, sh, sw, ph, pw, dh, dw)


@pjit
def _backward_kernel(grad, idx, grad_input):
    """grad / idx (P, OH·OW), grad_input (P, H·W) zeroed. One plane per task, its outputs added in
    row-major order, so overlapping windows sum in a fixed order whatever the thread count."""
    for p in numba.prange(grad.shape[0]):
        g, at, gi = grad[p], idx[p], grad_input[p]
        for o in range(g.shape[0]):
            if at[o] >= 0:  # -1: a window with no element inside the input
                gi[at[o]] += g[o]


def forward(x, kernel, stride, padding, dilation, ceil_mode):
    out, indices = empty_outputs(x, kernel, stride, padding, dilation, ceil_mode)
    n, c, oh, ow = out.shape
    h, w = x.shape[2:]
    if out.numel() == 0:
        return out, indices
    nb.threads_for(out.numel() * kernel[0] * kernel[1])
    _forward_kernel(nb.view(x).reshape(n * c, h, w), out.numpy().reshape(n * c, oh, ow),
                    indices.numpy().reshape(n * c, oh, ow), *kernel, *stride, *padding, *dilation)
    return out, indices


def backward(grad, indices, height, width, window=None):  # window: unused by a scatter (reference.py)
    n, c = grad.shape[:2]
    grad_input = grad.new_zeros((n, c, height, width))
    if grad.numel() == 0 or grad_input.numel() == 0:
        return grad_input
    nb.threads_for(grad.numel())
    _backward_kernel(nb.view(grad).reshape(n * c, -1), nb.view(indices).reshape(n * c, -1),
                     grad_input.numpy().reshape(n * c, -1))
    return grad_input
