"""Linear layer y = x W^T + b: autograd.Function and per-backend dispatch.

Every backend module (reference, cpp_impl, numba_impl, triton_impl) provides
``forward(x, weight, bias)``, ``backward_input(grad, weight)`` and
``backward_weight(grad, x, need_bias)`` on contiguous 2-D tensors (see reference.py).
"""

from __future__ import annotations

import torch

from fastml import _backend, _route
from fastml.ops import (backward_backend, backward_class, in_custom_op_graph, keep_dispatch, needs_grad, shape_class,
                        tracks_gradients)

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class LinearFunction(torch.autograd.Function):
    """x (N, D), weight (O, D), bias (O,) or None, all contiguous → (N, O)."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        keep_dispatch(ctx, backend)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.backward_key = backward_key(x, weight, (need_x, need_w, need_b and ctx.has_bias))
        ctx.primals = (x, weight)  # for jvp (forward-mode AD)
        return impl(backend).forward(x, weight, bias)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _):
        x, weight = ctx.primals
        return linear_tangent(x, weight, x_t, weight_t, bias_t)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias

        def run(name):
            return backward_on(name, grad, x, weight, need_x, need_w, need_b)

        return (*run(backward_backend(ctx, grad, IMPLEMENTED, run)), None)


def backward_on(name: str, grad, x, weight, need_x: bool, need_w: bool, need_b: bool) -> tuple:
    """(grad_x, grad_weight, grad_bias) of x W^T + b on backend ``name``, None where not asked."""
    kernels = impl(name)
    grad_x = kernels.backward_input(grad, weight) if need_x else None
    grad_w = grad_b = None
    if need_w or need_b:
        grad_w, grad_b = kernels.backward_weight(grad, x, need_b)
    return grad_x, (grad_w if need_w else None), grad_b


def backward_key(x, weight, needs) -> tuple:
    """The backward's shape class: grad (N, O) and weight, which gradients are wanted."""
    return backward_class("linear", x, ((x.shape[0], weight.shape[0]), weight.shape), *needs)


def linear_tangent(x, weight, x_t, weight_t, bias_t) -> torch.Tensor:
    """Forward-mode derivative of x W^T + b along tangents (None = zero), with torch ops."""
    out = x.new_zeros(x.shape[0], weight.shape[0])
    if x_t is not None:
        out = out + x_t @ weight.T
    if weight_t is not None:
        out = out + x @ weight_t.T
    if bias_t is not None:
        out = out + bias_t
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dispatches a validated, 2-D linear layer to the selected backend."""
    if in_custom_op_graph():
        return torch.ops.fastml.linear(x, weight, bias)
    key = shape_class("linear", "forward", (x, weight, bias))
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    backend = _backend.select(x, IMPLEMENTED, key, lambda name: impl(name).forward(x, weight, bias))
    if tracks_gradients(x, weight, bias):
        if _route.watched():
            _route.report(backend, x, IMPLEMENTED, backward_key(x, weight, needs_grad(x, weight, bias)))
        return LinearFunction.apply(x, weight, bias, backend)
    if _route.watched():
        _route.report(backend, x, IMPLEMENTED, None)
    return impl(backend).forward(x, weight, bias)
