"""fastml::conv2d_relu_max_pool2d and its backward: the fused conv + bias + ReLU + max-pool as
torch.library custom ops, with fakes and autograd, for torch.compile / torch.export (see
fastml/_library.py). As in eager, backward keeps the int8 window offsets alone."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import asked, contiguous, gradient_fakes, gradient_outputs, graph_backend
from fastml.ops.conv2d_relu_max_pool2d import IMPLEMENTED, impl
from fastml.ops.conv2d_relu_max_pool2d.reference import empty_outputs, pooled_size


@torch.library.custom_op("fastml::conv2d_relu_max_pool2d", mutates_args=())
def conv2d_relu_max_pool2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], groups: int, pool_kernel: Sequence[int],
                           pool_stride: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Arguments as reference.forward's → (out (N, K, PH, PW), argmax int8 window offsets)."""
    _check("conv2d_relu_max_pool2d", x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride)

    # The dispatcher hands int[] arguments over as lists; the backends take tuples.
    def run(name):
        return impl(name).forward(x.contiguous(), weight.contiguous(), contiguous(bias), tuple(stride),
                                  tuple(padding), tuple(dilation), groups, tuple(pool_kernel), tuple(pool_stride))

    arguments = (x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride)
    return run(graph_backend("conv2d_relu_max_pool2d", "forward", IMPLEMENTED, arguments, run))


def _check(op, x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride) -> tuple[int, int]:
    """The convolution's contract, and a pool of positive kernel and stride whose window, of at
    most 127 elements (argmax's int8 offsets), fits the convolution's output. Returns the pooled
    output's (PH, PW)."""
    conv = contract.conv2d(op, x, weight, bias, stride, padding, dilation, groups)
    contract.pairs(op, pool_kernel=pool_kernel, pool_stride=pool_stride)
    contract.positive(op, pool_kernel=pool_kernel, pool_stride=pool_stride)
    if pool_kernel[0] * pool_kernel[1] > 127:
        contract.fail(op, ValueError, f"pool_kernel must hold at most 127 elements (argmax's int8 offsets), "
                                      f"got {list(pool_kernel)}")
    if conv[0] < pool_kernel[0] or conv[1] < pool_kernel[1]:
        contract.fail(op, ValueError, f"pool_kernel {list(pool_kernel)} is larger than the convolution's output "
                                      f"{conv}")
    return pooled_size(conv[0], pool_kernel[0], pool_stride[0]), pooled_size(conv[1], pool_kernel[1], pool_stride[1])


@conv2d_relu_max_pool2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    _check("conv2d_relu_max_pool2d", x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride)
    return empty_outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride)


@torch.library.custom_op("fastml::conv2d_relu_max_pool2d_backward", mutates_args=())
def conv2d_relu_max_pool2d_backward(grad: Tensor, argmax: Tensor, x: Tensor, weight: Tensor,
                                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                    groups: int, pool_kernel: Sequence[int], pool_stride: Sequence[int],
                                    needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """grad (N, K, PH, PW) → (grad_x, grad_weight, grad_bias) for needs = which of them to form;
    an empty (0,) tensor for each one not asked for."""
    _check_backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs)
    # The kernels add each gradient at the window position its offset gives.
    contract.indices_below("conv2d_relu_max_pool2d_backward", "argmax", argmax, pool_kernel[0] * pool_kernel[1],
                           "offsets in a pool_kernel window, or -1")

    def run(name):
        return impl(name).backward(grad.contiguous(), argmax.contiguous(), x.contiguous(),
                                   weight.contiguous(), tuple(stride), tuple(padding), tuple(dilation), groups,
                                   tuple(pool_kernel), tuple(pool_stride), tuple(needs))

    arguments = (grad, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs)
    grads = run(graph_backend("conv2d_relu_max_pool2d", "backward", IMPLEMENTED, arguments, run))
    return gradient_outputs(grads, needs, grad)


def _check_backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride,
                    needs) -> None:
    op = "conv2d_relu_max_pool2d_backward"
    pooled = _check(op, x, weight, None, stride, padding, dilation, groups, pool_kernel, pool_stride)
    contract.same(op, "x", x, grad=grad)
    contract.shape(op, "grad", grad, (x.shape[0], weight.shape[0], *pooled), "(N, K, PH, PW)")
    contract.indices_for(op, "argmax", argmax, torch.int8, grad, "(N, K, PH, PW)")
    contract.needs(op, needs)


@conv2d_relu_max_pool2d_backward.register_fake
def _(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs):
    _check_backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs)
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
