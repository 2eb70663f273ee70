"""A convolution with few windows, as one matrix product: a variant of torch's own convolution
that a layer's measured choice may run, forward and backward, on the CPU in any floating dtype.

Where a large kernel fits its unpadded input only a few times (at most ``MAX_WINDOWS`` output
pixels), the convolution is a linear layer on those windows: ``out[n, k, p] = sum over c, i, j
of W[k, c, i, j] x[n, c, window p + (i, j)]``. Networks written fully convolutionally hold such
layers where a classifier would hold Linear: LeNet-5's C5 (16x5x5 -> 120 on a 5x5 map), VGG's
and AlexNet's classifiers as convolutions (timm's ConvMlp: 512x7x7 -> 4096 on the 7x7 map, or on
an 8x8 one at 256 pixels; FCN heads). torch's CPU convolution runs them as convolutions, its
weight gradient slowest of all: on a 2-core Zen 5, forward and backward, 8x512x7x7 -> 4096 took
634 ms as torch's convolution and 99 ms as this product; on an 8x8 map (4 windows), 692 ms
against 170 ms; LeNet's C5 at batch 256, 1.08 ms against 0.42 ms
(bench/results/cpu-amd-epyc-zen5-2c-few-windows.txt). A 3x3 convolution padded by 1 on a 2x2 map
ran at 0.73x torch's speed this way (its windows are mostly padding): padding rules it out, and
the measured choice times the variant against torch's module wherever it applies.

One window (the kernel exactly the input's size): the input flattened in the weight's memory
order, so the weight, the large operand, is a view: (C, H, W) order for a contiguous weight,
(H, W, C) for a channels-last one; only the input, one window per image, is copied. Several:
``Tensor.unfold`` views the windows, copied as rows (the input's values at most ``MAX_WINDOWS``
times over). Gradients flow through torch's own ops, the weight's written into memory kept from
the previous step where it is large (fastml/_recycled_linear.py), in torch's layouts: where they
must come back channels-last (a channels-last input) but the weight is contiguous, the rows are
ordered (H, W, C) all the same and the weight is copied so, as torch's own convolution's
gradient is then a channels-last copy too. Results differ from torch's convolution only by the
order of the sums (float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastml import _recycled_linear
from fastml._pointwise import channels_last_like
from fastml.ops import relu_in_place
from fastml.ops.conv2d.reference import output_size

MAX_WINDOWS = 16
"""The most output pixels a candidate has: the windows are gathered as a copy that many times
the size of the weight's input side (its rows), small beside the weight such layers carry."""


def _output_size(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    return tuple(output_size(input.shape[2 + d], weight.shape[2 + d], conv.stride[d], 0, conv.dilation[d])
                 for d in (0, 1))


def applies(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``convolution`` computes ``conv``'s convolution of ``input`` as torch's module
    would: a floating 4-D strided CPU input with channels, a kernel larger than 1x1 (a 1x1 one is
    fastml/_pointwise.py's) fitting it unpadded 1 to ``MAX_WINDOWS`` times, one group. On the CPU
    only: the slow weight gradient it avoids is oneDNN's, and cuDNN writes other layouts (a
    contiguous float64 output for channels-last operands) that no GPU here could check."""
    if input.dim() != 4 or not input.is_floating_point() or input.layout != torch.strided:
        return False
    if input.device.type != "cpu" or input.shape[1] == 0:  # (no channels: torch's module gives no output channels)
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
    an in-place ReLU if ``relu``, as one matrix product, in the layouts torch's convolution writes:
    the output, and the input's and weight's gradients, channels-last where the input or the
    weight is, else (N, C, H, W)."""
    n, k = input.shape[0], weight.shape[0]
    if n == 0:  # nothing to compute: torch's own, which sets the layouts (the weight's zero gradient as the weight)
        out = F.conv2d(input, weight, bias, conv.stride, 0, conv.dilation)
        return relu_in_place(out) if relu else out
    height, width = _output_size(conv, input, weight)
    weight_last = channels_last_like(weight)
    out_last = weight_last or channels_last_like(input)
    gradients = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
    # Rows in (kH, kW, C) order where the weight is channels-last (it stays a view) or where the
    # gradients must come back channels-last: both then arrive as the permutes' back. Otherwise
    # (C, kH, kW), the gradients (N, C, H, W).
    last = weight_last or (out_last and gradients)
    matrix = (weight.permute(0, 2, 3, 1) if last else weight).reshape(k, -1)
    size = matrix.shape[1]
    image = input.permute(0, 2, 3, 1) if last else input  # (N, H, W, C) or (N, C, H, W)
    if input.shape[2:] == weight.shape[2:]:  # one window, the whole input
        rows = image.reshape(n, size)
    else:  # Tensor.unfold: views, and a gradient laid out as the unfolded tensor's sizes
        first = 1 if last else 2
        windows = image
        for d in range(2):
            span = conv.dilation[d] * (weight.shape[2 + d] - 1) + 1
            windows = windows.unfold(first + d, span, conv.stride[d])
        windows = windows[..., ::conv.dilation[0], ::conv.dilation[1]]
        # (N, H', W', C, kH, kW) or (N, C, H', W', kH, kW), each row then in the matrix's order
        windows = windows.permute(0, 1, 2, 4, 5, 3) if last else windows.permute(0, 2, 3, 1, 4, 5)
        rows = windows.reshape(n * height * width, size)
    if _recycled_linear.applies(rows, matrix, bias):
        out = _recycled_linear.linear(rows, matrix, bias)
    else:
        out = F.linear(rows, matrix, bias)
    if relu:  # on the product itself, before the views of it (as fastml/_pointwise.py's)
        out = out.relu_()
    out = out.view(n, height, width, k).permute(0, 3, 1, 2)  # channels-last
    if not out_last:  # (one pixel: torch's (N, K, 1, 1) strides, which .contiguous() would keep as they are)
        out = out.reshape(n, k).view(n, k, 1, 1) if height * width == 1 else out.contiguous()
    return out
