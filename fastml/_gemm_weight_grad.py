"""A convolution whose weight gradient is one matrix product over unfolded input: a variant a
layer's measured choice may run in training, on the CPU.

torch's forward and input gradient run as they do in its module (``F.conv2d``, and ``aten.
convolution_backward`` asked for the input's and bias's gradients only). The weight gradient

    dW[k, c, r, s] = sum over n, p, q of  g[n, k, p, q] · x_pad[n, c, p·sh + r·dh, q·sw + s·dw]

is the product of g's (N·P·Q, K) rows with the (N·P·Q, R·S·C) matrix of input windows (im2col),
which torch's BLAS runs near its peak. oneDNN's weight-gradient kernel is the slowest of its
three convolution passes at a network's last stages: on a 2-core Zen 3, 16x512x4x4 3x3 layers
ran at 52 GFLOP/s in it where the forward ran at 77, and the product form took 9.2 ms where
oneDNN took 22.5 (2.4x; 16x256x7x7 stride 2: 2.1x). At 28x28 and larger the unfolded input
costs a pass over memory as large as the product saves, and oneDNN keeps its lead or ties: the
measured choice decides, per layer.

The unfolded input goes through in chunks of whole images (or, for one large image, of output
rows) that fit in half the last-level cache the CPU reports, each chunk padded and unfolded on its
own and its product accumulated into the gradient, so the extra memory is bounded whatever the
batch and image size.
A backward that builds a graph (double backward) or runs batched is torch's own throughout.
Results differ from torch's by the order of the sums (float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastml import _conv_backward, _onednn
from fastml._winograd import last_level_cache_bytes
from fastml.functional import _variant_can_run
from fastml.ops import backward_in_torch_ops, forward_ad_active, is_compiling, relu_in_place


def applies(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the variant computes ``conv``'s convolution of ``input`` as torch's module would
    and has a weight gradient to compute: a channels-last floating CPU input of the weight's
    dtype, one group, zero padding given as numbers, the weight's gradient wanted. Not under a
    torch.func transform, forward-mode AD (no jvp here), autocast or a traced graph. (On (N, C,
    H, W) input the copies to rows of channels cost more than the product saves: 0.88x to 0.96x
    oneDNN's on a 2-core Zen 3 where channels-last gave 1.1x to 2.4x.)"""
    if not (torch.is_grad_enabled() and weight.requires_grad) or conv.groups != 1:
        return False
    if not _variant_can_run(input, weight, bias) or forward_ad_active():
        return False
    if input.dim() != 4 or input.device.type != "cpu" or input.numel() == 0:
        return False
    if not _onednn.strictly_channels_last(input):
        return False
    if input.dtype not in (torch.float32, torch.float64) or weight.dtype != input.dtype:
        return False
    if bias is not None and bias.dtype != input.dtype:
        return False
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                relu: bool) -> torch.Tensor:
    """``conv``'s convolution of ``input`` (then an in-place ReLU if ``relu``), differentiable,
    the weight gradient by ``weight_gradient``. Only where ``applies``."""
    out = _GemmWeightGrad.apply(input, weight, bias, conv)
    return relu_in_place(out) if relu else out


class _GemmWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, conv):
        ctx.save_for_backward(input, weight)
        ctx.has_bias, ctx.conv = bias is not None, conv
        return F.conv2d(input, weight, bias, conv.stride, conv.padding, conv.dilation, 1)

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        conv = ctx.conv
        if backward_in_torch_ops(grad) or is_compiling():
            return _conv_backward.torch_backward(ctx, grad, input, weight, conv)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        grad_input = grad_bias = grad_weight = None
        if need_input or need_bias:
            grad_input, _, grad_bias, _ = _conv_backward.torch_backward(ctx, grad, input, weight, conv,
                                                                        weight_grad=False)
        if need_weight:
            # channels-last, as torch's weight gradient for a channels-last input (AccumulateGrad
            # copies it into the parameter's layout, for torch's as for this one)
            grad_weight = weight_gradient(grad, input, weight.shape, conv.stride, conv.padding, conv.dilation)
        return grad_input, grad_weight, grad_bias, None


def weight_gradient(grad: torch.Tensor, input: torch.Tensor, weight_shape, stride, padding,
                    dilation) -> torch.Tensor:
    """dL/dW (K, C, R, S) of a one-group convolution for upstream ``grad`` (N, K, P, Q) and
    ``input`` (N, C, H, W), as products of g's rows with the unfolded input, chunk by chunk
    (see the module's docstring). Channels-last strides: the product's own layout."""
    k, c, r, s = weight_shape
    n, _, p, q = grad.shape
    rows = input.permute(0, 2, 3, 1)  # (N, H, W, C): a view of channels-last input
    height = rows.shape[1]
    ph, pw = padding
    g = grad.permute(0, 2, 3, 1)  # (N, P, Q, K)
    span_h, span_w = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1
    out = grad.new_zeros((k, r * s * c))
    for n0, n1, p0, p1 in _chunks(n, p, q * r * s * c * input.element_size()):
        # the input rows these output rows read, in unpadded coordinates, padded here: a chunk's copy
        first, end = p0 * stride[0] - ph, (p1 - 1) * stride[0] + span_h - ph
        inside_first, inside_end = max(first, 0), min(end, height)
        if inside_first >= inside_end:  # every row in the padding
            inside_first = inside_end = 0
            top, bottom = end - first, 0
        else:
            top, bottom = inside_first - first, end - inside_end
        slab = rows[n0:n1, inside_first:inside_end]
        if top or bottom or pw:
            slab = F.pad(slab, (0, 0, pw, pw, top, bottom))
        windows = slab.unfold(1, span_h, stride[0]).unfold(2, span_w, stride[1])  # (n, p, Q, C, span_h, span_w)
        if span_h != r or span_w != s:
            windows = windows[..., ::dilation[0], ::dilation[1]]
        columns = windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, r * s * c)  # one copy: (n·p·Q, R·S·C)
        out.addmm_(g[n0:n1, p0:p1].reshape(-1, k).t(), columns)
    return out.view(k, r, s, c).permute(0, 3, 1, 2)


def _chunks(images: int, rows: int, bytes_per_row: int):
    """(first image, end image, first output row, end output row) of each chunk: whole images
    while an image's unfolded input fits the budget (half the last-level cache), else one
    image's output rows in blocks."""
    budget = max(1, last_level_cache_bytes() // 2 // max(1, bytes_per_row))  # output rows per chunk
    if budget >= rows:
        step = budget // rows
        for n0 in range(0, images, step):
            yield n0, min(images, n0 + step), 0, rows
    else:
        for n0 in range(images):
            for p0 in range(0, rows, budget):
                yield n0, n0 + 1, p0, min(rows, p0 + budget)
