"""fastml::conv2d_relu_max_pool2d and its backward: the fused conv + bias + ReLU + max-pool as
torch.library custom ops, with fakes and autograd, for torch.compile / torch.export (see
fastml/_library.py). As in eager, backward keeps the int8 window offsets alone."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastml.ops import asked, contiguous, gradient_fakes, gradient_outputs, graph_backend
from fastml.ops.conv2d_relu_max_pool2d import IMPLEMENTED, impl
from fastml.ops.conv2d_relu_max_pool2d.reference import empty_outputs


@torch.library.custom_op("fastml::conv2d_relu_max_pool2d", mutates_args=())
def conv2d_relu_max_pool2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], groups: int, pool_kernel: Sequence[int],
                           pool_stride: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Arguments as reference.forward's → (out (N, K, PH, PW), argmax int8 window offsets)."""
    # The dispatcher hands int[] arguments over as lists; the backends take tuples.
    def run(name):
        return impl(name).forward(x.contiguous(), weight.contiguous(), contiguous(bias), tuple(stride),
                                  tuple(padding), tuple(dilation), groups, tuple(pool_kernel), tuple(pool_stride))

    arguments = (x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride)
    return run(graph_backend("conv2d_relu_max_pool2d", "forward", IMPLEMENTED, arguments, run))


@conv2d_relu_max_pool2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    return empty_outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride)


@torch.library.custom_op("fastml::conv2d_relu_max_pool2d_backward", mutates_args=())
def conv2d_relu_max_pool2d_backward(grad: Tensor, argmax: Tensor, x: Tensor, weight: Tensor,
                                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                    groups: int, pool_kernel: Sequence[int], pool_stride: Sequence[int],
                                    needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """grad (N, K, PH, PW) → (grad_x, grad_weight, grad_bias) for needs = which of them to form;
    an empty (0,) tensor for each one not asked for."""
    def run(name):
        return impl(name).backward(grad.contiguous(), argmax.contiguous(), x.contiguous(),
                                   weight.contiguous(), tuple(stride), tuple(padding), tuple(dilation), groups,
                                   tuple(pool_kernel), tuple(pool_stride), tuple(needs))

    arguments = (grad, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs)
    grads = run(graph_backend("conv2d_relu_max_pool2d", "backward", IMPLEMENTED, arguments, run))
    return gradient_outputs(grads, needs, grad)


@conv2d_relu_max_pool2d_backward.register_fake
def _(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs):
    return gradient_fakes(grad, x, weight, needs)


def _setup_context(ctx, inputs, output):
    x, weight, bias, *ctx.args = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(output[1], x, weight)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _):
    argmax, x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    needs = [need_x, need_w, need_b and ctx.has_bias]
    grads = asked(torch.ops.fastml.conv2d_relu_max_pool2d_backward(grad, argmax, x, weight, *ctx.args, needs),
                  needs)
    return (*grads, *([None] * 6))


conv2d_relu_max_pool2d.register_autograd(_backward, setup_context=_setup_context)
