"""Softmax cross-entropy rows on numba; signatures and semantics as in reference.py.

Rows are independent: each thread takes a contiguous range of them. A row is read in up to three
sweeps: its maximum, then Σ exp(z - max) (the stable log-sum-exp), then one sweep that writes the
gradient and sums the loss terms, reading each logit before writing its gradient, so that grad may
be the logits themselves. A probability target's gradient needs A = Σ_c a_c first: one more
sweep, over the probabilities (and weights) alone. An index target's loss without smoothing needs
only its own class: no third sweep when the gradient is not wanted either.

Every value is computed in float64, float32 inputs included, and rounded once on its store: the
sums run over up to ~10^5 classes in program order (fastmath=False), where float32 would drift by
up to C·2^-24, and the row's cost is in its exp calls and memory traffic, not in the adds.

An ignored row (index target equal to ignore_index) gets loss 0 and a gradient of exact zeros,
whatever its scale (torch's gradient, also for a "mean" whose rows are all ignored), except where
its log-sum-exp is not finite: NaN there, as torch's.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from fastml import _numba as nb
from fastml._numba import jit, pjit, split_range
from fastml.ops.cross_entropy.reference import target_total

__all__ = ["rows", "target_total"]


@jit
def _log_normalizer(z, i):
    """(max, log Σ_c exp(z_ic - max)) of row i of z (M, C), in float64. NaN anywhere, a row of -inf
    or a +inf logit gives NaN, as torch's log_softmax does."""
    top = -math.inf
    for k in range(z.shape[1]):
        v = np.float64(z[i, k])
        if v > top:
            top = v
    total = 0.0
    for k in range(z.shape[1]):
        total += math.exp(np.float64(z[i, k]) - top)
    return top, math.log(total)


@jit
def _ignored_row_gradient(z, i, grad):
    """The gradient of ignored row i, as torch's: 0 times its softmax, so zeros where its
    log-sum-exp is finite and NaN everywhere where it is not (a NaN or +inf logit, or only -inf)."""
    if z.shape[1] == 0:
        return
    top, log_sum = _log_normalizer(z, i)
    grad[i, :] = 0.0 if math.isfinite(top + log_sum) else math.nan


@jit
def _index_row(z, i, t, w, weighted, keep, eps_c, w_sum, smooth_loss, scale, grad, write_grad):
    """ℓ_i for class t, writing scale · dℓ_i/dz_i into grad[i] when write_grad. keep = 1 - ε,
    eps_c = ε / C, w_sum = Σ_c w_c; smooth_loss: add the smoothing term to ℓ_i (ε > 0)."""
    w_t = np.float64(w[t]) if weighted else 1.0
    z_t = np.float64(z[i, t])  # read before the sweep below may overwrite it (grad is z in place)
    top, log_sum = _log_normalizer(z, i)
    loss = keep * (-((z_t - top) - log_sum) * w_t)
    if not (write_grad or smooth_loss):
        return loss
    a_total = keep * w_t + eps_c * w_sum  # A_i = Σ_c a_ic
    smooth = 0.0
    for k in range(z.shape[1]):
        w_k = np.float64(w[k]) if weighted else 1.0
        log_p = (np.float64(z[i, k]) - top) - log_sum
        if smooth_loss:
            smooth -= w_k * log_p
        if write_grad:
            grad[i, k] = scale * (a_total * math.exp(log_p) - eps_c * w_k)
    if write_grad:  # the target's coefficient also has (1 - ε) · w_t
        grad[i, t] = scale * (a_total * math.exp((z_t - top) - log_sum) - (keep * w_t + eps_c * w_t))
    if smooth_loss:  # only then: with ε = 0, torch never looks at the other classes (0 · -inf)
        loss += eps_c * smooth
    return loss


@jit
def _probability_row(z, i, p, w, weighted, keep, eps_c, scale, grad, write_grad):
    """ℓ_i for class probabilities p[i], writing scale · dℓ_i/dz_i into grad[i] when write_grad.
    keep = 1 - ε, eps_c = ε / C."""
    top, log_sum = _log_normalizer(z, i)
    a_total = 0.0
    if write_grad:
        for k in range(z.shape[1]):
            a_total += (np.float64(w[k]) if weighted else 1.0) * (keep * np.float64(p[i, k]) + eps_c)
    loss = 0.0
    for k in range(z.shape[1]):
        a = (np.float64(w[k]) if weighted else 1.0) * (keep * np.float64(p[i, k]) + eps_c)
        log_p = (np.float64(z[i, k]) - top) - log_sum
        loss -= a * log_p  # 0 · -inf is NaN here, as in torch's sum over every class
        if write_grad:
            grad[i, k] = scale * (a_total * math.exp(log_p) - a)
    return loss


@pjit
def _rows_kernel(z, index, probs, use_probs, w, weighted, ignore_index, keep, eps_c, smooth_loss,
                 scale, scales, per_row_scale, loss, write_loss, grad, write_grad, chunks):
    """z (M, C) logits; index (M,) int64 or probs (M, C) (use_probs); w (C,) class weights
    (weighted); scales (M,) per-row gradient scales (per_row_scale), else the float scale;
    loss (M,) (write_loss) and grad (M, C) (write_grad; may be z) written. Unused arrays are empty."""
    m, c = z.shape
    w_sum = np.float64(c)
    if weighted:
        w_sum = 0.0
        for k in range(c):
            w_sum += np.float64(w[k])
    for chunk in numba.prange(chunks):
        begin, end = split_range(m, chunks, chunk)
        for i in range(begin, end):
            s = np.float64(scales[i]) if per_row_scale else scale
            if use_probs:
                value = _probability_row(z, i, probs, w, weighted, keep, eps_c, s, grad, write_grad)
            elif index[i] == ignore_index:
                value = 0.0
                if write_grad:
                    _ignored_row_gradient(z, i, grad)
            else:
                value = _index_row(z, i, index[i], w, weighted, keep, eps_c, w_sum, smooth_loss, s, grad,
                                   write_grad)
            if write_loss:
                loss[i] = value


def rows(logits, target, class_weight, ignore_index, label_smoothing, grad_scale, row_loss, grad):
    m, c = logits.shape
    if m == 0 or (row_loss is None and grad is None):
        return
    dtype = logits.dtype
    use_probs = target.dtype != torch.int64
    per_row_scale = isinstance(grad_scale, torch.Tensor)
    eps = float(label_smoothing)
    # Rows are the unit of work, each worth C elements (a few exp calls apiece).
    chunks = nb.threads_for(m, max(1, nb.ELEMENTS_PER_THREAD // max(c, 1)))
    _rows_kernel(
        nb.view(logits),
        nb.absent(torch.int64, 1) if use_probs else nb.view(target.contiguous()),
        nb.view(target.to(dtype).contiguous()) if use_probs else nb.absent(dtype, 2), use_probs,
        nb.view_or_absent(None if class_weight is None else class_weight.to(dtype).contiguous(), dtype, 1),
        class_weight is not None,
        int(ignore_index), 1.0 - eps, eps / c if c else 0.0, eps > 0 and row_loss is not None,
        0.0 if per_row_scale else float(grad_scale),
        nb.view(grad_scale.to(dtype).contiguous()) if per_row_scale else nb.absent(dtype, 1), per_row_scale,
        nb.view_or_absent(row_loss, dtype, 1), row_loss is not None,
        nb.view_or_absent(grad, dtype, 2), grad is not None,
        chunks)
