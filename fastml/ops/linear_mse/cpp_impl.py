"""Linear + squared loss on fastml._C (csrc/linear_mse.cpp); signatures as in reference.py."""

from __future__ import annotations

import torch

from fastml import _tune
from fastml._cpp import REDUCTION_CODE, kernel, l2_bytes, ptr, threads
from fastml.ops import shape_class


# How the kernel reads x's rows (csrc/kernels.h's LinearMseWay), by the name the measured choice
# gives each way; "reference" is its baseline, two passes over each row block from cache.
WAYS = {"reference": 0, "prefetch": 1, "stream": 2, "stream prefetch": 3}


def forward(x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual):
    """The kernel, reading x in row blocks (prefetching each next block in software, or leaving
    that to the CPU) or, for a lone output, streaming it in one pass (with or without a steady
    prefetch): a measured choice per shape class where x is larger than the L2 (the kernel streams
    it from memory; csrc/linear_mse.cpp says what each CPU made of each way). Within it (x is in
    cache) no prefetch, and a lone output's one pass: it does the blocks' arithmetic without their
    second read of each block, and its masked tails replace a scalar loop (on an Ice Lake Xeon 1.09x
    to 2.37x the blocks' speed at 256 x 2 to 8192 x 13, bench/results/cpu-intel-xeon-icelake-2c-linear-mse-ways.txt)."""
    if x.numel() * x.element_size() <= l2_bytes():  # (first: no closure for the course's batch of 10)
        return _forward(x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual,
                        "stream" if weight.shape[0] == 1 else "reference")

    def run(way):
        return _forward(x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual, way)

    ways = ("prefetch", "stream", "stream prefetch") if weight.shape[0] == 1 else ("prefetch",)
    return run(_tune.choose(shape_class("linear_mse way", "forward", (x, weight)), ways, x, run))


def _forward(x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual, way):
    n, d = x.shape
    o = weight.shape[0]
    def new(shape):  # torch.empty: ~0.3 µs cheaper than new_empty, which counts at batch 10
        return torch.empty(shape, dtype=x.dtype, device=x.device)

    loss = new((n, o)) if reduction == "none" else new(())
    residual = new((n, o)) if keep_residual else None
    fused_grads = reduction != "none"
    # empty_like: the cheapest allocation (~0.7 µs); weight and bias are contiguous here.
    grad_w = torch.empty_like(weight) if fused_grads and need_weight_grad else None
    grad_b = torch.empty_like(bias) if fused_grads and need_bias_grad else None
    kernel("linear_mse_forward", x.dtype)(
        ptr(x), ptr(weight), ptr(bias), ptr(target), n, d, o, REDUCTION_CODE[reduction],
        ptr(loss), ptr(residual), ptr(grad_w), ptr(grad_b), WAYS[way], threads())
    return loss, residual, grad_w, grad_b


def sgd_epoch(x, target, order, weight, bias, lr, batch_size):
    n, d = x.shape
    o = weight.shape[0]
    kernel("linear_regression_sgd_epoch", x.dtype)(
        ptr(x), ptr(target), ptr(order), n, d, o, ptr(weight), ptr(bias), float(lr), int(batch_size))
