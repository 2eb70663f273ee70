"""Conv + bias + ReLU + max-pool in one kernel: autograd.Function and per-backend dispatch.

Backend modules provide ``forward(x, weight, bias, stride, padding, dilation, groups,
pool_kernel, pool_stride)`` → (out, argmax) and ``backward(grad, argmax, x, weight, ...,
needs)``, as documented in reference.py. Backward keeps the int8 window offsets (-1 where the
ReLU blocks), never the pre-pool activation nor the output, which the caller may change in place.
"""

from __future__ import annotations

import torch

from fastml import _backend, _route
from fastml.ops import (backward_backend, backward_class, in_custom_op_graph, keep_dispatch, needs_grad, shape_class,
                        tracks_gradients)
from fastml.ops.conv2d_relu_max_pool2d.reference import pooled_size  # noqa: F401  (part of the interface)

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class Conv2dReLUMaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride, backend):
        out, argmax = impl(backend).forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel,
                                            pool_stride)
        ctx.save_for_backward(argmax, x, weight)
        ctx.args = (stride, padding, dilation, groups, pool_kernel, pool_stride)
        keep_dispatch(ctx, backend)
        ctx.backward_key = backward_key(out, x, weight, ctx.args, tuple(ctx.needs_input_grad[:3]))
        return out

    @staticmethod
    def backward(ctx, grad):
        # The backward may run on another backend than the forward did (each is chosen on its
        # own), and the kernels take raw pointers to contiguous tensors: torch's forward (the
        # reference) returns a channels-last out and argmax where the weight is channels-last.
        argmax, x, weight = (t.contiguous() for t in ctx.saved_tensors)
        grad, needs = grad.contiguous(), tuple(ctx.needs_input_grad[:3])

        def run(name):
            return impl(name).backward(grad, argmax, x, weight, *ctx.args, needs)

        return (*run(backward_backend(ctx, grad, IMPLEMENTED, run)), *([None] * 7))


def backward_key(out, x, weight, args, needs) -> tuple:
    """The backward's shape class: grad (out's shape), x, weight, the arguments and which
    gradients are wanted."""
    return backward_class("conv2d_relu_max_pool2d", x, (out.shape, x.shape, weight.shape), *args, needs)


def conv2d_relu_max_pool2d(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    """max_pool2d(relu(conv2d(x, weight, bias))) for contiguous x (N, C, H, W) on the selected
    backend; arguments as in reference.forward."""
    if in_custom_op_graph():
        return torch.ops.fastml.conv2d_relu_max_pool2d(x, weight, bias, stride, padding, dilation, groups, pool_kernel,
                                                       pool_stride)[0]
    args = (stride, padding, dilation, groups, pool_kernel, pool_stride)
    backend = _backend.select(x, IMPLEMENTED, shape_class("conv2d_relu_max_pool2d", "forward", (x, weight, bias), *args),
                              lambda name: impl(name).forward(x, weight, bias, *args))
    if tracks_gradients(x, weight, bias):
        out = Conv2dReLUMaxPool2dFunction.apply(x, weight, bias, stride, padding, dilation, groups, pool_kernel,
                                                pool_stride, backend)
        if _route.watched():
            _route.report(backend, x, IMPLEMENTED, backward_key(out, x, weight, args, needs_grad(x, weight, bias)))
        return out
    if _route.watched():
        _route.report(backend, x, IMPLEMENTED, None)
    return impl(backend).forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride)[0]
