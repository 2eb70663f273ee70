"""Pure-PyTorch linear + softmax cross-entropy: the oracle for every backend.

x (N, D), weight (C, D), bias (C,) or None; target (N,) int64 class indices or (N, C)
probabilities in x's dtype; class_weight (C,) or None; ignore_index an int; label_smoothing in
[0, 1]; reduction "mean", "sum" or "none" with torch.nn.functional.cross_entropy's meaning on the
logits x W^T + b (the row coefficients and loss scale of fastml.ops.cross_entropy.reference).

Backend modules provide ``forward`` and ``backward`` with these signatures.
"""

from __future__ import annotations

import torch

from fastml.ops.cross_entropy import loss_scale
from fastml.ops.cross_entropy import reference as rows_reference


def forward(x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction,
            need_input_grad, need_weight_grad, need_bias_grad):
    """→ (loss, grad_input, grad_weight, grad_bias).

    loss: 0-dim for "mean" / "sum", (N,) for "none". For "mean" / "sum" the gradients asked for
    are d loss / d x (N, D), d loss / d weight (C, D) and d loss / d bias (C,), computed in the
    same pass; for "none" they are None (``backward`` forms them from the incoming gradient).
    Raises IndexError for a class index out of range, as torch.
    """
    n, c = x.shape[0], weight.shape[0]
    scale = loss_scale(rows_reference, reduction, target, class_weight, ignore_index, c, n)
    logits = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
    row_loss = torch.empty(n, dtype=x.dtype, device=x.device)
    reduced = reduction != "none"
    want_grads = reduced and (need_input_grad or need_weight_grad or need_bias_grad)
    grad_logits = torch.empty_like(logits) if want_grads else None
    rows_reference.rows(logits, target, class_weight, ignore_index, label_smoothing,
                        scale, row_loss, grad_logits)
    loss = row_loss.sum() * scale if reduced else row_loss
    if not want_grads:
        return loss, None, None, None
    return (loss, *_linear_grads(grad_logits, x, weight, need_input_grad, need_weight_grad, need_bias_grad))


def backward(x, weight, bias, target, class_weight, ignore_index, label_smoothing, grad_output,
             need_input_grad, need_weight_grad, need_bias_grad):
    """Gradients of Σ_i grad_output[i] · ℓ_i (the "none" reduction's backward): grad_output (N,)
    → (grad_input, grad_weight, grad_bias), None for those not asked for."""
    logits = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
    rows_reference.rows(logits, target, class_weight, ignore_index, label_smoothing, grad_output, None, logits)
    return _linear_grads(logits, x, weight, need_input_grad, need_weight_grad, need_bias_grad)


def _linear_grads(grad_logits, x, weight, need_input_grad, need_weight_grad, need_bias_grad):
    return (grad_logits @ weight if need_input_grad else None,
            grad_logits.T @ x if need_weight_grad else None,
            grad_logits.sum(0) if need_bias_grad else None)
