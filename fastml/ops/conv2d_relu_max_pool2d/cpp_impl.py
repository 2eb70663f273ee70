"""Conv + bias + ReLU + max-pool on fastml._C (csrc/conv2d_relu_max_pool2d.cpp: the forward pass,
and the backward pass in one call); signatures as in reference.py."""

from __future__ import annotations

from fastml._cpp import kernel, ptr, threads
from fastml.ops.conv2d import cpp_impl as conv
from fastml.ops.conv2d_relu_max_pool2d.reference import empty_outputs, pooled_size


def _pool_dims(conv_dims, pool_kernel, pool_stride):
    oh, ow = conv_dims[-2:]
    return [*pool_kernel, *pool_stride, pooled_size(oh, pool_kernel[0], pool_stride[0]),
            pooled_size(ow, pool_kernel[1], pool_stride[1])]


def forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    dims = conv.dims(x, weight, stride, padding, dilation, groups)
    out, argmax = empty_outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride)
    pool = [*pool_kernel, *pool_stride, *out.shape[2:]]
    kernel("conv2d_relu_max_pool2d_forward", x.dtype)(x.data_ptr(), weight.data_ptr(), ptr(bias), dims, pool,
                                                      out.data_ptr(), argmax.data_ptr(), threads())
    return out, argmax


def backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs):
    dims = conv.dims(x, weight, stride, padding, dilation, groups)
    need_x, need_w, need_b = needs
    grad_x = x.new_empty(x.shape) if need_x else None
    grad_w = weight.new_empty(weight.shape) if need_w else None
    grad_b = weight.new_empty(weight.shape[0]) if need_b else None
    kernel("conv2d_relu_max_pool2d_backward", grad.dtype)(
        grad.data_ptr(), argmax.data_ptr(), x.data_ptr(), weight.data_ptr(), dims,
        _pool_dims(dims, pool_kernel, pool_stride), ptr(grad_x), ptr(grad_w), ptr(grad_b), threads())
    return grad_x, grad_w, grad_b
