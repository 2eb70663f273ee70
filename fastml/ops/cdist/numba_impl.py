"""Pairwise distances on numba, the twin of csrc/cdist.cpp (without its register tiling);
signature as in reference.py. The per-pair sums carry only LLVM's reassoc flag (see
fastml/_numba.py), so they run in SIMD lanes; NaN and infinities propagate as in torch.cdist
(which passes NaN over in the maximum of p = inf)."""

from __future__ import annotations

import math

import numba

from fastml import _numba as nb
from fastml._numba import jit, pjit
from fastml.ops.cdist import norm_code

_sum_jit = nb._dot_jit


@_sum_jit
def squared_distance(x, i, y, j):
    """Σ_k (x[i, k] - y[j, k])²."""
    acc = x.dtype.type(0)
    for k in range(x.shape[1]):
        d = x[i, k] - y[j, k]
        acc += d * d
    return acc


@_sum_jit
def manhattan_distance(x, i, y, j):
    acc = x.dtype.type(0)
    for k in range(x.shape[1]):
        acc += abs(x[i, k] - y[j, k])
    return acc


@jit
def chebyshev_distance(x, i, y, j):
    acc = x.dtype.type(0)
    for k in range(x.shape[1]):
        a = abs(x[i, k] - y[j, k])
        if a > acc:  # a NaN coordinate is passed over, as in torch.cdist
            acc = a
    return acc


@jit
def ordering_distance(x, i, y, j, norm):
    """A value ordered as the distance (the square for euclidean: no square root per pair)."""
    if norm == 2:
        return squared_distance(x, i, y, j)
    if norm == 1:
        return manhattan_distance(x, i, y, j)
    return chebyshev_distance(x, i, y, j)


@jit
def finish(value, norm):
    return math.sqrt(value) if norm == 2 else value


@pjit
def _cdist_kernel(x1, x2, norm, out):
    """x1 (B, P, M), x2 (B, R, M), out (B, P, R)."""
    batch, n1 = x1.shape[0], x1.shape[1]
    for row in numba.prange(batch * n1):
        b, i = row // n1, row % n1
        for j in range(x2.shape[1]):
            out[b, i, j] = finish(ordering_distance(x1[b], i, x2[b], j, norm), norm)


def forward(x1, x2, p):
    out = x1.new_empty((x1.shape[0], x1.shape[1], x2.shape[1]))
    nb.threads_for(x1.shape[0] * x1.shape[1] * x2.shape[1] * max(1, x1.shape[2]))
    _cdist_kernel(nb.view(x1), nb.view(x2), norm_code(p), out.numpy())
    return out
