"""Pure-PyTorch linear + squared loss: the oracle for every backend.

Shapes: x (N, D), weight (O, D), bias (O,) or None, target (N, O); reduction "mean", "sum" or
"none" with torch.nn.MSELoss's meaning (mean over all N·O elements).
"""

from __future__ import annotations

import torch


def forward(x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual):
    """→ (loss, residual, grad_weight, grad_bias).

    loss: 0-dim for "mean" / "sum", (N, O) for "none". residual = prediction - target (N, O),
    returned when ``keep_residual``. For "mean" / "sum", grad_weight (O, D) and grad_bias (O,) are
    d loss / d weight and d loss / d bias when asked for; for "none" they are None (the backward
    pass forms them from the residual and the incoming gradient).
    """
    pred = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)  # as torch's linear
    residual = pred - target
    kept = residual if keep_residual else None
    if reduction == "none":
        return residual.square(), kept, None, None
    loss = residual.square().mean() if reduction == "mean" else residual.square().sum()
    grad_w = grad_b = None
    if need_weight_grad or need_bias_grad:
        count = residual.numel()
        scale = (1.0 / count if reduction == "mean" else 1.0) if count else 0.0
        coef = residual * (2.0 * scale)
        grad_w = coef.T @ x if need_weight_grad else None
        grad_b = coef.sum(0) if need_bias_grad else None
    return loss, kept, grad_w, grad_b


def sgd_epoch(x, target, order, weight, bias, lr, batch_size):
    """One epoch of the course's minibatch SGD, in place: for each batch of ``order``,
    loss = sum((x w^T + b - y)^2 / 2), then w -= lr * grad / batch_size (also for a short last
    batch). x (N, D), target (N, O), order (N,) int64, weight (O, D), bias (O,) or None."""
    for start in range(0, x.shape[0], batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], target[idx]
        pred = xb @ weight.T
        if bias is not None:
            pred = pred + bias
        residual = pred - yb
        weight.sub_(residual.T @ xb, alpha=lr / batch_size)
        if bias is not None:
            bias.sub_(residual.sum(0), alpha=lr / batch_size)
