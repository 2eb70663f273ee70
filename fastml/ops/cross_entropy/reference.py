"""Pure-PyTorch softmax cross-entropy over rows of logits: the oracle for every backend.

The kernels see logits z (M, C), one row per sample (and spatial position), and a target that is
either class indices (M,) int64 or class probabilities (M, C) in z's dtype. Every variant of
torch's cross_entropy is one formula with per-row class coefficients a (M, C):

    class index t, class weights w (ones when None), label smoothing ε:
        a = (1 - ε) · w_t · e_t + (ε / C) · w,       a = 0 for a row whose t is ignore_index
    class probabilities p:
        a = w ⊙ ((1 - ε) · p + ε / C)

    row loss      ℓ_i = Σ_c a_ic · (lse_i - z_ic),   lse_i = log Σ_c exp(z_ic)
    its gradient  dℓ_i / dz_i = A_i · softmax(z_i) - a_i,   A_i = Σ_c a_ic

The reduced loss is Σ_i ℓ_i · scale (see ``loss_scale``) for "mean" / "sum" and ℓ for "none".

Backend modules provide ``rows`` (the kernel) and ``target_total`` with these signatures.
"""

from __future__ import annotations

import torch


def target_total(target, class_weight, ignore_index, num_classes):
    """Σ of w[t_i] over the rows whose index target is not ``ignore_index`` (their count when
    ``class_weight`` is None), as a Python float: the "mean" reduction's divisor. Raises torch's
    IndexError for the first target outside [0, num_classes) that is not ignore_index."""
    kept = target != ignore_index
    valid = target[kept]
    bad = valid[(valid < 0) | (valid >= num_classes)]
    if bad.numel():  # the first in row order, as torch reports it
        raise IndexError(f"Target {int(bad[0])} is out of bounds.")
    if class_weight is None:
        return float(valid.numel())
    return float(class_weight.to(torch.float64)[valid].sum())


def loss_scale(reduction, target, class_weight, ignore_index, num_classes, rows):
    """The factor that turns Σ_i ℓ_i into the reduced loss: 1 for "sum" (and "none"), and for
    "mean" 1 / target_total for index targets (torch's weighted mean, NaN when every row is
    ignored) or 1 / M for probability targets (torch divides by the row count, weights or not)."""
    if reduction != "mean":
        return 1.0
    total = (target_total(target, class_weight, ignore_index, num_classes)
             if target.dtype == torch.int64 else float(rows))
    return 1.0 / total if total else float("nan")


def coefficients(logits, target, class_weight, ignore_index, label_smoothing):
    """The row coefficients a (M, C) of the module docstring, in logits' dtype."""
    m, c = logits.shape
    w = torch.ones(c, dtype=logits.dtype, device=logits.device) if class_weight is None else class_weight
    w = w.to(logits.dtype)
    if target.dtype == torch.int64:
        kept = target != ignore_index
        safe = torch.where(kept, target, torch.zeros_like(target))
        a = torch.zeros_like(logits)
        a.scatter_(1, safe.unsqueeze(1), ((1.0 - label_smoothing) * w[safe]).unsqueeze(1))
        a = a + (label_smoothing / c) * w
        return a * kept.unsqueeze(1).to(logits.dtype)
    return w * ((1.0 - label_smoothing) * target.to(logits.dtype) + label_smoothing / c)


def rows(logits, target, class_weight, ignore_index, label_smoothing, grad_scale, row_loss, grad):
    """The kernel: per-row loss and scaled gradient of softmax cross-entropy.

    logits (M, C); target (M,) int64 indices (each in [0, C) or ignore_index: callers check with
    target_total first) or (M, C) probabilities; class_weight (C,) or None; label_smoothing in
    [0, 1]. Writes row_loss[i] = ℓ_i into row_loss (M,) when it is given, and
    grad[i] = s_i · dℓ_i/dz_i into grad (M, C) when it is given, with s_i = grad_scale[i] for a
    tensor grad_scale (M,) or the float grad_scale itself. grad may be logits (in place).
    """
    z = logits.double() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    a = coefficients(z, target, class_weight, ignore_index, label_smoothing)
    log_p = torch.log_softmax(z, dim=1)
    if row_loss is not None:
        row_loss.copy_(_row_losses(z, log_p, a, target, class_weight, ignore_index, label_smoothing))
    if grad is not None:
        scale = grad_scale.unsqueeze(1) if isinstance(grad_scale, torch.Tensor) else grad_scale
        grad.copy_(scaled_gradient(log_p.exp(), a, target, ignore_index, scale))


def scaled_gradient(softmax, a, target, ignore_index, scale):
    """(A · softmax - a) · scale, and 0 · softmax on ignored rows whatever the scale: exactly 0
    (torch's gradient, also when every row is ignored and the "mean" divides 0 by 0), except NaN
    on a row whose log-sum-exp is not finite (a NaN or +inf logit, or only -inf ones), where
    torch's log_softmax is NaN and its backward multiplies it by the row's zero gradient."""
    grad = (a.sum(1, keepdim=True) * softmax - a) * scale
    if target.dtype == torch.int64:
        grad = torch.where((target != ignore_index).unsqueeze(1), grad, softmax * 0)
    return grad


def _row_losses(z, log_p, a, target, class_weight, ignore_index, label_smoothing):
    """ℓ (M,), summing the terms torch sums, so that a class of zero coefficient at a logit of
    -inf gives torch's NaN where torch multiplies 0 by -inf (probabilities, smoothing) and
    nothing where torch never looks at it (the other classes of an index target)."""
    if target.dtype != torch.int64:
        return -(a * log_p).sum(1)
    c = z.shape[1]
    kept = target != ignore_index
    safe = torch.where(kept, target, torch.zeros_like(target))
    w = torch.ones(c, dtype=z.dtype, device=z.device) if class_weight is None else class_weight.to(z.dtype)
    nll = torch.where(kept, -log_p.gather(1, safe.unsqueeze(1)).squeeze(1) * w[safe], torch.zeros_like(z[:, 0]))
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing > 0:
        smooth = torch.where(kept, -(log_p * w).sum(1), torch.zeros_like(nll))
        loss = loss + (label_smoothing / c) * smooth
    return loss
