"""fastml::max_pool2d and fastml::max_pool2d_backward: max pooling as torch.library custom ops,
with fakes and autograd, for torch.compile / torch.export (see fastml/_library.py)."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastml.ops import graph_backend
from fastml.ops.max_pool2d import IMPLEMENTED, impl
from fastml.ops.max_pool2d.reference import empty_outputs


@torch.library.custom_op("fastml::max_pool2d", mutates_args=())
def max_pool2d(x: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], ceil_mode: bool) -> tuple[Tensor, Tensor]:
    """x (N, C, H, W), (rows, columns) pairs as reference.forward's → (out, indices int64), both
    (N, C, OH, OW)."""
    # The dispatcher hands int[] arguments over as lists; the backends take tuples.
    def run(name):
        return impl(name).forward(x.contiguous(), tuple(kernel), tuple(stride), tuple(padding), tuple(dilation),
                                  ceil_mode)

    return run(graph_backend("max_pool2d", "forward", IMPLEMENTED, (x, kernel, stride, padding, dilation, ceil_mode),
                             run))


@max_pool2d.register_fake
def _(x, kernel, stride, padding, dilation, ceil_mode):
    return empty_outputs(x, kernel, stride, padding, dilation, ceil_mode)


@torch.library.custom_op("fastml::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad: Tensor, indices: Tensor, height: int, width: int,
                        kernel: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
                        padding: Optional[Sequence[int]] = None,
                        dilation: Optional[Sequence[int]] = None) -> Tensor:
    """grad and indices (N, C, OH, OW) → the input's gradient (N, C, height, width); kernel, stride,
    padding and dilation: the forward's window, which the Triton gather walks (all four or none:
    without them it takes a window that reaches every output from every input)."""
    window = None if kernel is None else (tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))

    def run(name):
        return impl(name).backward(grad.contiguous(), indices.contiguous(), height, width, window)

    return run(graph_backend("max_pool2d", "backward", IMPLEMENTED,
                             (grad, indices, height, width, kernel, stride, padding, dilation), run))


@max_pool2d_backward.register_fake
def _(grad, indices, height, width, kernel=None, stride=None, padding=None, dilation=None):
    return grad.new_empty((grad.shape[0], grad.shape[1], height, width))


def _setup_context(ctx, inputs, output):
    ctx.size = inputs[0].shape[2:]
    ctx.window = inputs[1:5]  # kernel, stride, padding, dilation
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _):
    (indices,) = ctx.saved_tensors
    return (torch.ops.fastml.max_pool2d_backward(grad, indices, *ctx.size, *ctx.window),
            None, None, None, None, None)


max_pool2d.register_autograd(_backward, setup_context=_setup_context)
