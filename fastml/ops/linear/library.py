"""fastml::linear and fastml::linear_backward: the linear layer as torch.library custom ops, with
fakes and autograd, for torch.compile / torch.export (see fastml/_library.py). The
implementations pick the backend when the graph runs and call the same kernels as
LinearFunction; any strides are taken, outputs are contiguous."""

from typing import Optional

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import asked, contiguous, gradient_fakes, gradient_outputs, graph_backend
from fastml.ops.linear import IMPLEMENTED, backward_on, impl


@torch.library.custom_op("fastml::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (N, D), weight (O, D), bias (O,) or None → (N, O)."""
    check_linear("linear", x, weight, bias)

    def run(name):
        return impl(name).forward(x.contiguous(), weight.contiguous(), contiguous(bias))

    return run(graph_backend("linear", "forward", IMPLEMENTED, (x, weight, bias), run))


def check_linear(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """x (N, D) floating, weight (O, D) and bias (O,) or None of x's dtype and device."""
    contract.dims(op, "x", x, 2, "(N, D)")
    contract.dims(op, "weight", weight, 2, "(O, D)")
    contract.floating(op, "x", x)
    contract.same(op, "x", x, weight=weight, bias=bias)
    if x.shape[1] != weight.shape[1]:
        contract.fail(op, contract.ShapeError, f"x has {x.shape[1]} features (shape {tuple(x.shape)}) but weight "
                                               f"of shape {tuple(weight.shape)} expects {weight.shape[1]}")
    contract.shape(op, "bias", bias, (weight.shape[0],), "(O,)")


@linear.register_fake
def _(x, weight, bias):
    check_linear("linear", x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastml::linear_backward", mutates_args=())
def linear_backward(grad: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_weight: bool,
                    need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """grad (N, O) → (grad_x (N, D), grad_weight (O, D), grad_bias (O,)); an empty (0,) tensor
    for each one not asked for."""
    check_linear_backward(grad, x, weight)
    grad, x, weight = grad.contiguous(), x.contiguous(), weight.contiguous()

    def run(name):
        return backward_on(name, grad, x, weight, need_input, need_weight, need_bias)

    arguments = (grad, x, weight, need_input, need_weight, need_bias)
    grads = run(graph_backend("linear", "backward", IMPLEMENTED, arguments, run))
    # contiguous, as the fake promises (whatever layout a backend forms them in)
    grads = tuple(None if g is None else g.contiguous() for g in grads)
    return gradient_outputs(grads, (need_input, need_weight, need_bias), grad)


def check_linear_backward(grad: Tensor, x: Tensor, weight: Tensor) -> None:
    check_linear("linear_backward", x, weight, None)
    contract.same("linear_backward", "x", x, grad=grad)
    contract.dims("linear_backward", "grad", grad, 2, "(N, O)")
    contract.shape("linear_backward", "grad", grad, (x.shape[0], weight.shape[0]), "(N, O)")


@linear_backward.register_fake
def _(grad, x, weight, need_input, need_weight, need_bias):
    check_linear_backward(grad, x, weight)
    return gradient_fakes(grad, x, weight, (need_input, need_weight, need_bias))


def gradients(grad, x, weight, need_input, need_weight, need_bias):
    """(grad_x, grad_weight, grad_bias) of x W^T + b for an incoming grad, None where not asked."""
    grads = torch.ops.fastml.linear_backward(grad, x, weight, need_input, need_weight, need_bias)
    return asked(grads, (need_input, need_weight, need_bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    return gradients(grad, x, weight, need_x, need_w, need_b and ctx.has_bias)


linear.register_autograd(_backward, setup_context=_setup_context)
