"""Pure-PyTorch batch normalisation over the batch's own statistics (training mode), with an
optional ReLU on the result: the oracle, and the "reference" backend.

Every backend module provides the two functions below with these signatures and results:

``forward(x, weight, bias, eps, relu) -> (out, stats)``
    x (N, C, H, W) floating, either contiguous or channels-last (``x.is_contiguous(
    memory_format=torch.channels_last)``), with N·H·W ≥ 1; weight, bias (C,) contiguous, each
    or both None (no scale: 1; no shift: 0); eps: float; relu: bool. ``stats`` (3, C) in x's
    dtype: the batch mean, the biased batch variance (over N, H, W) and
    invstd = 1 / sqrt(var + eps). ``out`` has x's shape, dtype and memory layout:

        scale = invstd · weight,  shift = bias − mean · scale,  out = x · scale + shift

    (torch's own formula for its channels-last kernels), then max(out, 0) where ``relu``, NaN kept
    as NaN. A kernel computes ``x · scale + shift`` the same way in forward and in backward (the
    C++ one as a fused multiply-add where the build has FMA), so that backward, which recomputes
    it for the ReLU's mask, finds forward's signs bit for bit.
``backward(grad, x, weight, bias, stats, relu) -> (grad_input, grad_weight, grad_bias)``
    grad: the gradient of ``out``, x's shape in x's memory layout; x, weight, bias, relu: as
    given to forward; stats: forward's. With g = grad where ``relu`` is off, else 0 where
    forward's pre-ReLU value ``x · scale + shift`` ≤ 0 and grad elsewhere (NaN passes the
    gradient, as torch's ReLU backward lets it):

        grad_bias   = Σ g                           (None without bias)
        grad_weight = Σ g · (x − mean) · invstd      (None without weight)
        grad_input  = (g − mean(g) − (x − mean) · invstd² · mean(g · (x − mean))) · invstd · weight

    sums and means over N, H, W per channel; grad_input in x's memory layout.
"""

from __future__ import annotations

import torch

from fastml import _layout

DIMS = (0, 2, 3)  # the reduced dimensions: every one but the channels'


def like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of x's shape, dtype and memory layout."""
    return torch.empty_like(x, memory_format=layout_of(x))


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels-last x (one that is not also contiguous: C = 1 or H = W = 1
    are both), or one whose strides are in channels-last order (a channel-sliced view of one:
    torch's suggest_memory_format), else contiguous."""
    if not x.is_contiguous() and (x.is_contiguous(memory_format=torch.channels_last)
                                  or _layout.suggests_channels_last(x)):
        return torch.channels_last
    return torch.contiguous_format


def affine(weight, bias, stats):
    """(scale, shift) per channel, forward's formula (module docstring)."""
    mean, invstd = stats[0], stats[2]
    scale = invstd if weight is None else invstd * weight
    shift = -(mean * scale) if bias is None else bias - mean * scale
    return scale, shift


def channel_shift(x: torch.Tensor) -> torch.Tensor:
    """(C,) float64: each channel's first value, x[0, c, 0, 0], where finite, else 0. The kernels
    sum x − shift and its square: about a value of the channel, a large mean does not cancel the
    variance away; an infinite shift would make every difference infinite or NaN."""
    first = x[0, :, 0, 0].detach().double()
    return torch.where(first.isfinite(), first, 0.0)


def stats_from_sums(shift: torch.Tensor, sums: torch.Tensor, count: int, eps: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """forward's (3, C) statistics in ``dtype`` from the kernels' float64 sums (2, C) of x − shift
    and (x − shift)² over ``count`` values per channel, ``shift`` as they subtracted it."""
    mean_shift = sums[0] / count
    spread = sums[1] / count - mean_shift * mean_shift
    var = torch.where(spread < 0, 0.0, spread)  # (rounding can take it below 0; NaN stays NaN)
    return torch.stack((shift + mean_shift, var, 1.0 / torch.sqrt(var + eps))).to(dtype)


def gradient_terms(sums: torch.Tensor, stats: torch.Tensor, count: int, weight, bias, dtype: torch.dtype,
                   coefficient_dtype: torch.dtype):
    """(grad_weight, grad_bias, k, mean_g) from the kernels' float64 sums (2, C) of g and
    g · (x − mean): backward's formula (module docstring) with k = invstd² · mean(g · (x − mean));
    the gradients in ``dtype`` (None for an absent parameter), k and mean_g in
    ``coefficient_dtype``, what the elementwise pass computes in."""
    invstd = stats[2].double()
    grad_bias = None if bias is None else sums[0].to(dtype)
    grad_weight = None if weight is None else (sums[1] * invstd).to(dtype)
    k = (invstd * invstd * sums[1] / count).to(coefficient_dtype)
    return grad_weight, grad_bias, k, (sums[0] / count).to(coefficient_dtype)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, 1, 1)


def forward(x, weight, bias, eps, relu):
    # A sum, then the spread about it, as torch's batch norm: its mean of integers is exact (a
    # ReLU boundary at the mean falls where torch's does), and of a channel holding ±inf is ±inf
    # (var_mean's running update gives NaN there). The sum in float64, then the mean rounded to
    # x's dtype, as the kernels keep it: summed in float32, 572 values about 50 (a mean large
    # against the spread) lost ~1e-5 of their mean, which the weight's gradient multiplies by the
    # sum of the upstream gradient (2.6e-4 off in a gradient of 0.5, against float64's).
    count = x.numel() // x.shape[1] if x.shape[1] else 1  # (no channels: an empty mean)
    mean = (x.sum(DIMS, dtype=torch.float64) / count).to(x.dtype)
    var = (x - _per_channel(mean)).square().mean(DIMS)
    invstd = torch.rsqrt(var + eps)
    stats = torch.stack((mean, var, invstd))
    scale, shift = affine(weight, bias, stats)
    out = torch.addcmul(_per_channel(shift), x, _per_channel(scale))
    if relu:
        out = torch.relu(out)
    return out.contiguous(memory_format=layout_of(x)), stats


def backward(grad, x, weight, bias, stats, relu):
    mean, invstd = stats[0], stats[2]
    g = grad
    if relu:
        scale, shift = affine(weight, bias, stats)
        g = torch.where(torch.addcmul(_per_channel(shift), x, _per_channel(scale)) <= 0, 0, grad)
    centred = x - _per_channel(mean)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    sum_g = g.sum(DIMS)
    sum_gc = (g * centred).sum(DIMS)
    grad_bias = None if bias is None else sum_g
    grad_weight = None if weight is None else sum_gc * invstd
    scale = invstd if weight is None else invstd * weight
    k = invstd * invstd * sum_gc / count
    grad_input = (g - _per_channel(sum_g / count) - centred * _per_channel(k)) * _per_channel(scale)
    return grad_input.contiguous(memory_format=layout_of(x)), grad_weight, grad_bias
