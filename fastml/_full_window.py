"""A convolution whose window covers its whole input, as one matrix product: a variant of torch's
own convolution that a layer's measured choice may run, forward and backward, on any device and
floating dtype.

Where the kernel is exactly as large as the (unpadded) input, the output is one pixel and each
output channel weighs every input value once: the convolution is a linear layer on the flattened
input, ``out[n, k] = sum over c, i, j of W[k, c, i, j] x[n, c, i, j]``. Networks written fully
convolutionally hold such layers where a classifier would hold Linear: LeNet-5's C5 (16x5x5 ->
120), VGG's and AlexNet's classifiers as convolutions (timm's ConvMlp, 512x7x7 -> 4096; FCN
heads). torch's CPU convolution runs them as convolutions, its weight gradient slowest of all: on
a 2-core Zen 5, 8x512x7x7 -> 4096 took 610 ms forward and backward, 94 ms as this product, and
LeNet's C5 at batch 8, 0.22 ms against 0.07 ms. Elsewhere the convolution may still win (a small
layer where oneDNN's call costs nothing much), so this is only ever a candidate: the measured
choice times it against torch's module, backward included where gradients are wanted.

The input is flattened in the weight's memory order, so the weight, the large operand, is always
a view: (C, H, W) order for a contiguous weight, (H, W, C) for a channels-last one (only the
input, one window per image, may be copied). Gradients flow through torch's own ops, the weight's
written into memory kept from the previous step where it is large (fastml/_recycled_linear.py).
Results differ from torch's convolution only by the order of the sums (float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastml import _recycled_linear
from fastml._pointwise import channels_last_like


def applies(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``convolution`` computes ``conv``'s convolution of ``input`` as torch's module
    would: a floating 4-D strided input exactly the size of a kernel larger than 1x1 (a 1x1 one
    is fastml/_pointwise.py's), one group, no padding, no dilation (any stride: there is one
    window)."""
    if input.dim() != 4 or not input.is_floating_point() or input.layout != torch.strided:
        return False
    kernel = weight.shape[2:]
    if input.shape[2:] != kernel or kernel[0] * kernel[1] == 1:
        return False
    if conv.groups != 1 or weight.dtype != input.dtype or tuple(conv.dilation) != (1, 1):
        return False
    return conv.padding == "valid" or (conv.padding != "same" and tuple(conv.padding) == (0, 0))


def convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                relu: bool = False) -> torch.Tensor:
    """``conv``'s convolution of ``input`` (where ``applies``) with ``weight`` and ``bias``, then
    an in-place ReLU if ``relu``, as one matrix product, in the layout torch's convolution writes
    (channels-last where the input or the weight is, but for an empty batch)."""
    n = input.shape[0]
    k = weight.shape[0]
    window = weight[0].numel()
    if channels_last_like(weight):  # (K, H, W, C) in memory: flatten everything that way
        matrix = weight.permute(0, 2, 3, 1).reshape(k, window)
        rows = input.permute(0, 2, 3, 1).reshape(n, window)
    else:
        matrix = weight.reshape(k, window)
        rows = input.reshape(n, window)
    if _recycled_linear.applies(rows, matrix, bias):
        out = _recycled_linear.linear(rows, matrix, bias)
    else:
        out = F.linear(rows, matrix, bias)
    if n and (channels_last_like(input) or channels_last_like(weight)):
        out = out.view(n, 1, 1, k).permute(0, 3, 1, 2)
    else:
        out = out.view(n, k, 1, 1)
    return out.relu_() if relu else out
