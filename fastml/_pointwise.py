"""A 1x1 convolution as one matrix product: a variant of torch's own convolution that a layer's
measured choice may run, forward and backward, on any device and floating dtype.

A 1x1 convolution of a channels-last input (N, C, H, W) is the product of its (N·H·W, C) rows
with the (C, K) transposed weight, which lands in memory as the channels-last (N, K, H, W)
output: ``torch.addmm`` on views, nothing copied. For an (N, C, H, W)-contiguous input it is one
(K, C) x (C, H·W) product per image (``torch.baddbmm``), which lands as the contiguous output.
Either way the caller gets torch's convolution's shape and layout. A stride subsamples the input
first (a copy of 1/stride² of it).

Why: oneDNN's convolution has a fixed cost per call (primitive set-up and a weight reorder) that
a squeeze-excitation block's 1x1 convolutions on 1x1 pixels never earn back: on a 2-core Zen 3,
16x8x1x1 → 32 took 108 µs there and 19 µs as a product; and torch's (N, C, H, W) path is slow for
some shapes (16x32x14x14 → 192: 3.3 ms against 0.44 ms). Elsewhere oneDNN wins (16x32x56x56 →
48: 1.2 ms against 2.1 ms), so this is only ever a candidate: the measured choice times it
against torch's module, backward included where gradients are wanted, and keeps the faster.

Gradients flow through torch's own ops (autograd of addmm / baddbmm and the views), so training
uses the same products transposed. Results differ from torch's convolution only by the order of
the sums (float rounding), as oneDNN's own algorithms differ from each other.
"""

from __future__ import annotations

import torch


def applies(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``convolution`` computes ``conv``'s convolution of ``input`` as torch's module
    would: a floating 4-D strided input, a 1x1 kernel, one group, no padding."""
    if input.dim() != 4 or not input.is_floating_point() or input.layout != torch.strided:
        return False
    if tuple(weight.shape[2:]) != (1, 1) or conv.groups != 1 or weight.dtype != input.dtype:
        return False
    return conv.padding in ("valid", "same") or tuple(conv.padding) == (0, 0)


def channels_last_like(t: torch.Tensor) -> bool:
    """Whether torch takes the 4-D ``t`` for channels-last by its strides (c10's
    ``is_channels_last_strides_2d_s4``, behind ``suggest_memory_format``): the strides grow from
    C through W and H to N, a dimension of size one taking any stride, and the ambiguous ones
    (N, 1, 1, 1) counted as (N, C, H, W). torch's convolution writes a channels-last output
    where its input or its weight is so (checked against F.conv2d on every mix of one-sized
    dimensions and both layouts, float32 and float64, in tests/test_pointwise.py)."""
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * max(sizes[d], 1)
    return True


def convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                relu: bool = False) -> torch.Tensor:
    """``conv``'s 1x1 convolution of ``input`` (where ``applies``) with ``weight`` and ``bias``,
    then an in-place ReLU if ``relu``, as matrix products, in the layout torch's convolution
    writes (see the module's docstring)."""
    channels_last = channels_last_like(input) or channels_last_like(weight)
    sh, sw = conv.stride
    n, c, h, w = input.shape
    h, w = (h - 1) // sh + 1, (w - 1) // sw + 1  # the output's size
    k = weight.shape[0]
    matrix = weight.reshape(k, c)
    # The ReLU goes on each product itself, in place, before the views of it are taken: in place
    # on a view that autograd tracks would make its backward copy through the product (relu_in_place).
    if (sh, sw) != (1, 1) and not channels_last:
        input = input[:, :, ::sh, ::sw]  # (a copy of 1/stride² of it, below)
    if channels_last or h * w == 1:  # (one pixel: the rows are the planes, one product does)
        pixels = input.permute(0, 2, 3, 1)  # a view of a channels-last input
        if (sh, sw) != (1, 1) and channels_last:
            # subsampled as (N, H, W, C): the slice's backward writes the input's gradient
            # channels-last, as torch's convolution hands it back here
            pixels = pixels[:, ::sh, ::sw]
        rows = pixels.reshape(n * h * w, c)
        out = torch.mm(rows, matrix.t()) if bias is None else torch.addmm(bias, rows, matrix.t())
        out = (out.relu_() if relu else out).view(n, h, w, k).permute(0, 3, 1, 2)
        if not channels_last:  # torch's (N, C, H, W) strides for its (N, K, 1, 1) output
            out = out.reshape(n, k).view(n, k, h, w)
    else:
        planes = input.reshape(n, c, h * w)  # a view of an (N, C, H, W)-contiguous input
        if bias is None:
            out = torch.matmul(matrix, planes)
        else:
            out = torch.baddbmm(bias.view(1, k, 1), matrix.expand(n, k, c), planes)
        # (a product may give its size-one dimensions other strides, which torch's layout
        # heuristics downstream would read as channels-last: through (N, K·H·W) they are torch's)
        out = (out.relu_() if relu else out).reshape(n, k * h * w).view(n, k, h, w)
    return out
