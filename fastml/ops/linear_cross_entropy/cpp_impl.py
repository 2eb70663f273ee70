"""Linear + cross-entropy on fastml._C; signatures as in reference.py.

Small heads (C·D up to _FUSED_MAX_WEIGHT elements: softmax regression, an MLP's last layer) run
csrc/linear_cross_entropy.cpp, the whole step in one call. Larger ones go chunk by chunk
(chunked.py): torch's BLAS for the three matrix products, csrc/cross_entropy.cpp for the rows.
"""

from __future__ import annotations

import torch

from fastml._cpp import REDUCTION_CODE, kernel, ptr, threads
from fastml.ops.cross_entropy import cpp_impl as rows_kernels
from fastml.ops.linear_cross_entropy import chunked

# Up to here a per-thread copy of the weight gradient stays in L2 (256 Ki elements = 1 MiB in
# float32) and the fused kernel's own dot products beat a BLAS call's overhead.
_FUSED_MAX_WEIGHT = 1 << 18


def forward(x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction,
            need_input_grad, need_weight_grad, need_bias_grad):
    n, d = x.shape
    c = weight.shape[0]
    if c * d > _FUSED_MAX_WEIGHT:
        return chunked.forward(rows_kernels, x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                               reduction, need_input_grad, need_weight_grad, need_bias_grad)
    reduced = reduction != "none"
    loss = torch.empty(() if reduced else (n,), dtype=x.dtype)
    grads = (need_input_grad, need_weight_grad, need_bias_grad) if reduced else (False, False, False)
    grad_x = torch.empty_like(x) if grads[0] else None
    grad_w = torch.empty_like(weight) if grads[1] else None
    grad_b = torch.empty(c, dtype=x.dtype) if grads[2] else None
    index, probs = (target, None) if target.dtype == torch.int64 else (None, target)
    bad, found = kernel("linear_cross_entropy_forward", x.dtype)(  # (it checks the targets and scales itself)
        ptr(x), ptr(weight), ptr(bias), ptr(index), ptr(probs), ptr(class_weight), n, d, c, ignore_index,
        float(label_smoothing), REDUCTION_CODE[reduction], ptr(None if reduced else loss),
        ptr(loss if reduced else None), ptr(grad_x), ptr(grad_w), ptr(grad_b), threads())
    if found:
        raise rows_kernels.out_of_bounds(bad)
    return loss, grad_x, grad_w, grad_b


def backward(x, weight, bias, target, class_weight, ignore_index, label_smoothing, grad_output,
             need_input_grad, need_weight_grad, need_bias_grad):
    return chunked.backward(rows_kernels, x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                            grad_output, need_input_grad, need_weight_grad, need_bias_grad)
