"""Softmax cross-entropy over rows of logits: autograd.Function and per-backend dispatch.

For "mean" / "sum" the kernel returns each row's loss and, in the same pass, the logits'
gradient, which backward only scales by the incoming gradient. For "none" backward runs the
kernel again with the incoming gradient as per-row scale. Backend modules provide ``rows`` and
``target_total`` as documented in reference.py, and may provide ``forward``, the whole of
``loss_and_gradient`` in one call (cpp_impl.py).
"""

from __future__ import annotations

import torch

from fastml import _backend, _route
from fastml.ops import (
    backward_backend,
    backward_in_torch_ops,
    in_custom_op_graph,
    keep_dispatch,
    needs_grad,
    scaled,
    shape_class,
    tracks_gradients,
)
from fastml.ops.cross_entropy.reference import coefficients, scaled_gradient

IMPLEMENTED = ("triton", "cpp", "numba", "reference")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def impl(backend: str):
    return _backend.load(__name__, backend)


def loss_scale(kernels, reduction, target, class_weight, ignore_index, num_classes, num_rows):
    """Σ_i ℓ_i → reduced loss (reference.loss_scale), with the index check on the backend."""
    if target.dtype == torch.int64:
        total = kernels.target_total(target, class_weight, ignore_index, num_classes)  # validates
    else:
        total = float(num_rows)
    if reduction != "mean":
        return 1.0
    if isinstance(total, torch.Tensor):  # kept on the device: 1 / 0 = inf makes the loss 0 · inf = NaN
        return total.reciprocal()
    return 1.0 / total if total else float("nan")


def accumulation_dtype(dtype):
    """float32 for float16 / bfloat16, else the dtype itself."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def row_loss_buffer(logits):
    """Per-row losses in the accumulation dtype."""
    return torch.empty(logits.shape[0], dtype=accumulation_dtype(logits.dtype), device=logits.device)


def reduce_rows(row_loss, scale, reduction, dtype):
    """The loss of a reduction from the per-row losses, in the logits' dtype."""
    if reduction == "none":
        loss = row_loss
    elif isinstance(scale, float):
        loss = row_loss.sum().mul_(scale)  # in place on the fresh sum: one allocation, not two
    else:
        loss = row_loss.sum() * scale
    return loss if loss.dtype == dtype else loss.to(dtype)


def gradient_in_torch_ops(logits, target, class_weight, ignore_index, label_smoothing, scale):
    """dℓ/dz · scale from torch ops (differentiable, vmap-able): for double backward."""
    a = coefficients(logits, target, class_weight, ignore_index, label_smoothing)
    return scaled_gradient(torch.softmax(logits, 1), a, target, ignore_index, scale)


def loss_and_gradient(kernels, logits, target, class_weight, ignore_index, label_smoothing, reduction, want_grad):
    """(loss, its scale, the logits' gradient for "mean" / "sum" when want_grad, else None) from
    one pass of the backend's row kernel: the backend's own ``forward`` where it has one (the
    check, the rows and the sum in one call), else its target_total, rows and torch's sum."""
    forward = getattr(kernels, "forward", None)
    if forward is not None:
        return forward(logits, target, class_weight, ignore_index, label_smoothing, reduction, want_grad)
    m, c = logits.shape
    scale = loss_scale(kernels, reduction, target, class_weight, ignore_index, c, m)
    row_loss = row_loss_buffer(logits)
    grad = torch.empty_like(logits) if want_grad and reduction != "none" else None
    kernels.rows(logits, target, class_weight, ignore_index, label_smoothing, scale, row_loss, grad)
    return reduce_rows(row_loss, scale, reduction, logits.dtype), scale, grad


