"""Batch normalisation (training statistics, optional ReLU) on fastml._C (csrc/batch_norm.cpp);
signatures as in reference.py. Large outputs (the stem's 51 MB at ResNet's batch 16) go on
memory recycled from the previous step (fastml/_recycle.py) rather than fresh pages."""

from __future__ import annotations

import torch

from fastml import _recycle
from fastml._cpp import kernel, ptr, threads
from fastml.ops.batch_norm import reference


def _dims(x: torch.Tensor) -> tuple[int, int, int, bool]:
    n, c, h, w = x.shape
    return n, c, h * w, reference.layout_of(x) == torch.channels_last


def _like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of x's shape and layout, recycled where large."""
    n, c, h, w = x.shape
    strides = (h * w * c, 1, w * c, c) if reference.layout_of(x) == torch.channels_last else None
    return _recycle.empty((n, c, h, w), x.dtype, x.device, strides)


def forward(x, weight, bias, eps, relu):
    if x.numel() == 0:
        return reference.forward(x, weight, bias, eps, relu)
    n, c, l, channels_last = _dims(x)
    out = _like(x)
    stats = x.new_empty((3, c))
    kernel("batch_norm_forward", x.dtype)(x.data_ptr(), n, c, l, channels_last, ptr(weight), ptr(bias),
                                          float(eps), bool(relu), out.data_ptr(), stats.data_ptr(), threads())
    return out, stats


def backward(grad, x, weight, bias, stats, relu):
    if x.numel() == 0:
        return reference.backward(grad, x, weight, bias, stats, relu)
    n, c, l, channels_last = _dims(x)
    grad_input = _like(x)
    grad_weight = None if weight is None else x.new_empty(c)
    grad_bias = None if bias is None else x.new_empty(c)
    kernel("batch_norm_backward", x.dtype)(grad.data_ptr(), x.data_ptr(), n, c, l, channels_last, ptr(weight),
                                           ptr(bias), stats.data_ptr(), bool(relu), grad_input.data_ptr(),
                                           ptr(grad_weight), ptr(grad_bias), threads())
    return grad_input, grad_weight, grad_bias
