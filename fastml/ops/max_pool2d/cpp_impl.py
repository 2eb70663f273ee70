"""2-D max pooling on fastml._C (csrc/max_pool2d.cpp); signatures as in reference.py."""

from __future__ import annotations

from fastml._cpp import kernel, threads
from fastml.ops.max_pool2d.reference import empty_outputs


def forward(x, kernel_size, stride, padding, dilation, ceil_mode):
    out, indices = empty_outputs(x, kernel_size, stride, padding, dilation, ceil_mode)
    n, c, oh, ow = out.shape
    h, w = x.shape[2:]
    kernel("max_pool2d_forward", x.dtype)(x.data_ptr(), n * c, h, w, oh, ow, *kernel_size, *stride, *padding,
                                          *dilation, out.data_ptr(), indices.data_ptr(), threads())
    return out, indices


def backward(grad, indices, height, width, window=None):  # window: unused by a scatter (reference.py)
    n, c, oh, ow = grad.shape
    grad_input = grad.new_empty((n, c, height, width))
    kernel("max_pool2d_backward", grad.dtype)(grad.data_ptr(), indices.data_ptr(), n * c, oh * ow, height * width,
                                              grad_input.data_ptr(), threads())
    return grad_input