class CrossEntropyFunction(torch.autograd.Function):
    """logits (M, C) and target (M,) int64 or (M, C) probabilities, contiguous; class_weight (C,)
    or None. Gradients flow to logits and to probability targets."""

    @staticmethod
    def forward(ctx, logits, target, class_weight, ignore_index, label_smoothing, reduction, backend):
        loss, scale, grad = loss_and_gradient(impl(backend), logits, target, class_weight, ignore_index,
                                              label_smoothing, reduction, ctx.needs_input_grad[0])
        ctx.save_for_backward(logits, target, class_weight, grad)
        ctx.options = (ignore_index, label_smoothing, reduction, scale)
        keep_dispatch(ctx, backend)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        logits, target, class_weight, grad = ctx.saved_tensors
        ignore_index, label_smoothing, reduction, scale = ctx.options
        need_logits, need_target = ctx.needs_input_grad[:2]
        grad_logits = grad_target = None
        if need_logits and backward_in_torch_ops(grad_output):
            grad_logits = gradient_in_torch_ops(logits, target, class_weight, ignore_index, label_smoothing,
                                                row_scale(grad_output, reduction, scale))
        elif need_logits and reduction == "none":
            def run(name):
                return row_gradients(impl(name), logits, target, class_weight, ignore_index, label_smoothing,
                                     grad_output)

            grad_logits = run(backward_backend(ctx, grad_output, IMPLEMENTED, run,
                                               backward_key(logits, target, class_weight, label_smoothing)))
        elif need_logits:
            grad_logits = scaled(grad, grad_output)
        if need_target:
            grad_target = target_gradient(logits, class_weight, label_smoothing,
                                          row_scale(grad_output, reduction, scale))
        return grad_logits, grad_target, None, None, None, None, None


def row_scale(grad_output, reduction, scale):
    """What each row's gradient is scaled by: grad_output (M,) as a column for "none", else the
    scalar grad_output times the loss's scale. Formed only where a gradient needs it (a torch
    op: ~1.5 us of a 10-class batch's backward, which the usual mean loss's logit gradient,
    formed going forward, does not)."""
    return grad_output.unsqueeze(1) if reduction == "none" else grad_output * scale


def row_gradients(kernels, logits, target, class_weight, ignore_index, label_smoothing, grad_output):
    """The logits' gradient of Σ_i grad_output[i] · ℓ_i (the "none" reduction's backward), from
    the backend's row kernel with grad_output (M,) as the per-row scale."""
    grad_logits = torch.empty_like(logits)
    kernels.rows(logits, target, class_weight, ignore_index, label_smoothing,
                 grad_output.contiguous().to(accumulation_dtype(logits.dtype)), None, grad_logits)
    return grad_logits


def backward_key(logits, target, class_weight, label_smoothing) -> tuple:
    """The shape class of the "none" reduction's backward (the only one that runs a kernel)."""
    return shape_class("cross_entropy", "backward", (logits, target, class_weight), label_smoothing != 0)


def target_gradient(logits, class_weight, label_smoothing, per_row):
    """The gradient of probability targets, dℓ/dp = -(1 - ε) · w · log softmax(z), times per_row
    (M, 1) or a scalar: in torch ops."""
    w = 1.0 if class_weight is None else class_weight
    return -(1.0 - label_smoothing) * w * torch.log_softmax(logits, 1) * per_row


def cross_entropy(logits, target, class_weight, ignore_index, label_smoothing, reduction):
    """The loss for contiguous logits (M, C) and target on the selected backend."""
    if in_custom_op_graph():
        want_grad = needs_grad(logits)[0] and reduction != "none"
        return torch.ops.fastml.cross_entropy(logits, target, class_weight, ignore_index, label_smoothing, reduction,
                                              want_grad)[0]
    with_grad = tracks_gradients(logits, target)
    key = shape_class("cross_entropy", "forward", (logits, target, class_weight), label_smoothing != 0, reduction,
                      with_grad)
    backend = _backend.select(logits, IMPLEMENTED, key, lambda name: loss_and_gradient(
        impl(name), logits, target, class_weight, ignore_index, label_smoothing, reduction, with_grad))
    if _route.watched():  # "mean" / "sum" backward only scales the gradient formed going forward
        backward = with_grad and reduction == "none" and needs_grad(logits)[0]
        _route.report(backend, logits, IMPLEMENTED,
                      backward_key(logits, target, class_weight, label_smoothing) if backward else None)
    if with_grad:
        return CrossEntropyFunction.apply(logits, target, class_weight, ignore_index, label_smoothing,
                                          reduction, backend)
    return loss_and_gradient(impl(backend), logits, target, class_weight, ignore_index, label_smoothing, reduction,
                             False)[0]
