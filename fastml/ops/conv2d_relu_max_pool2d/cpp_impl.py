"""Conv + bias + ReLU + max-pool on fastml._C (csrc/conv2d_relu_max_pool2d.cpp: the forward pass,
and the backward pass in one call); signatures as in reference.py.

Forward and backward are each a measured choice of their own (fastml/_tune.py), per shape class,
between the fused kernel and a split: torch's own convolution (or its convolution backward), which
oneDNN does faster on some CPUs and shapes (VGG's deeper blocks on an Ice Lake Xeon), with the
ReLU and pool (or the activation gradient) in one C++ pass over its output. A forced backend
(fastml.use_backend("cpp")) runs the fused kernels alone.
"""

from __future__ import annotations

import torch.nn.functional as F

from fastml import _recycle, _tune
from fastml._cpp import kernel, ptr, threads
from fastml.ops import backward_class, forced_backend, shape_class
from fastml.ops.conv2d import cpp_impl as conv
from fastml.ops.conv2d import reference as conv_reference
from fastml.ops.conv2d_relu_max_pool2d.reference import empty_outputs, pooled_size


def _pool_dims(conv_dims, pool_kernel, pool_stride):
    oh, ow = conv_dims[-2:]
    return [*pool_kernel, *pool_stride, pooled_size(oh, pool_kernel[0], pool_stride[0]),
            pooled_size(ow, pool_kernel[1], pool_stride[1])]


def _fused_or_split(key, x, timed, fused, split, *args):
    """fused(*args), or split(*args) where the measured choice for shape class ``key`` (timed on
    ``timed``) finds it faster; the fused kernel alone under a forced backend or for an empty x."""
    if forced_backend() or x.numel() == 0:
        return fused(*args)

    def run(name):
        return (fused if name == "cpp" else split)(*args)

    return run(_tune.choose(key, ("cpp",), timed, run))


def forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    args = (stride, padding, dilation, groups, pool_kernel, pool_stride)
    key = shape_class("conv2d_relu_max_pool2d convolution", "forward", (x, weight, bias), *args)
    return _fused_or_split(key, x, x, _fused_forward, _forward_through_torch, x, weight, bias, *args)


def _fused_forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    dims = conv.dims(x, weight, stride, padding, dilation, groups)
    out, argmax = empty_outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride)
    pool = [*pool_kernel, *pool_stride, *out.shape[2:]]
    kernel("conv2d_relu_max_pool2d_forward", x.dtype)(x.data_ptr(), weight.data_ptr(), ptr(bias), dims, pool,
                                                      out.data_ptr(), argmax.data_ptr(), threads())
    return out, argmax


def _forward_through_torch(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    """torch's convolution (with its bias), then ReLU and the pool in one C++ pass over its output."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous()
    out, argmax = empty_outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride)
    n, k, oh, ow = z.shape
    pool = [*pool_kernel, *pool_stride, *out.shape[2:]]
    kernel("relu_max_pool2d_forward", x.dtype)(z.data_ptr(), n * k, oh, ow, pool, out.data_ptr(), argmax.data_ptr(),
                                               threads())
    return out, argmax


def backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs):
    args = (stride, padding, dilation, groups, pool_kernel, pool_stride)
    key = backward_class("conv2d_relu_max_pool2d convolution", x, (grad.shape, x.shape, weight.shape), *args, needs)
    return _fused_or_split(key, x, grad, _fused_backward, _backward_through_torch, grad, argmax, x, weight, *args,
                           needs)


def _fused_backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs):
    dims = conv.dims(x, weight, stride, padding, dilation, groups)
    need_x, need_w, need_b = needs
    grad_x = x.new_empty(x.shape) if need_x else None
    grad_w = weight.new_empty(weight.shape) if need_w else None
    grad_b = weight.new_empty(weight.shape[0]) if need_b else None
    kernel("conv2d_relu_max_pool2d_backward", grad.dtype)(
        grad.data_ptr(), argmax.data_ptr(), x.data_ptr(), weight.data_ptr(), dims,
        _pool_dims(dims, pool_kernel, pool_stride), ptr(grad_x), ptr(grad_w), ptr(grad_b), threads())
    return grad_x, grad_w, grad_b


def _backward_through_torch(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride,
                            needs):
    """The activation gradient in one C++ pass, then torch's convolution backward
    (fastml.ops.conv2d.reference.backward). The activation gradient, the size of the convolution's
    output and dropped once torch has read it, lands on the memory the last call's left
    (fastml/_recycle.py): VGG's 64 x 128 x 56 x 56 is 102 MB of fresh pages otherwise."""
    dims = conv.dims(x, weight, stride, padding, dilation, groups)
    n, k, oh, ow = dims[0], dims[4], dims[-2], dims[-1]
    grad_z = _recycle.empty((n, k, oh, ow), grad.dtype, grad.device)
    kernel("relu_max_pool2d_backward", grad.dtype)(grad.data_ptr(), argmax.data_ptr(), n * k, oh, ow,
                                                   _pool_dims(dims, pool_kernel, pool_stride), grad_z.data_ptr(),
                                                   threads())
    return conv_reference.backward(grad_z, x, weight, stride, padding, dilation, groups, needs)
