"""Fused linear + softmax cross-entropy: autograd.Function and per-backend dispatch.

For "mean" / "sum" the forward pass returns the loss and, from the same logits, the input,
weight and bias gradients asked for; backward only scales them by the incoming gradient, so the
logits are never kept. For "none" backward runs the chunks again with the incoming gradient as
the per-row scale. Backend modules provide ``forward`` and ``backward`` as in reference.py.
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
    scaled_all,
    shape_class,
    tracks_gradients,
)
from fastml.ops.cross_entropy import gradient_in_torch_ops, loss_scale
from fastml.ops.cross_entropy import reference as rows_reference

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """x (N, D), weight (C, D), bias (C,) or None, target (N,) int64 or (N, C), contiguous."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction, backend):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        loss, grad_x, grad_w, grad_b = impl(backend).forward(
            x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction, need_x, need_w, need_b)
        ctx.save_for_backward(x, weight, bias, target, class_weight, grad_x, grad_w, grad_b)
        ctx.options = (ignore_index, label_smoothing, reduction)
        keep_dispatch(ctx, backend)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, target, class_weight, grad_x, grad_w, grad_b = ctx.saved_tensors
        ignore_index, label_smoothing, reduction = ctx.options
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        if backward_in_torch_ops(grad_output):
            grads = _gradients_in_torch_ops(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                            reduction, grad_output, needs)
        elif reduction == "none":
            grad_output = grad_output.contiguous()

            def run(name):
                return impl(name).backward(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                           grad_output, *needs)

            key = backward_key(x, weight, bias, target, class_weight, label_smoothing, needs)
            grads = run(backward_backend(ctx, grad_output, IMPLEMENTED, run, key))
        else:
            grads = scaled_all((grad_x, grad_w, grad_b), grad_output)
        return (*grads, None, None, None, None, None, None)


def backward_key(x, weight, bias, target, class_weight, label_smoothing, needs) -> tuple:
    """The shape class of the "none" reduction's backward."""
    return shape_class("linear_cross_entropy", "backward", (x, weight, bias, target, class_weight),
                       label_smoothing != 0, *needs)


def _gradients_in_torch_ops(x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction,
                            grad_output, needs):
    """The gradients from torch ops on the saved inputs, differentiable again (double backward)
    and batchable (vmap)."""
    n, c = x.shape[0], weight.shape[0]
    logits = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
    if reduction == "none":
        row_scale = grad_output.unsqueeze(1)
    else:
        row_scale = grad_output * loss_scale(rows_reference, reduction, target, class_weight, ignore_index, c, n)
    g = gradient_in_torch_ops(logits, target, class_weight, ignore_index, label_smoothing, row_scale)
    return (g @ weight if needs[0] else None, g.T @ x if needs[1] else None, g.sum(0) if needs[2] else None)


def linear_cross_entropy(x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction):
    """The loss for contiguous 2-D x, weight and (N,) or (N, C) target on the selected backend."""
    if in_custom_op_graph():
        need_x, need_w, need_b = needs_grad(x, weight, bias)
        return torch.ops.fastml.linear_cross_entropy(x, weight, bias, target, class_weight, ignore_index,
                                                     label_smoothing, reduction, need_x, need_w, need_b)[0]
    needs = _gradients_wanted(x, weight, bias)
    backend = _backend.select(x, IMPLEMENTED, _forward_class(x, weight, bias, target, class_weight, label_smoothing,
                                                             reduction, needs),
                              lambda name: impl(name).forward(x, weight, bias, target, class_weight, ignore_index,
                                                              label_smoothing, reduction, *needs))
    if _route.watched():  # "mean" / "sum" backward only scales the gradients formed going forward
        _route.report(backend, x, IMPLEMENTED, backward_key(x, weight, bias, target, class_weight, label_smoothing,
                                                            needs)
                      if reduction == "none" and tracks_gradients(x, weight, bias) else None)
    return on_backend(backend, x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction)


def on_backend(backend, x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction):
    """The loss on ``backend``, chosen already (by linear_cross_entropy, or the functional's
    settled route: fastml/_route.py's kernel_route), through the Function where gradients are
    tracked."""
    if tracks_gradients(x, weight, bias):
        return LinearCrossEntropyFunction.apply(x, weight, bias, target, class_weight, ignore_index,
                                                label_smoothing, reduction, backend)
    return impl(backend).forward(x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction,
                                 False, False, False)[0]


def decided_backend(x, weight, bias, target, class_weight, label_smoothing, reduction) -> str | None:
    """The backend linear_cross_entropy's measured choice chose for a call with these arguments,
    None where it has not decided (nothing is timed here)."""
    needs = _gradients_wanted(x, weight, bias)
    return _backend.decided(x, IMPLEMENTED, _forward_class(x, weight, bias, target, class_weight, label_smoothing,
                                                           reduction, needs))


def _gradients_wanted(x, weight, bias) -> tuple[bool, bool, bool]:
    """(input, weight, bias): whether the forward forms each gradient."""
    if not tracks_gradients(x, weight, bias):
        return False, False, False
    need_x, need_w, need_b = needs_grad(x, weight, bias)
    return need_x, need_w, need_b and bias is not None


def _forward_class(x, weight, bias, target, class_weight, label_smoothing, reduction, needs) -> tuple:
    """The forward's shape class, the key of its measured choice."""
    return shape_class("linear_cross_entropy", "forward", (x, weight, bias, target, class_weight),
                       label_smoothing != 0, reduction, *needs)
