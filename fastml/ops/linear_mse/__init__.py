"""Fused linear forward + squared loss: autograd.Function and per-backend dispatch.

For "mean" / "sum" the kernel returns the loss and, in the same pass over the input, the
gradients for weight and bias; backward only scales them by the incoming gradient. The input
and target gradients come from the residual (kept only when one of them is needed). For "none"
the backward pass forms every gradient from the residual with the linear op's kernels.

Backend modules provide ``forward`` and ``sgd_epoch`` with the signatures of reference.py.
"""

from __future__ import annotations

import torch

from fastml import _backend, _route
from fastml.ops import (
    backward_backend,
    backward_class,
    backward_in_torch_ops,
    in_custom_op_graph,
    keep_dispatch,
    needs_grad,
    scaled_all,
    shape_class,
    tracks_gradients,
)
from fastml.ops import linear as linear_op
from fastml.ops.mse_loss import error_scale, squared_error_tangent

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class LinearMSEFunction(torch.autograd.Function):
    """x (N, D), weight (O, D), bias (O,) or None, target (N, O), contiguous, same dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, reduction, backend):
        need_w, need_b, keep_residual = forward_flags(ctx.needs_input_grad[:4], bias is not None, reduction)
        loss, residual, grad_w, grad_b = impl(backend).forward(
            x, weight, bias, target, reduction, need_w, need_b, keep_residual)
        ctx.reduction = reduction
        keep_dispatch(ctx, backend)
        ctx.scale = error_scale(reduction, x.shape[0] * weight.shape[0])  # d(loss)/d(residual) / residual
        # The bias is not saved (as torch's addmm does not): its value is never needed again, so
        # changing it in place after the forward pass is allowed, as with torch's layers.
        ctx.save_for_backward(x, weight, target, residual, grad_w, grad_b)
        ctx.bias = bias
        ctx.primals = (x, weight, bias, target)  # for jvp (forward-mode AD)
        return loss

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, target_t, _, __):
        x, weight, bias, target = ctx.primals
        residual = impl("reference").forward(x, weight, bias, target, "none", False, False, True)[1]
        pred_t = linear_op.linear_tangent(x, weight, x_t, weight_t, bias_t)
        return squared_error_tangent(residual, pred_t, target_t, ctx.reduction)

    @staticmethod
    def backward(ctx, grad):
        x, weight, target, residual, grad_w, grad_b = ctx.saved_tensors
        need_x, need_w, need_b, need_t = ctx.needs_input_grad[:4]
        backend = None  # the measured choice, below, unless torch ops must run
        if backward_in_torch_ops(grad):
            # Rebuild the residual's graph from the inputs with torch ops, so that every gradient
            # below is itself differentiable (double backward) or batched (vmap); keep the values
            # from the forward pass where they were kept (saved + (fresh - fresh) is exactly saved).
            backend = "reference"
            fresh = linear_op.impl(backend).forward(x, weight, ctx.bias) - target
            residual = fresh if residual is None else residual + (fresh - fresh.detach())
            if ctx.reduction != "none":
                coef = residual * ctx.scale
                grad_w = coef.T @ x if need_w else None
                grad_b = coef.sum(0) if need_b else None
        if ctx.reduction != "none":
            grad_w, grad_b = scaled_all((grad_w if need_w else None, grad_b if need_b else None), grad)
            coef = residual * (ctx.scale * grad) if residual is not None else None
        else:
            coef = (2.0 * grad) * residual
            grad_w = grad_b = None
        weight_from_residual = ctx.reduction == "none" and (need_w or need_b)

        def run(name):  # the gradients the residual gives, by the linear op's kernels
            kernels = linear_op.impl(name)
            grads = kernels.backward_weight(coef, x, need_b) if weight_from_residual else (grad_w, grad_b)
            return (kernels.backward_input(coef, weight) if need_x else None), *grads

        grad_x = None
        if need_x or weight_from_residual:
            if backend is None:
                backend = backward_backend(ctx, grad, IMPLEMENTED, run,
                                           backward_key(x, weight, ctx.reduction, (need_x, need_w, need_b)))
            grad_x, grad_w, grad_b = run(backend)
            grad_w = grad_w if need_w else None
        grad_t = -coef if need_t else None
        return grad_x, grad_w, grad_b, grad_t, None, None


def backward_key(x, weight, reduction, needs) -> tuple:
    """The shape class of the backward's kernel work (the residual's gradients): the residual
    (N, O), weight, x, the reduction and which of x, weight, bias want a gradient."""
    return backward_class("linear_mse", x, ((x.shape[0], weight.shape[0]), weight.shape, x.shape), reduction, *needs)


def runs_backward_kernels(needs, reduction: str) -> bool:
    """Whether backward calls kernels: for the input's gradient, or the weight's under "none"
    (for "mean" / "sum" the weight and bias gradients come from the forward pass)."""
    need_x, need_w, need_b = needs
    return need_x or (reduction == "none" and (need_w or need_b))


def forward_flags(needs, has_bias: bool, reduction: str) -> tuple[bool, bool, bool]:
    """(need_weight_grad, need_bias_grad, keep_residual) for the kernels' forward, from which of
    (x, weight, bias, target) want a gradient: the forward pass prepares what backward needs."""
    need_x, need_w, need_b, need_t = needs
    need_b = need_b and has_bias
    return need_w, need_b, need_x or need_t or (reduction == "none" and (need_w or need_b))


def linear_mse(x, weight, bias, target, reduction):
    """Dispatches validated 2-D, same-dtype tensors to the selected backend."""
    if in_custom_op_graph():
        flags = forward_flags(needs_grad(x, weight, bias, target), bias is not None, reduction)
        return torch.ops.fastml.linear_mse(x, weight, bias, target, reduction, *flags)[0]
    with_grad = tracks_gradients(x, weight, bias, target)
    # Timed as the Function's forward runs: with the gradients its backward will want.
    flags = forward_flags(needs_grad(x, weight, bias, target), bias is not None, reduction) if with_grad else \
        (False, False, False)
    key = shape_class("linear_mse", "forward", (x, weight, bias, target), reduction, *flags)
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    backend = _backend.select(x, IMPLEMENTED, key,
                              lambda name: impl(name).forward(x, weight, bias, target, reduction, *flags))
    if _route.watched():
        needs = needs_grad(x, weight, bias)
        backward = with_grad and runs_backward_kernels(needs, reduction)
        _route.report(backend, x, IMPLEMENTED, backward_key(x, weight, reduction, needs) if backward else None)
    if with_grad:
        return LinearMSEFunction.apply(x, weight, bias, target, reduction, backend)
    return impl(backend).forward(x, weight, bias, target, reduction, False, False, False)[0]


def sgd_epoch(x, target, order, weight, bias, lr, batch_size):
    """One in-place epoch of minibatch SGD on contiguous tensors (see reference.sgd_epoch)."""
    def run(name):  # for timing: on copies of the parameters, which the epoch updates in place
        impl(name).sgd_epoch(x, target, order, weight.clone(), None if bias is None else bias.clone(), lr, batch_size)

    key = shape_class("sgd_epoch", "forward", (x, target, weight, bias), batch_size)
    impl(_backend.select(x, IMPLEMENTED, key, run)).sgd_epoch(x, target, order, weight, bias, lr, batch_size)
