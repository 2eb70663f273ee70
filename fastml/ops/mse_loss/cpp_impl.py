"""Squared error on fastml._C (csrc/mse_loss.cpp); signatures as in reference.py."""

from __future__ import annotations

from fastml._cpp import REDUCTION_CODE, kernel, ptr, threads


def forward(input, target, reduction, keep_diff):
    loss = input.new_empty(input.shape if reduction == "none" else ())
    diff = input.new_empty(input.shape) if keep_diff else None
    kernel("mse_loss_forward", input.dtype)(ptr(input), ptr(target), input.numel(), REDUCTION_CODE[reduction],
                                            ptr(loss), ptr(diff), threads())
    return loss, diff


def backward(diff, grad, scale):
    grad = grad.contiguous()
    out = diff.new_empty(diff.shape)
    kernel("mse_loss_backward", diff.dtype)(ptr(diff), ptr(grad), 0 if grad.dim() == 0 else 1, float(scale),
                                            diff.numel(), ptr(out), threads())
    return out
