"""2-D convolution: autograd.Function and per-backend dispatch.

Backend modules provide ``forward(x, weight, bias, stride, padding, dilation, groups)`` and
``backward(grad, x, weight, stride, padding, dilation, groups, needs)``, as documented in
reference.py. The forward saves its inputs only when a gradient is wanted.
"""

from __future__ import annotations

import torch

from fastml import _backend, _route
from fastml.ops import (backward_backend, backward_class, in_custom_op_graph, keep_dispatch, needs_grad, shape_class,
                        tracks_gradients)
from fastml.ops.conv2d.reference import output_size  # noqa: F401  (part of the op's interface)

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, backend):
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding, dilation, groups)
        keep_dispatch(ctx, backend)
        out = impl(backend).forward(x, weight, bias, stride, padding, dilation, groups)
        ctx.backward_key = backward_key(out, x, weight, ctx.args, tuple(ctx.needs_input_grad[:3]))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad, needs = grad.contiguous(), tuple(ctx.needs_input_grad[:3])
        backend = backward_backend(ctx, grad, IMPLEMENTED,
                                   lambda name: impl(name).backward(grad, x, weight, *ctx.args, needs))
        grads = impl(backend).backward(grad, x, weight, *ctx.args, needs)
        return (*grads, None, None, None, None, None)


def backward_key(out, x, weight, args, needs) -> tuple:
    """The backward's shape class: grad (out's shape), x, weight, the arguments and which
    gradients are wanted."""
    return backward_class("conv2d", x, (out.shape, x.shape, weight.shape), *args, needs)


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """The convolution of contiguous x (N, C, H, W) with weight (K, C / groups, R, S) on the
    selected backend; arguments as in reference.forward."""
    if in_custom_op_graph():
        return torch.ops.fastml.conv2d(x, weight, bias, stride, padding, dilation, groups)
    key = shape_class("conv2d", "forward", (x, weight, bias), stride, padding, dilation, groups)
    backend = _backend.select(x, IMPLEMENTED, key,
                              lambda name: impl(name).forward(x, weight, bias, stride, padding, dilation, groups))
    if tracks_gradients(x, weight, bias):
        out = Conv2dFunction.apply(x, weight, bias, stride, padding, dilation, groups, backend)
        if _route.watched():
            needs = needs_grad(x, weight, bias)
            _route.report(backend, x, IMPLEMENTED, backward_key(out, x, weight, (stride, padding, dilation, groups),
                                                                needs))
        return out
    if _route.watched():
        _route.report(backend, x, IMPLEMENTED, None)
    return impl(backend).forward(x, weight, bias, stride, padding, dilation, groups)
