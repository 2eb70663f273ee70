"""2-D max pooling: autograd.Function and per-backend dispatch.

Backend modules provide ``forward(x, kernel, stride, padding, dilation, ceil_mode)`` → (out,
indices) and ``backward(grad, indices, height, width)`` → grad_input, as documented in
reference.py. The forward keeps only the int64 indices for backward (torch keeps the same).
"""

from __future__ import annotations

import torch

from fastml import _backend
from fastml.ops import backward_backend, in_custom_op_graph, tracks_gradients
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
        ctx.backend, ctx.size = backend, x.shape[2:]
        return out, indices

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        (indices,) = ctx.saved_tensors
        backend = backward_backend(ctx.backend, grad)
        grad_input = impl(backend).backward(grad.contiguous(), indices, *ctx.size)
        return grad_input, None, None, None, None, None, None


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    """(out, indices) for contiguous x (N, C, H, W) on the selected backend; arguments as in
    reference.forward."""
    if in_custom_op_graph():
        return torch.ops.fastml.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    backend = _backend.select(x, IMPLEMENTED)
    if tracks_gradients(x):
        return MaxPool2dFunction.apply(x, kernel, stride, padding, dilation, ceil_mode, backend)
    return impl(backend).forward(x, kernel, stride, padding, dilation, ceil_mode)
