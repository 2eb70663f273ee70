"""SGD on numba, the twin of csrc/sgd.cpp: one parallel loop for all tensors; signatures as in
reference.py.

Tensors reach the kernel as tables of data pointers and sizes (fastml._numba.array_at), so one
compiled kernel per dtype serves any number of tensors. Their concatenated elements are split
into one chunk per thread, chunk boundaries falling inside tensors as in the C++ kernel.
"""

from __future__ import annotations

import numba
import numpy as np

from fastml import _numba as nb
from fastml._numba import array_at, chunk_pieces, fma, jit, pjit, tensor_starts

PIECE = 2048  # elements per piece: a piece of p, g and buf is 24 KB of float32, in L1


@jit
def _plain_piece(p, g, begin, end, lr, weight_decay, sign, decay):
    """p -= lr * g' on [begin, end), g' the signed, decayed gradient. The choices are selects on
    loop-invariant flags, so the loop vectorises (a branch that changes which arrays a loop
    touches would stop it: those choices are separate functions or loops)."""
    p, g = p[begin:end], g[begin:end]  # indices from 0: provably non-negative, no wraparound
    for i in range(p.shape[0]):
        pi = p[i]
        d = sign * g[i]
        d = fma(weight_decay, pi, d) if decay else d  # rounded once, as torch's (csrc/sgd.cpp)
        p[i] = pi - lr * d


@jit
def _momentum_piece(p, g, buf, begin, end, lr, momentum, keep, weight_decay, sign, decay, nesterov, fresh):
    """_plain_piece with a momentum buffer (set to g' when ``fresh``); keep = 1 - dampening."""
    p, g, buf = p[begin:end], g[begin:end], buf[begin:end]
    for i in range(p.shape[0]):
        pi = p[i]
        d = sign * g[i]
        d = fma(weight_decay, pi, d) if decay else d  # rounded once, as torch's (csrc/sgd.cpp)
        b = d if fresh else buf[i] * momentum + keep * d
        buf[i] = b
        d = d + momentum * b if nesterov else b
        p[i] = pi - lr * d


@jit
def _zero_piece(g, begin, end):
    g[begin:end] = 0


@jit
def _sgd_tensor(p, g, buf, begin, end, lr, momentum, keep, weight_decay, sign, decay, nesterov, fresh, zero_grad):
    """Elements [begin, end) of one tensor, in L1-sized pieces so that zeroing the gradient
    after the update finds it still in cache."""
    for lo in range(begin, end, PIECE):
        hi = min(end, lo + PIECE)
        if buf.shape[0] > 0:
            _momentum_piece(p, g, buf, lo, hi, lr, momentum, keep, weight_decay, sign, decay, nesterov, fresh)
        else:
            _plain_piece(p, g, lo, hi, lr, weight_decay, sign, decay)
        if zero_grad:
            _zero_piece(g, lo, hi)


@pjit
def _sgd_kernel(param_at, grad_at, buf_at, sizes, fresh, like, lr, momentum, dampening,
                weight_decay, nesterov, maximize, zero_grad, chunks):
    """param_at, grad_at, buf_at: (T,) int64 data pointers (buf_at empty without momentum);
    sizes, fresh: (T,) int64; like: an empty array of the tensors' dtype."""
    starts = tensor_starts(sizes)
    scalar = like.dtype.type
    lr_, momentum_, keep, wd = scalar(lr), scalar(momentum), scalar(1.0 - dampening), scalar(weight_decay)
    sign = scalar(-1.0 if maximize else 1.0)
    with_momentum = momentum != 0
    for c in numba.prange(chunks):
        pieces = chunk_pieces(starts, chunks, c)
        for j in range(pieces.shape[0]):
            t, begin, end = pieces[j, 0], pieces[j, 1], pieces[j, 2]
            n = sizes[t]
            buf = array_at(buf_at[t], n, like) if with_momentum else like
            _sgd_tensor(array_at(param_at[t], n, like), array_at(grad_at[t], n, like), buf, begin, end,
                        lr_, momentum_, keep, wd, sign, weight_decay != 0, nesterov,
                        with_momentum and fresh[t] != 0, zero_grad)


@pjit
def _course_kernel(param_at, grad_at, sizes, like, lr, batch_size, chunks):
    starts = tensor_starts(sizes)
    rate, divisor = like.dtype.type(lr), like.dtype.type(batch_size)
    for c in numba.prange(chunks):
        pieces = chunk_pieces(starts, chunks, c)
        for j in range(pieces.shape[0]):
            t, begin, end = pieces[j, 0], pieces[j, 1], pieces[j, 2]
            p = array_at(param_at[t], sizes[t], like)[begin:end]
            g = array_at(grad_at[t], sizes[t], like)[begin:end]
            for i in range(p.shape[0]):
                p[i] = p[i] - rate * g[i] / divisor
            _zero_piece(g, 0, g.shape[0])  # `g[:] = 0` inline here left g unchanged (numba 0.68)


def sgd_step(params, grads, buffers, fresh, *, lr, momentum, dampening, weight_decay, nesterov,
             maximize, zero_grad):
    sizes = nb.sizes(params)
    with_momentum = momentum != 0
    like = nb.absent(params[0].dtype, 1)
    _sgd_kernel(nb.addresses(params), nb.addresses(grads),
                nb.addresses(buffers) if with_momentum else np.empty(0, np.int64), sizes,
                np.array(fresh, dtype=np.int64) if with_momentum else np.zeros(len(params), np.int64),
                like, float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov),
                bool(maximize), bool(zero_grad), nb.threads_for(int(sizes.sum()), nb.ELEMENTS_PER_THREAD))


def sgd_course_step(params, grads, *, lr, batch_size):
    sizes = nb.sizes(params)
    _course_kernel(nb.addresses(params), nb.addresses(grads), sizes, nb.absent(params[0].dtype, 1), float(lr),
                   float(batch_size), nb.threads_for(int(sizes.sum()), nb.ELEMENTS_PER_THREAD))
