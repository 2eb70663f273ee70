"""Pairwise distances (torch.cdist): autograd.Function and per-backend dispatch.

Backend modules provide ``forward(x1, x2, p)`` for contiguous x1 (B, P, M), x2 (B, R, M) of one
floating dtype and p in KERNEL_NORMS (see reference.py): exact distances, from coordinate
differences. The backward pass is torch's own cdist backward (aten._cdist_backward) on the
exact distances, the same on every backend: it gives 0, never NaN, at zero distance.
"""

from __future__ import annotations

import math

import torch

from fastml import _backend
from fastml.ops import backward_in_torch_ops, in_custom_op_graph, shape_class, tracks_gradients

IMPLEMENTED = ("triton", "cpp", "numba", "reference")
KERNEL_NORMS = (2.0, 1.0, math.inf)


def norm_code(p: float) -> int:
    """The kernels' code for a norm: 2, 1, or 0 for inf."""
    return {2.0: 2, 1.0: 1, math.inf: 0}[p]


def impl(backend: str):
    return _backend.load(__name__, backend)


class CdistFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, p, backend):
        out = impl(backend).forward(x1, x2, p)
        ctx.p = p
        ctx.save_for_backward(x1, x2, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x1, x2, out = ctx.saved_tensors
        need_x1, need_x2 = ctx.needs_input_grad[:2]
        if backward_in_torch_ops(grad):  # recompute in torch ops that autograd and vmap see through
            with torch.enable_grad():
                a, b = x1.detach().requires_grad_(need_x1), x2.detach().requires_grad_(need_x2)
                dist = _reference_forward(a, b, ctx.p)
                wanted = [t for t, need in ((a, need_x1), (b, need_x2)) if need]
                grads = iter(torch.autograd.grad(dist, wanted, grad, create_graph=True))
            return (next(grads) if need_x1 else None), (next(grads) if need_x2 else None), None, None
        return (*distance_gradients(grad, x1, x2, ctx.p, out, need_x1, need_x2), None, None)


def distance_gradients(grad, x1, x2, p, out, need_x1: bool, need_x2: bool):
    """(grad_x1, grad_x2) of out = cdist(x1, x2, p), None where not asked for, by torch's own
    cdist backward (which also torch.compile traces)."""
    grad, x1, x2 = grad.contiguous(), x1.contiguous(), x2.contiguous()  # as _cdist_backward requires
    cdist_backward = torch.ops.aten._cdist_backward
    grad_x1 = cdist_backward(grad, x1, x2, p, out) if need_x1 else None
    grad_x2 = (cdist_backward(grad.transpose(1, 2).contiguous(), x2, x1, p, out.transpose(1, 2).contiguous())
               if need_x2 else None)
    return grad_x1, grad_x2


def _reference_forward(x1, x2, p):
    return impl("reference").forward(x1, x2, p)


def cdist(x1, x2, p):
    """Distances between contiguous x1 (B, P, M) and x2 (B, R, M) of one dtype and device, p in
    KERNEL_NORMS, on the selected backend."""
    if in_custom_op_graph():
        return torch.ops.fastml.cdist(x1, x2, p)
    backend = _backend.select(x1, IMPLEMENTED, shape_class("cdist", "forward", (x1, x2), p),
                              lambda name: impl(name).forward(x1, x2, p))
    if tracks_gradients(x1, x2):
        return CdistFunction.apply(x1, x2, p, backend)
    return impl(backend).forward(x1, x2, p)
