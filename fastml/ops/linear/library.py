"""fastml::linear and fastml::linear_backward: the linear layer as torch.library custom ops, with
fakes and autograd, for torch.compile / torch.export (see fastml/_library.py). The
implementations pick the backend when the graph runs and call the same kernels as
LinearFunction; any strides are taken, outputs are contiguous."""

from typing import Optional

import torch
from torch import Tensor

from fastml.ops import asked, contiguous, gradient_fakes, gradient_outputs, graph_backend
from fastml.ops.linear import IMPLEMENTED, backward_on, impl


@torch.library.custom_op("fastml::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (N, D), weight (O, D), bias (O,) or None → (N, O)."""
    def run(name):
        return impl(name).forward(x.contiguous(), weight.contiguous(), contiguous(bias))

    return run(graph_backend("linear", "forward", IMPLEMENTED, (x, weight, bias), run))


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastml::linear_backward", mutates_args=())
def linear_backward(grad: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_weight: bool,
                    need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """grad (N, O) → (grad_x (N, D), grad_weight (O, D), grad_bias (O,)); an empty (0,) tensor
    for each one not asked for."""
    grad, x, weight = grad.contiguous(), x.contiguous(), weight.contiguous()

    def run(name):
        return backward_on(name, grad, x, weight, need_input, need_weight, need_bias)

    arguments = (grad, x, weight, need_input, need_weight, need_bias)
    grads = run(graph_backend("linear", "backward", IMPLEMENTED, arguments, run))
    # contiguous, as the fake promises (whatever layout a backend forms them in)
    grads = tuple(None if g is None else g.contiguous() for g in grads)
    return gradient_outputs(grads, (need_input, need_weight, need_bias), grad)


@linear_backward.register_fake
def _(grad, x, weight, need_input, need_weight, need_bias):
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
