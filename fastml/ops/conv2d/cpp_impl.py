"""2-D convolution on fastml._C (csrc/conv2d.cpp); signatures as in reference.py."""

from __future__ import annotations

from fastml._cpp import kernel, ptr, threads
from fastml.ops.conv2d.reference import output_size


def dims(x, weight, stride, padding, dilation, groups):
    """The kernels' size vector: (n, c, h, w, k, r, s, stride, padding, dilation, groups, oh, ow)."""
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    oh = output_size(h, r, stride[0], padding[0], dilation[0])
    ow = output_size(w, s, stride[1], padding[1], dilation[1])
    return [n, c, h, w, k, r, s, *stride, *padding, *dilation, groups, oh, ow]


def forward(x, weight, bias, stride, padding, dilation, groups):
    shape = dims(x, weight, stride, padding, dilation, groups)
    out = x.new_empty((shape[0], shape[4], shape[-2], shape[-1]))
    kernel("conv2d_forward", x.dtype)(x.data_ptr(), weight.data_ptr(), ptr(bias), shape, out.data_ptr(), threads())
    return out


def backward(grad, x, weight, stride, padding, dilation, groups, needs):
    shape = dims(x, weight, stride, padding, dilation, groups)
    need_x, need_w, need_b = needs
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = x.new_empty(x.shape)
        kernel("conv2d_backward_input", x.dtype)(grad.data_ptr(), weight.data_ptr(), shape, grad_x.data_ptr(),
                                                 threads())
    if need_w or need_b:
        grad_w = weight.new_empty(weight.shape) if need_w else None
        grad_b = weight.new_empty(weight.shape[0]) if need_b else None
        kernel("conv2d_backward_weight", x.dtype)(grad.data_ptr(), x.data_ptr(), shape, ptr(grad_w), ptr(grad_b),
                                                  threads())
    return grad_x, grad_w, grad_b
