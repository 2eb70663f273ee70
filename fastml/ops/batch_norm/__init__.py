"""Batch normalisation over the batch's statistics (training mode), with an optional fused ReLU:
autograd.Function and per-backend dispatch.

Backend modules provide ``forward(x, weight, bias, eps, relu)`` → (out, stats) and
``backward(grad, x, weight, bias, stats, relu)`` → (grad_input, grad_weight, grad_bias), as
documented in reference.py, on a 4-D x that is contiguous or channels-last. The forward keeps x
and the (3, C) statistics for backward, as torch's keeps its input, mean and invstd; with the
ReLU fused, its output is not kept: backward recomputes the mask from x.
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
    shape_class,
    tracks_gradients,
)
from fastml.ops.batch_norm.reference import layout_of

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu, backend):
        out, stats = impl(backend).forward(x, weight, bias, eps, relu)
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.eps, ctx.relu = eps, relu
        keep_dispatch(ctx, backend)
        ctx.backward_key = backward_key(x, weight, bias, relu)
        return out, stats

    @staticmethod
    def backward(ctx, grad, _grad_stats):
        x, weight, bias, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if backward_in_torch_ops(grad):
            grads = differentiable_backward(grad, x, weight, bias, ctx.eps, ctx.relu, needs)
        else:
            grad = grad.contiguous(memory_format=layout_of(x))

            def run(name):
                return impl(name).backward(grad, x, weight, bias, stats, ctx.relu)

            grads = run(backward_backend(ctx, grad, IMPLEMENTED, run))
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


def differentiable_backward(grad, x, weight, bias, eps, relu, needs):
    """The gradients from torch ops on the saved inputs themselves (not detached copies), the
    batch statistics recomputed from x: a double backward (create_graph) then differentiates them
    with respect to x, weight and bias as well as to ``grad``."""
    from fastml.ops.batch_norm import reference

    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        out, _ = reference.forward(x, weight, bias, eps, relu)
        wanted = [t for t, need in zip((x, weight, bias), needs) if need]
        found = iter(torch.autograd.grad(out, wanted, grad, create_graph=create_graph))
    return tuple(next(found) if need else None for need in needs)


def backward_key(x, weight, bias, relu) -> tuple:
    """The backward's shape class: the gradient (x's shape, in x's layout), the affine parameters
    present, and the ReLU."""
    return backward_class("batch_norm", x, (x.shape,), layout_of(x) == torch.channels_last, weight is None,
                          bias is None, relu)


def batch_norm(x, weight, bias, eps, relu):
    """(out, stats) for a 4-D floating x, contiguous or channels-last, on the selected backend;
    arguments as in reference.forward."""
    if in_custom_op_graph():
        return torch.ops.fastml.batch_norm(x, weight, bias, eps, relu)
    channels_last = layout_of(x) == torch.channels_last
    key = shape_class("batch_norm", "forward", (x, weight, bias), channels_last, relu)
    backend = _backend.select(x, IMPLEMENTED, key, lambda name: impl(name).forward(x, weight, bias, eps, relu))
    if tracks_gradients(x, weight, bias):
        out, stats = BatchNormFunction.apply(x, weight, bias, eps, relu, backend)
        if _route.watched():
            _route.report(backend, x, IMPLEMENTED, backward_key(x, weight, bias, relu))
        return out, stats
    if _route.watched():
        _route.report(backend, x, IMPLEMENTED, None)
    return impl(backend).forward(x, weight, bias, eps, relu)
