"""fastml::cdist: pairwise distances as a torch.library custom op, with fake and autograd, for
torch.compile / torch.export (see fastml/_library.py). Backward is torch's own cdist backward on
the exact distances, as CdistFunction's."""

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import graph_backend
from fastml.ops.cdist import IMPLEMENTED, KERNEL_NORMS, distance_gradients, impl


@torch.library.custom_op("fastml::cdist", mutates_args=())
def cdist(x1: Tensor, x2: Tensor, p: float) -> Tensor:
    """x1 (B, P, M), x2 (B, R, M), p in KERNEL_NORMS → (B, P, R)."""
    _check(x1, x2, p)

    def run(name):
        return impl(name).forward(x1.contiguous(), x2.contiguous(), p)

    return run(graph_backend("cdist", "forward", IMPLEMENTED, (x1, x2, p), run))


def check_points(op: str, first_name: str, first: Tensor, second_name: str, second: Tensor) -> None:
    """Two batches of points, (B, P, M) and (B, R, M), floating, of one dtype and device."""
    contract.dims(op, first_name, first, 3, "(B, points, features)")
    contract.dims(op, second_name, second, 3, "(B, points, features)")
    contract.floating(op, first_name, first)
    contract.same(op, first_name, first, **{second_name: second})
    if first.shape[0] != second.shape[0] or first.shape[2] != second.shape[2]:
        contract.fail(op, contract.ShapeError, f"{first_name} {tuple(first.shape)} and {second_name} "
                                               f"{tuple(second.shape)} must have the same batch and feature sizes")


def _check(x1: Tensor, x2: Tensor, p: float) -> None:
    check_points("cdist", "x1", x1, "x2", x2)
    if p not in KERNEL_NORMS:
        contract.fail("cdist", ValueError, f"p must be one of {KERNEL_NORMS}, got {p}")


@cdist.register_fake
def _(x1, x2, p):
    _check(x1, x2, p)
    return x1.new_empty((x1.shape[0], x1.shape[1], x2.shape[1]))


def _setup_context(ctx, inputs, output):
    x1, x2, ctx.p = inputs
    ctx.save_for_backward(x1, x2, output)


def _backward(ctx, grad):
    x1, x2, out = ctx.saved_tensors
    return (*distance_gradients(grad, x1, x2, ctx.p, out, *ctx.needs_input_grad[:2]), None)


cdist.register_autograd(_backward, setup_context=_setup_context)
