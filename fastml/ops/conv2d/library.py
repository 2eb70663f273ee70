"""fastml::conv2d and fastml::conv2d_backward: the convolution as torch.library custom ops, with
fakes and autograd, for torch.compile / torch.export (see fastml/_library.py)."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import asked, contiguous, gradient_fakes, gradient_outputs, graph_backend
from fastml.ops.conv2d import IMPLEMENTED, impl, output_size


@torch.library.custom_op("fastml::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], groups: int) -> Tensor:
    """x (N, C, H, W), weight (K, C / groups, R, S), bias (K,) or None, (rows, columns) pairs as
    reference.forward's → (N, K, OH, OW)."""
    contract.conv2d("conv2d", x, weight, bias, stride, padding, dilation, groups)

    # The dispatcher hands int[] arguments over as lists; the backends take tuples.
    def run(name):
        return impl(name).forward(x.contiguous(), weight.contiguous(), contiguous(bias), tuple(stride), tuple(padding),
                                  tuple(dilation), groups)

    return run(graph_backend("conv2d", "forward", IMPLEMENTED, (x, weight, bias, stride, padding, dilation, groups),
                             run))


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    contract.conv2d("conv2d", x, weight, bias, stride, padding, dilation, groups)
    return x.new_empty((x.shape[0], weight.shape[0], *(output_size(x.shape[2 + d], weight.shape[2 + d], stride[d],
                                                                   padding[d], dilation[d]) for d in range(2))))


@torch.library.custom_op("fastml::conv2d_backward", mutates_args=())
def conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int, needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """grad (N, K, OH, OW) → (grad_x, grad_weight, grad_bias) for needs = which of them to form;
    an empty (0,) tensor for each one not asked for."""
    _check_backward(grad, x, weight, stride, padding, dilation, groups, needs)

    def run(name):
        return impl(name).backward(grad.contiguous(), x.contiguous(), weight.contiguous(), tuple(stride),
                                   tuple(padding), tuple(dilation), groups, tuple(needs))

    grads = run(graph_backend("conv2d", "backward", IMPLEMENTED,
                              (grad, x, weight, stride, padding, dilation, groups, needs), run))
    return gradient_outputs(grads, needs, grad)


def _check_backward(grad, x, weight, stride, padding, dilation, groups, needs) -> None:
    op = "conv2d_backward"
    size = contract.conv2d(op, x, weight, None, stride, padding, dilation, groups)
    contract.same(op, "x", x, grad=grad)
    contract.shape(op, "grad", grad, (x.shape[0], weight.shape[0], *size), "(N, K, OH, OW)")
    contract.needs(op, needs)


@conv2d_backward.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, needs):
    _check_backward(grad, x, weight, stride, padding, dilation, groups, needs)
    return gradient_fakes(grad, x, weight, needs)


def _setup_context(ctx, inputs, output):
    x, weight, bias, *ctx.args = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    needs = [need_x, need_w, need_b and ctx.has_bias]
    grads = asked(torch.ops.fastml.conv2d_backward(grad, x, weight, *ctx.args, needs), needs)
    return (*grads, None, None, None, None)


conv2d.register_autograd(_backward, setup_context=_setup_context)
