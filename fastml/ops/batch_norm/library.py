"""fastml::batch_norm and fastml::batch_norm_backward: batch normalisation over the batch's
statistics (optional ReLU) as torch.library custom ops, with fakes and autograd, for
torch.compile / torch.export (see fastml/_library.py)."""

from typing import Optional

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import asked, graph_backend, or_placeholder
from fastml.ops.batch_norm import IMPLEMENTED, impl
from fastml.ops.batch_norm.reference import layout_of, like


def _in_layout(x: Tensor) -> Tensor:
    """x in its own layout, dense (a graph may hand over any strides)."""
    return x.contiguous(memory_format=layout_of(x))


@torch.library.custom_op("fastml::batch_norm", mutates_args=())
def batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               relu: bool) -> tuple[Tensor, Tensor]:
    """x (N, C, H, W), weight and bias (C,) or None → (out: x's shape and layout, stats (3, C):
    mean, biased variance, invstd), as reference.forward."""
    _check("batch_norm", x, weight, bias)
    x = _in_layout(x)

    def run(name):
        return impl(name).forward(x, weight, bias, eps, relu)

    return run(graph_backend("batch_norm", "forward", IMPLEMENTED, (x, weight, bias, eps, relu), run))


def _check(op: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    """x (N, C, H, W) floating, weight and bias (C,) or None of x's dtype and device."""
    contract.dims(op, "x", x, 4, "(N, C, H, W)")
    contract.floating(op, "x", x)
    contract.same(op, "x", x, weight=weight, bias=bias)
    contract.shape(op, "weight", weight, x.shape[1:2], "(C,)")
    contract.shape(op, "bias", bias, x.shape[1:2], "(C,)")


@batch_norm.register_fake
def _(x, weight, bias, eps, relu):
    _check("batch_norm", x, weight, bias)
    return like(x), x.new_empty((3, x.shape[1]))


@torch.library.custom_op("fastml::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stats: Tensor,
                        relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """→ (grad_input, grad_weight, grad_bias) as reference.backward, an empty (0,) tensor in place
    of each absent parameter's gradient."""
    _check_backward(grad, x, weight, bias, stats)
    x = _in_layout(x)
    grad = grad.contiguous(memory_format=layout_of(x))

    def run(name):
        return impl(name).backward(grad, x, weight, bias, stats, relu)

    grads = run(graph_backend("batch_norm", "backward", IMPLEMENTED, (grad, x, weight, bias, stats, relu), run))
    return tuple(or_placeholder(g, x) for g in grads)


def _check_backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    stats: Tensor) -> None:
    _check("batch_norm_backward", x, weight, bias)
    contract.same("batch_norm_backward", "x", x, grad=grad, stats=stats)
    contract.shape("batch_norm_backward", "grad", grad, x.shape, "x's (N, C, H, W)")
    contract.shape("batch_norm_backward", "stats", stats, (3, x.shape[1]), "(3, C)")


@batch_norm_backward.register_fake
def _(grad, x, weight, bias, stats, relu):
    _check_backward(grad, x, weight, bias, stats)
    channels = x.shape[1]
    return (like(x), x.new_empty(channels if weight is not None else 0),
            x.new_empty(channels if bias is not None else 0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, ctx.relu = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _):
    x, weight, bias, stats = ctx.saved_tensors
    grads = torch.ops.fastml.batch_norm_backward(grad, x, weight, bias, stats, ctx.relu)
    return (*asked(grads, ctx.needs_input_grad[:3]), None, None)


batch_norm.register_autograd(_backward, setup_context=_setup_context)
