"""Pure-PyTorch 2-D convolution: the oracle, and the "reference" backend (torch's own
convolution and its backward, which the float64 tests run as the ground truth).

Every backend module provides the two functions below with these signatures and results:

``forward(x, weight, bias, stride, padding, dilation, groups) -> out``
    x (N, C, H, W) contiguous, floating; weight (K, C / groups, R, S) contiguous, x's dtype; bias
    (K,) or None; stride, padding, dilation: (rows, columns) pairs of ints (zero padding, the same
    on both sides: asymmetric "same" padding is applied to x before); groups divides C and K.
    out (N, K, OH, OW), OH = (H + 2·padding[0] − dilation[0]·(R − 1) − 1) // stride[0] + 1 (OW alike).
``backward(grad, x, weight, stride, padding, dilation, groups, needs) -> (grad_x, grad_weight, grad_bias)``
    grad (N, K, OH, OW) contiguous; needs: three bools (input, weight, bias); an unneeded gradient
    is None. grad_bias is grad summed over N, OH, OW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def forward(x, weight, bias, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def backward(grad, x, weight, stride, padding, dilation, groups, needs):
    need_x, need_w, need_b = needs
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if need_b else None, list(stride), list(padding), list(dilation), False,
        [0, 0], groups, [need_x, need_w, need_b])
    return grad_x, grad_w, grad_b
