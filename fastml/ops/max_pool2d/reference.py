"""Pure-PyTorch 2-D max pooling: the oracle, and the "reference" backend.

Every backend module provides the two functions below with these signatures and results:

``forward(x, kernel, stride, padding, dilation, ceil_mode) -> (out, indices)``
    x (N, C, H, W) contiguous, floating; kernel, stride, padding, dilation: (rows, columns) pairs of
    ints, already validated; ceil_mode: bool. out (N, C, OH, OW) in x's dtype, OH and OW from
    ``fastml.ops.max_pool2d.output_size``; indices (N, C, OH, OW) int64, the flat position ih·W + iw
    in the input plane of each output's maximum, torch's convention (so max_unpool2d works on them):
    the window is scanned row by row; a value replaces the current maximum when it is greater or
    NaN (so ties keep the first, and a NaN window reports its last NaN); padding takes no part,
    and a window of -inf reports its first element inside the input.
``backward(grad, indices, height, width, window=None) -> grad_input``
    grad, indices (N, C, OH, OW) contiguous → grad_input (N, C, height, width) in grad's dtype,
    zero but for grad added at each output's index (overlapping windows add up). window: the
    forward's (kernel, stride, padding, dilation) pairs, or None where unknown (the custom op
    called with indices alone); the scatters ignore it, the Triton gather walks it (without it,
    a window that makes every output a candidate for every input).
"""

from __future__ import annotations

import torch


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Outputs along one dimension, as torch computes them: with ceil_mode, a last window that
    would start in the right padding is dropped."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def empty_outputs(x, kernel, stride, padding, dilation, ceil_mode):
    """(out, indices) of forward's shapes and dtypes, uninitialised, for the kernels to fill."""
    n, c, h, w = x.shape
    oh = output_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = output_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    return x.new_empty((n, c, oh, ow)), torch.empty((n, c, oh, ow), dtype=torch.int64, device=x.device)


def forward(x, kernel, stride, padding, dilation, ceil_mode):
    n, c, h, w = x.shape
    oh = output_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = output_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    rows0 = torch.arange(oh, device=x.device) * stride[0] - padding[0]
    cols0 = torch.arange(ow, device=x.device) * stride[1] - padding[1]
    best = x.new_full((n, c, oh, ow), float("-inf"))
    index = torch.full((n, c, oh, ow), -1, dtype=torch.int64, device=x.device)
    for i in range(kernel[0]):
        rows = rows0 + i * dilation[0]
        row_inside = (rows >= 0) & (rows < h)
        for j in range(kernel[1]):
            cols = cols0 + j * dilation[1]
            inside = row_inside[:, None] & ((cols >= 0) & (cols < w))[None, :]
            value = x[:, :, rows.clamp(0, h - 1)][:, :, :, cols.clamp(0, w - 1)]
            take = inside & ((value > best) | value.isnan() | (index < 0))
            best = torch.where(take, value, best)
            index = torch.where(take, (rows.clamp(0, h - 1)[:, None] * w + cols.clamp(0, w - 1)[None, :]), index)
    return best, index


def backward(grad, indices, height, width, window=None):  # window: unused here (see the docstring)
    n, c = grad.shape[:2]
    outputs = grad.shape[2] * grad.shape[3]
    grad_input = grad.new_zeros((n, c, height * width))
    grad_input.scatter_add_(2, indices.reshape(n, c, outputs), grad.reshape(n, c, outputs))
    return grad_input.reshape(n, c, height, width)
