"""2-D max pooling: autograd.Function and per-backend dispatch.

Backend modules provide ``forward(x, kernel, stride, padding, dilation, ceil_mode)`` → (out,
indices) and ``backward(grad, indices, height, width, window=None)`` → grad_input, as documented in
reference.py. The forward keeps only the int64 indices for backward (torch keeps the same), and
hands backward its window (kernel, stride, padding, dilation), which the Triton gather walks.
"""

from __future__ import annotations

import torch

from fastml import _backend, _route
from fastml.ops import backward_backend, backward_class, in_custom_op_graph, keep_dispatch, shape_class, tracks_gradients
from fastml.ops.max_pool2d.reference import output_size  # noqa: F401  (part of the op's interface)

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode, backend):
        out, indices = impl(backend).forward(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.size = x.shape[2:]
        keep_dispatch(ctx, backend)
        ctx.window = (kernel, stride, padding, dilation)
        ctx.backward_key = backward_key(out, x, (kernel, stride, padding, dilation, ceil_mode))
        return out, indices

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad = grad.contiguous()

        def run(name):
            return impl(name).backward(grad, indices, *ctx.size, ctx.window)

        return run(backward_backend(ctx, grad, IMPLEMENTED, run)), None, None, None, None, None, None


def backward_key(out, x, args) -> tuple:
    """The backward's shape class: grad (out's shape), the input's shape and the arguments. The
    whole input's shape: a layer's family (fastml/_tune.py) leaves it out with the output's, and
    the family across layers keeps it, so that one holds a single class (the (H, W) alone would
    have made one family of the poolings of every channel count)."""
    return backward_class("max_pool2d", out, (out.shape, x.shape), *args)


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    """(out, indices) for contiguous x (N, C, H, W) on the selected backend; arguments as in
    reference.forward."""
    if in_custom_op_graph():
        return torch.ops.fastml.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    args = (kernel, stride, padding, dilation, ceil_mode)
    backend = _backend.select(x, IMPLEMENTED, shape_class("max_pool2d", "forward", (x,), *args),
                              lambda name: impl(name).forward(x, *args))
    if tracks_gradients(x):
        out, indices = MaxPool2dFunction.apply(x, kernel, stride, padding, dilation, ceil_mode, backend)
        if _route.watched():
            _route.report(backend, x, IMPLEMENTED, backward_key(out, x, args))
        return out, indices
    if _route.watched():
        _route.report(backend, x, IMPLEMENTED, None)
    return impl(backend).forward(x, kernel, stride, padding, dilation, ceil_mode)
