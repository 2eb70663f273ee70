"""Pure-PyTorch conv + bias + ReLU + max-pool: the oracle, and the "reference" backend.

Every backend module provides the two functions below with these signatures and results:

``forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride) -> (out, argmax)``
    x, weight, bias, stride, padding, dilation, groups as fastml.ops.conv2d.reference.forward;
    pool_kernel, pool_stride: (rows, columns) pairs (no pool padding or dilation). With z = the
    convolution plus bias (N, K, OH, OW), out (N, K, PH, PW) = max_pool2d(relu(z), pool_kernel,
    pool_stride), PH = (OH − pool_kernel[0]) // pool_stride[0] + 1 (PW alike), the window scanned
    row by row, a value replacing the maximum when greater or NaN (torch's rule, ties to the
    first). argmax (N, K, PH, PW) int8: the offset i·pool_kernel[1] + j of the maximum within its
    window, or -1 where the ReLU passes no gradient (out <= 0: every z of the window <= 0; a NaN
    passes it, as torch's threshold_backward): all the backward needs. Neither the pre-pool
    activation nor the output is kept for it, so the caller may change the output in place
    (a ReLU(inplace=True) after the block), as after torch's three ops.
``backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs)
        -> (grad_x, grad_weight, grad_bias)``
    grad (N, K, PH, PW) contiguous; the gradient of z is grad at each window's argmax where it is
    not -1, zero elsewhere; then the convolution's backward (fastml.ops.conv2d.reference.backward,
    same `needs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastml.ops.conv2d import reference as conv_reference


def pooled_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def empty_outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride):
    """(out, argmax) of forward's shapes (N, K, PH, PW) and dtypes (x's, int8), uninitialised,
    for the kernels to fill."""
    conv = [conv_reference.output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d])
            for d in range(2)]
    shape = (x.shape[0], weight.shape[0], *(pooled_size(conv[d], pool_kernel[d], pool_stride[d]) for d in range(2)))
    return x.new_empty(shape), torch.empty(shape, dtype=torch.int8, device=x.device)


def forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    z = torch.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))
    out, indices = F.max_pool2d(z, pool_kernel, pool_stride, return_indices=True)
    offsets = window_offsets(indices, z.shape[-1], out.shape[-2:], pool_kernel, pool_stride)
    return out, offsets.masked_fill_(out <= 0, -1)  # (a NaN is not <= 0: it passes)


def window_offsets(indices, width, pooled, pool_kernel, pool_stride):
    """max_pool2d's flat indices (row · width + column) as offsets i · pool_kernel[1] + j within
    each window, int8."""
    rows = torch.arange(pooled[0], device=indices.device)[:, None] * pool_stride[0]
    cols = torch.arange(pooled[1], device=indices.device)[None, :] * pool_stride[1]
    i, j = indices // width - rows, indices % width - cols
    return (i * pool_kernel[1] + j).to(torch.int8)


def activation_grad(grad, argmax, conv_size, pool_kernel, pool_stride):
    """The gradient of the pre-ReLU activation z (N, K, OH, OW): grad at each window's maximum
    where the ReLU passes it (argmax not -1), zero elsewhere; summed where windows overlap. The
    offsets become max_pool2d's flat indices and torch's own max-pool backward places the values,
    as after torch's three ops: at VGG's block (64 x 128 x 56 x 56) a scatter_add over int64
    positions built in full took 240 ms against its 88 ms (Ice Lake Xeon, 2 threads)."""
    ph, pw = grad.shape[-2:]
    # offset o = i·pool_kernel[1] + j → position i·OW + j = o + i·(OW − pool_kernel[1]) past the
    # window's first, in int32 where a plane allows (half the bytes of each pass), then int64
    small = conv_size[0] * conv_size[1] < 2**31
    kind = torch.int32 if small else torch.int64
    window = (torch.arange(ph, dtype=kind, device=grad.device)[:, None] * (pool_stride[0] * conv_size[1])
              + torch.arange(pw, dtype=kind, device=grad.device)[None, :] * pool_stride[1])
    offsets = argmax.to(kind).clamp_(min=0)
    rows = offsets.div(pool_kernel[1], rounding_mode="floor").mul_(conv_size[1] - pool_kernel[1])
    flat = offsets.add_(rows).add_(window).long()
    passed = grad.masked_fill(argmax < 0, 0)
    z = grad.new_empty((*grad.shape[:-2], *conv_size))  # (its shape alone is read; never touched, never faulted in)
    return torch.ops.aten.max_pool2d_with_indices_backward(passed, z, pool_kernel, pool_stride, (0, 0), (1, 1),
                                                           False, flat)


def backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs):
    conv_size = tuple(conv_reference.output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d],
                                                 dilation[d]) for d in range(2))
    grad_z = activation_grad(grad, argmax, conv_size, pool_kernel, pool_stride)
    return conv_reference.backward(grad_z, x, weight, stride, padding, dilation, groups, needs)
