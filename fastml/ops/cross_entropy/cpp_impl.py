"""Softmax cross-entropy rows on fastml._C (csrc/cross_entropy.cpp); signatures as in reference.py."""

from __future__ import annotations

import torch

from fastml._cpp import REDUCTION_CODE, kernel, ptr, threads


def target_total(target, class_weight, ignore_index, num_classes):
    dtype = torch.float64 if class_weight is None else class_weight.dtype
    total, bad, found = kernel("cross_entropy_target_total", dtype)(
        ptr(target), ptr(class_weight), target.shape[0], num_classes, ignore_index)
    if found:
        raise out_of_bounds(bad)
    return total


def out_of_bounds(bad: int) -> IndexError:
    """torch's error for a class-index target outside [0, C) (the first such, ``bad``), as the
    kernels that check the targets report it."""
    return IndexError(f"Target {bad} is out of bounds.")


def rows(logits, target, class_weight, ignore_index, label_smoothing, grad_scale, row_loss, grad):
    m, c = logits.shape
    index, probs = (target, None) if target.dtype == torch.int64 else (None, target)
    per_row = isinstance(grad_scale, torch.Tensor)
    kernel("cross_entropy_rows", logits.dtype)(
        ptr(logits), ptr(index), ptr(probs), ptr(class_weight), m, c, ignore_index, float(label_smoothing),
        1.0 if per_row else float(grad_scale), ptr(grad_scale if per_row else None), ptr(row_loss), ptr(grad),
        threads())


def forward(logits, target, class_weight, ignore_index, label_smoothing, reduction, want_grad):
    """loss_and_gradient's (loss, scale, grad) in one kernel call (csrc/cross_entropy.cpp's
    cross_entropy_forward): the targets' check, the reduction's scale, the rows and the reduced
    loss. At 256 rows of 10 classes, torch's sum and multiply of the row losses and the separate
    check had cost more than the rows themselves."""
    m, c = logits.shape
    reduced = reduction != "none"
    loss = torch.empty(() if reduced else (m,), dtype=logits.dtype)
    grad = torch.empty_like(logits) if want_grad and reduced else None
    index, probs = (target, None) if target.dtype == torch.int64 else (None, target)
    scale, bad, found = kernel("cross_entropy_forward", logits.dtype)(
        ptr(logits), ptr(index), ptr(probs), ptr(class_weight), m, c, ignore_index, float(label_smoothing),
        REDUCTION_CODE[reduction], ptr(None if reduced else loss), ptr(loss if reduced else None), ptr(grad),
        threads())
    if found:
        raise out_of_bounds(bad)
    return loss, scale, grad
