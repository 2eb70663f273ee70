"""Squared-error loss: autograd.Function and per-backend dispatch.

Backend modules provide ``forward(input, target, reduction, keep_diff)`` and
``backward(diff, grad, scale)`` (see reference.py) on contiguous, equally shaped tensors.
"""

from __future__ import annotations

import torch

from fastml import _backend

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


class MSELossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, reduction, backend):
        loss, diff = impl(backend).forward(input, target, reduction, keep_diff=True)
        count = input.numel()
        ctx.scale = 2.0 / count if reduction == "mean" and count else 2.0
        ctx.backend = backend
        ctx.save_for_backward(input, target, diff)
        return loss

    @staticmethod
    def backward(ctx, grad):
        input, target, diff = ctx.saved_tensors
        need_input, need_target = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: differentiable torch ops, for double backward
            grad_input = impl("reference").backward(input - target, grad, ctx.scale)
        else:
            grad_input = impl(ctx.backend).backward(diff, grad, ctx.scale)
        return (grad_input if need_input else None), (-grad_input if need_target else None), None, None


def mse_loss(input, target, reduction):
    """Dispatches equally shaped, same-dtype tensors to the selected backend."""
    backend = _backend.select(input, IMPLEMENTED)
    shape = input.shape
    input, target = input.contiguous().reshape(-1), target.contiguous().reshape(-1)
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad):
        loss = MSELossFunction.apply(input, target, reduction, backend)
    else:
        loss = impl(backend).forward(input, target, reduction, keep_diff=False)[0]
    return loss.reshape(shape) if reduction == "none" else loss
