"""2-D convolution: autograd.Function and per-backend dispatch.

Backend modules provide ``forward(x, weight, bias, stride, padding, dilation, groups)`` and
``backward(grad, x, weight, stride, padding, dilation, groups, needs)``, as documented in
reference.py. The forward saves its inputs only when a gradient is wanted.
"""

from __future__ import annotations

import torch

from fastml import _backend
from fastml.ops import backward_backend, forced_backend, in_custom_op_graph, shape_class, tracks_gradients
from fastml.ops.conv2d.reference import output_size  # noqa: F401  (part of the op's interface)

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, backend):
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.backend, ctx.forced = (stride, padding, dilation, groups), backend, forced_backend()
        return impl(backend).forward(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad, needs = grad.contiguous(), tuple(ctx.needs_input_grad[:3])
        key = shape_class("conv2d", "backward", (grad, x, weight), *ctx.args, needs)
        backend = backward_backend(ctx, grad, IMPLEMENTED, key,
                                   lambda name: impl(name).backward(grad, x, weight, *ctx.args, needs))
        grads = impl(backend).backward(grad, x, weight, *ctx.args, needs)
        return (*grads, None, None, None, None, None)


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """The convolution of contiguous x (N, C, H, W) with weight (K, C / groups, R, S) on the
    selected backend; arguments as in reference.forward."""
    if in_custom_op_graph():
        return torch.ops.fastml.conv2d(x, weight, bias, stride, padding, dilation, groups)
    key = shape_class("conv2d", "forward", (x, weight, bias), stride, padding, dilation, groups)
    backend = _backend.select(x, IMPLEMENTED, key,
                              lambda name: impl(name).forward(x, weight, bias, stride, padding, dilation, groups))
    if tracks_gradients(x, weight, bias):
        return Conv2dFunction.apply(x, weight, bias, stride, padding, dilation, groups, backend)
    return impl(backend).forward(x, weight, bias, stride, padding, dilation, groups)
