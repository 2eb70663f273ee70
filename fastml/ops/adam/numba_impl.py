"""Adam on numba, the twin of csrc/adam.cpp: one parallel loop for all tensors; signature as in
reference.py. Tensors arrive as tables of data pointers (see fastml/ops/sgd/numba_impl.py)."""

from __future__ import annotations

import math

import numba
import numpy as np

from fastml import _numba as nb
from fastml._numba import array_at, chunk_pieces, fma, jit, pjit, tensor_starts

PIECE = 2048  # elements per piece: its p, g, m, v (and vmax) stay in L1


@jit
def _moments(pi, gi, mi, vi, l2, lerp_weight, one_minus_w, beta2, one_minus_beta2, sign, l2_decay, low_weight):
    """One element's gradient (signed, L2-decayed) and new first and second moments."""
    d = sign * gi
    d = fma(l2, pi, d) if l2_decay else d  # rounded once, as torch's grad.add(param, alpha=...): csrc/adam.cpp
    m = mi + lerp_weight * (d - mi) if low_weight else d - (d - mi) * one_minus_w  # torch.lerp
    v = vi * beta2 + one_minus_beta2 * d * d
    return m, v


@jit
def _adam_piece(p, g, m, v, vmax, begin, end, decay, l2, lerp_weight, one_minus_w, beta2, one_minus_beta2,
                eps, sign, l2_decay, neg_step_size, bias2_sqrt):
    """Elements [begin, end) of one tensor; vmax is used (amsgrad) when it is not empty. Choices
    inside the loops are selects on loop-invariant flags, so both loops vectorise."""
    low_weight = abs(lerp_weight) < 0.5
    p, g, m, v = p[begin:end], g[begin:end], m[begin:end], v[begin:end]  # indices from 0: no wraparound
    if vmax.shape[0] > 0:
        vmax = vmax[begin:end]
        for i in range(p.shape[0]):
            pi = p[i] * decay
            mn, vn = _moments(pi, g[i], m[i], v[i], l2, lerp_weight, one_minus_w, beta2, one_minus_beta2, sign,
                              l2_decay, low_weight)
            m[i], v[i] = mn, vn
            old = vmax[i]
            second = old if (old > vn or old != old) else vn  # NaN propagates, as torch.maximum
            vmax[i] = second
            p[i] = pi + neg_step_size * mn / (math.sqrt(second) / bias2_sqrt + eps)
    else:
        for i in range(p.shape[0]):
            pi = p[i] * decay
            mn, vn = _moments(pi, g[i], m[i], v[i], l2, lerp_weight, one_minus_w, beta2, one_minus_beta2, sign,
                              l2_decay, low_weight)
            m[i], v[i] = mn, vn
            p[i] = pi + neg_step_size * mn / (math.sqrt(vn) / bias2_sqrt + eps)


@jit
def _adam_tensor(p, g, m, v, vmax, begin, end, decay, l2, lerp_weight, one_minus_w, beta2, one_minus_beta2, eps,
                 sign, l2_decay, neg_step_size, bias2_sqrt, zero_grad):
    """Elements [begin, end) of one tensor in L1-sized pieces, zeroing the gradient of each piece
    (still in cache) after its update when ``zero_grad``."""
    for lo in range(begin, end, PIECE):
        hi = min(end, lo + PIECE)
        _adam_piece(p, g, m, v, vmax, lo, hi, decay, l2, lerp_weight, one_minus_w, beta2, one_minus_beta2, eps,
                    sign, l2_decay, neg_step_size, bias2_sqrt)
        if zero_grad:
            g[lo:hi] = 0


@pjit
def _adam_kernel(param_at, grad_at, m_at, v_at, vmax_at, sizes, step_sizes, bias2_sqrts, like, lr, beta1,
                 beta2, eps, weight_decay, decoupled, amsgrad, maximize, zero_grad, chunks):
    """*_at: (T,) int64 data pointers (vmax_at empty without amsgrad); sizes (T,) int64;
    step_sizes, bias2_sqrts: (T,) float64; like: an empty array of the tensors' dtype."""
    starts = tensor_starts(sizes)
    scalar = like.dtype.type
    decays = weight_decay != 0
    decay = scalar(1.0 - lr * weight_decay) if decays and decoupled else scalar(1.0)
    l2, lerp_weight = scalar(weight_decay), scalar(1.0 - beta1)
    beta2_, one_minus_beta2, eps_ = scalar(beta2), scalar(1.0 - beta2), scalar(eps)
    sign = scalar(-1.0 if maximize else 1.0)
    for c in numba.prange(chunks):
        pieces = chunk_pieces(starts, chunks, c)
        for j in range(pieces.shape[0]):
            t, begin, end = pieces[j, 0], pieces[j, 1], pieces[j, 2]
            n = sizes[t]
            vmax = array_at(vmax_at[t], n, like) if amsgrad else like
            _adam_tensor(array_at(param_at[t], n, like), array_at(grad_at[t], n, like),
                         array_at(m_at[t], n, like), array_at(v_at[t], n, like), vmax, begin, end,
                         decay, l2, lerp_weight, scalar(1.0) - lerp_weight, beta2_, one_minus_beta2, eps_, sign,
                         decays and not decoupled, scalar(-step_sizes[t]), scalar(bias2_sqrts[t]), zero_grad)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bias2_sqrts, *, lr, beta1,
              beta2, eps, weight_decay, decoupled, amsgrad, maximize, zero_grad):
    sizes = nb.sizes(params)
    _adam_kernel(nb.addresses(params), nb.addresses(grads), nb.addresses(exp_avgs), nb.addresses(exp_avg_sqs),
                 nb.addresses(max_exp_avg_sqs) if amsgrad else np.empty(0, np.int64), sizes,
                 np.asarray(step_sizes, dtype=np.float64), np.asarray(bias2_sqrts, dtype=np.float64),
                 nb.absent(params[0].dtype, 1), float(lr), float(beta1), float(beta2), float(eps),
                 float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize), bool(zero_grad),
                 nb.threads_for(int(sizes.sum()), nb.ELEMENTS_PER_THREAD))
