"""A convolution with few windows, as one matrix product: a variant of torch's own convolution
that a layer's measured choice may run, forward and backward, on any device and floating dtype.

Where a large kernel fits its unpadded input only a few times (at most ``MAX_WINDOWS`` output
pixels), the convolution is a linear layer on those windows: ``out[n, k, p] = sum over c, i, j
of W[k, c, i, j] x[n, c, window p + (i, j)]``. Networks written fully convolutionally hold such
layers where a classifier would hold Linear: LeNet-5's C5 (16x5x5 -> 120 on a 5x5 map), VGG's
and AlexNet's classifiers as convolutions (timm's ConvMlp: 512x7x7 -> 4096 on the 7x7 map, or on
an 8x8 one at 256 pixels; FCN heads). torch's CPU convolution runs them as convolutions, its
weight gradient slowest of all: on a 2-core Zen 5, forward and backward, 8x512x7x7 -> 4096 took
610 ms as torch's convolution and 94 ms as this product; on an 8x8 map (4 windows), 694 ms
against 267 ms; LeNet's C5 at batch 8, 0.22 ms against 0.07 ms. A 3x3 convolution on a 2x2 map
ran 0.73x torch's this way, and a padded one mostly multiplies padding: padding rules it out,
and the measured choice times it against torch's module wherever it applies.

One window (the kernel exactly the input's size): the input flattened in the weight's memory
order, so the weight, the large operand, is always a view: (C, H, W) order for a contiguous
weight, (H, W, C) for a channels-last one; only the input, one window per image, may be copied.
Several: ``F.unfold`` gathers the windows (the input's values at most ``MAX_WINDOWS`` times over),
each window a row. Gradients flow through torch's own ops (the windows' back through
``F.fold``), the weight's written into memory kept from the previous step where it is large
(fastml/_recycled_linear.py). Results differ from torch's convolution only by the order of the
sums (float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastml import _recycled_linear
from fastml._pointwise import channels_last_like

MAX_WINDOWS = 16
"""The most output pixels a candidate has: the windows are gathered as a copy that many times
the size of the weight's input side (its rows), small beside the weight such layers carry."""


def _output_size(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    return tuple((size - conv.dilation[d] * (weight.shape[2 + d] - 1) - 1) // conv.stride[d] + 1
                 for d, size in enumerate(input.shape[2:]))


def applies(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``convolution`` computes ``conv``'s convolution of ``input`` as torch's module
    would: a floating 4-D strided input, a kernel larger than 1x1 (a 1x1 one is
    fastml/_pointwise.py's) fitting it unpadded 1 to ``MAX_WINDOWS`` times, one group."""
    if input.dim() != 4 or not input.is_floating_point() or input.layout != torch.strided:
        return False
    if conv.groups != 1 or weight.dtype != input.dtype or weight.shape[2] * weight.shape[3] == 1:
        return False
    if not (conv.padding == "valid" or (conv.padding != "same" and tuple(conv.padding) == (0, 0))):
        return False
    height, width = _output_size(conv, input, weight)
    return height > 0 and width > 0 and height * width <= MAX_WINDOWS


def convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                relu: bool = False) -> torch.Tensor:
    """``conv``'s convolution of ``input`` (where ``applies``) with ``weight`` and ``bias``, then
    an in-place ReLU if ``relu``, as one matrix product, in the layout torch's convolution writes
    (channels-last where the input or the weight is, but for an empty batch)."""
    n, k = input.shape[0], weight.shape[0]
    height, width = _output_size(conv, input, weight)
    weight_last = channels_last_like(weight)  # (K, kH, kW, C) in memory: every row that way
    matrix = weight.permute(0, 2, 3, 1).reshape(k, -1) if weight_last else weight.reshape(k, -1)
    size = matrix.shape[1]
    if input.shape[2:] == weight.shape[2:]:  # one window, the whole input
        rows = (input.permute(0, 2, 3, 1) if weight_last else input).reshape(n, size)
    else:
        windows = F.unfold(input, weight.shape[2:], conv.dilation, 0, conv.stride)  # (N, C·kH·kW, windows)
        if weight_last:  # each row (kH, kW, C)
            windows = windows.view(n, input.shape[1], size // input.shape[1], height * width).permute(0, 3, 2, 1)
        else:  # each row (C, kH, kW)
            windows = windows.transpose(1, 2)
        rows = windows.reshape(n * height * width, size)
    if _recycled_linear.applies(rows, matrix, bias):
        out = _recycled_linear.linear(rows, matrix, bias)
    else:
        out = F.linear(rows, matrix, bias)
    out = out.view(n, height, width, k).permute(0, 3, 1, 2)  # channels-last
    if n and (channels_last_like(input) or weight_last):
        pass
    elif height * width == 1:
        out = out.reshape(n, k).view(n, k, 1, 1)
    else:  # (N, C, H, W) strides, also for an empty batch (whose .contiguous() would keep any)
        out = out.new_empty(out.shape).copy_(out)
    return out.relu_() if relu else out
