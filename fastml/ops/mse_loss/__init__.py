"""Squared-error loss: autograd.Function and per-backend dispatch.

Backend modules provide ``forward(input, target, reduction, keep_diff)`` and
``backward(diff, grad, scale)`` (see reference.py) on contiguous, equally shaped tensors.
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
    shape_class,
    tracks_gradients,
)

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class MSELossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, reduction, backend):
        loss, diff = impl(backend).forward(input, target, reduction, keep_diff=True)
        ctx.scale = error_scale(reduction, input.numel())
        keep_dispatch(ctx, backend)
        ctx.backward_key = backward_key(input, loss)
        ctx.save_for_backward(input, target, diff)
        ctx.reduction, ctx.diff = reduction, diff  # for jvp (forward-mode AD)
        return loss

    @staticmethod
    def jvp(ctx, input_t, target_t, _, __):
        return squared_error_tangent(ctx.diff, input_t, target_t, ctx.reduction)

    @staticmethod
    def backward(ctx, grad):
        input, target, diff = ctx.saved_tensors
        need_input, need_target = ctx.needs_input_grad[:2]
        if backward_in_torch_ops(grad):  # recompute the difference so that autograd / vmap see it
            diff = input - target

        def run(name):
            return impl(name).backward(diff, grad, ctx.scale)

        grad_input = run(backward_backend(ctx, grad, IMPLEMENTED, run))
        return (grad_input if need_input else None), (-grad_input if need_target else None), None, None


def backward_key(input, loss) -> tuple:
    """The backward's shape class: the flat difference and the incoming gradient (the loss's shape)."""
    return backward_class("mse_loss", input, (input.shape, loss.shape))


def error_scale(reduction: str, count) -> float:
    """d(loss)/d(error) / error for ``count`` squared errors (2 for an empty "mean", whose
    gradient has no elements anyway)."""
    return 2.0 / count if reduction == "mean" and count else 2.0


def squared_error_tangent(diff, input_t, target_t, reduction):
    """Forward-mode derivative of the reduced (input - target)^2 along tangents (None = zero);
    ``diff`` = input - target."""
    moved = (0 if input_t is None else input_t) - (0 if target_t is None else target_t)
    elementwise = 2 * diff * moved
    if reduction == "none":
        return elementwise
    return elementwise.mean() if reduction == "mean" else elementwise.sum()


def memory_order(t: torch.Tensor) -> list[int] | None:
    """The order of t's dimensions by their strides, outermost first, in which a dense, permuted t
    (a transpose, channels-last) is contiguous, and in which torch's elementwise ops lay out the
    output of any t (a channel-sliced channels-last view, which is copied); None for a contiguous
    t, or one whose dimensions are in that order already."""
    if t.dim() < 2 or t.is_contiguous() or 0 in t.stride():
        return None  # (a broadcast input: torch's output takes the other operand's order, here contiguous)
    # (A size-1 dimension's stride is free; one equal to another's goes after it, as it lies in
    # a contiguous tensor: the loss of "none" then has the input's strides exactly.)
    order = sorted(range(t.dim()), key=lambda dim: (-t.stride(dim), t.size(dim) == 1))
    return None if order == list(range(t.dim())) else order


def mse_loss(input, target, reduction):
    """Dispatches equally shaped, same-dtype tensors to the selected backend. The kernels walk a
    dense input in its memory order, as torch's elementwise ops do: a permuted input is not
    copied, and "none" gives the loss the input's layout (strides), as torch's."""
    if in_custom_op_graph():
        return torch.ops.fastml.mse_loss(input, target, reduction, any(needs_grad(input, target)))[0]
    with_grad = tracks_gradients(input, target)  # the Function keeps the difference for backward
    key = shape_class("mse_loss", "forward", (input, target), reduction, with_grad)
    order = memory_order(input)
    if order is not None:
        input, target = input.permute(order), target.permute(order)
    shape = input.shape
    input, target = input.contiguous().reshape(-1), target.contiguous().reshape(-1)
    backend = _backend.select(input, IMPLEMENTED, key,
                              lambda name: impl(name).forward(input, target, reduction, keep_diff=with_grad))
    if with_grad:
        loss = MSELossFunction.apply(input, target, reduction, backend)
    else:
        loss = impl(backend).forward(input, target, reduction, keep_diff=False)[0]
    if _route.watched():
        _route.report(backend, input, IMPLEMENTED, backward_key(input, loss) if with_grad else None)
    if reduction != "none":
        return loss
    loss = loss.reshape(shape)
    return loss if order is None else loss.permute([order.index(dim) for dim in range(len(order))])
