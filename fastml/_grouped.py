"""A direct convolution for small groups, depthwise and grouped: a variant a layer's measured
choice may run for channels-last input on the CPU, in inference (``convolution``) and in training
(``differentiable_convolution``: a depthwise layer's backward by fastml's kernels too, a grouped
one's by torch's own convolution backward).

A depthwise convolution (MobileNet's, EfficientNet's, ShuffleNet's) does R·S multiply-adds per
output, a grouped one with 8-channel groups (RegNet's) 72 for a 3x3 kernel: they move about as
many bytes as they compute flops, and at the small images of a network's last stages the per-call
set-up and matrix blocking of torch's oneDNN path are most of their time (5 to 30 GFLOP/s at
4x4 to 7x7 on a 2-core Zen 3). fastml's kernel (csrc/grouped_conv.cpp) reads each input row from
L1 for every tap, vectorises over channels (depthwise) or over a group's output channels
(grouped), and writes each output once, bias and ReLU in its epilogue. It is only a candidate:
at large images oneDNN's blocking is as fast or faster (16x32x56x56 depthwise: 0.85x), and the measured
choice keeps torch's module there.

Offered where it computes what torch's module would, layout included: channels-last float32 or
float64 input on the CPU (the output channels-last, as torch writes for such input), zero
padding given as numbers, more than one group, and either one input and one output channel per
group (depthwise) or at least 4 output channels per group (fewer would leave the vectors mostly
empty). Not while a graph is traced: the packed weight is cached state a graph would not see.

In inference the weight is packed once per weight version ((R, S, C) depthwise, (G, R, S, C/G,
K/G) grouped) and cached on the layer like oneDNN's packing (fastml/_onednn.py); in training it
is packed on every call. A weight with an inf or NaN goes to torch's convolution (see
``convolution``). Results differ from torch's only by the order of the sums.
"""

from __future__ import annotations

import functools

import torch

from fastml import _conv_backward, _cpp, _layout, _onednn, _route
from fastml.functional import _variant_can_run
from fastml.ops import forward_ad_active, relu_in_place
from fastml.ops.conv2d.reference import output_size

WEIGHT_ATTR = "_fastml_grouped_weight"
_route.DERIVED_WEIGHT_ATTRS.add(WEIGHT_ATTR)
MIN_OUTPUTS_PER_GROUP = 4


@functools.cache
def _kernels_built() -> bool:
    """Whether fastml._C has the kernels (a build without the extension, or an older one, not)."""
    try:
        for name in ("grouped_conv_forward", "depthwise_conv_backward_input", "depthwise_conv_backward_weight"):
            _cpp.kernel(name, torch.float32)
        return True
    except (ImportError, AttributeError):
        return False


def depthwise(conv: torch.nn.Conv2d) -> bool:
    return conv.in_channels == conv.out_channels == conv.groups


def applies(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``convolution`` (or, with gradients wanted, ``differentiable_convolution``)
    computes ``conv``'s convolution of ``input`` with ``weight`` and ``bias`` as torch's module
    would (see the module's docstring)."""
    if conv.groups == 1 or not (depthwise(conv) or conv.out_channels // conv.groups >= MIN_OUTPUTS_PER_GROUP):
        return False
    if not _variant_can_run(input, weight, bias) or forward_ad_active() or not _kernels_built():
        return False  # (traced, torch.func's transforms, autocast, a dispatch mode, forward-mode AD: torch's ops)
    if input.dim() != 4 or input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
        return False
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        return False
    if not _onednn.strictly_channels_last(input) or not _onednn.shapes_agree(conv, input, weight, bias):
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or input.numel() == 0:
        return False
    return all(size > 0 for size in _output_size(conv, input))


def _output_size(conv: torch.nn.Conv2d, input: torch.Tensor) -> tuple[int, int]:
    return tuple(output_size(input.shape[2 + d], conv.kernel_size[d], conv.stride[d], conv.padding[d],
                             conv.dilation[d]) for d in (0, 1))


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(K, C/G, R, S) → the kernel's layout: (R, S, C) depthwise, else (G, R, S, C/G, K/G)."""
    k, cpg, r, s = weight.shape
    weight = weight.detach()
    if cpg == 1 and k == groups:
        return weight.reshape(k, r * s).t().contiguous()
    return weight.reshape(groups, k // groups, cpg, r, s).permute(0, 3, 4, 2, 1).contiguous()


def _cached_packing(conv: torch.nn.Conv2d, weight: torch.Tensor) -> _onednn.PackedWeight:
    cache = conv.__dict__.get(WEIGHT_ATTR)
    if cache is None:
        cache = _onednn.PackedWeight()  # (source, key, packed, finite), derived state as oneDNN's
        object.__setattr__(conv, WEIGHT_ATTR, cache)  # a plain attribute: not state, not a buffer
    # a weight packed in inference mode is an inference tensor: kept apart from one outside
    state = _route.state_key(weight)  # None: derived anew at every call
    key = None if state is None else (state, torch.is_inference_mode_enabled())
    # The source is held with its packing, so (identity, storage, version) names one weight.
    if key is None or cache.source is not weight or cache.key != key:
        cache.packed = pack_weight(weight, conv.groups)
        cache.finite = _onednn.finite(cache.packed)
        cache.source, cache.key = weight, key
    return cache


def _run(conv: torch.nn.Conv2d, input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
         relu: bool) -> torch.Tensor:
    """The kernel on ``input`` with a packed weight: a channels-last output."""
    n, c, h, w = input.shape
    k = conv.out_channels
    r, s = conv.kernel_size
    oh, ow = _output_size(conv, input)
    out = torch.empty((n, k, oh, ow), dtype=input.dtype, memory_format=torch.channels_last)
    bias = None if bias is None else bias.detach().contiguous()  # held: the kernel reads its address
    _cpp.kernel("grouped_conv_forward", input.dtype)(
        input.data_ptr(), n, h, w, c, packed.data_ptr(), 0 if bias is None else bias.data_ptr(), k, conv.groups,
        r, s, *conv.stride, *conv.padding, *conv.dilation, oh, ow, relu, out.data_ptr(), _cpp.threads())
    return out


def _torchs(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            relu: bool) -> torch.Tensor:
    out = _layout.torch_convolution(conv, input, weight, bias)
    return relu_in_place(out) if relu else out


def convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                relu: bool) -> torch.Tensor:
    """``conv``'s convolution of ``input`` (then ReLU if ``relu``), channels-last out, without
    autograd, on a weight packed once per weight version. Only where ``applies``.

    A non-finite weight goes to torch's convolution: the kernel multiplies the zero padding by
    every weight (0 · inf is NaN), where torch's skips the taps that fall in the padding."""
    cache = _cached_packing(conv, weight)
    if not cache.finite:
        return _torchs(conv, input, weight, bias, relu)
    return _run(conv, input, cache.packed, bias, relu)


def differentiable_convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``convolution`` with gradients: a depthwise one's by fastml's kernels (``_Depthwise``),
    a grouped one's by torch's own convolution backward. The weight is packed on every call,
    not cached: it changes every training step, and a change through ``.data`` (as gradcheck's,
    or a hand-written update) leaves no version behind (a copy of a small weight: 127 KB for
    RegNet's largest grouped layer). The ReLU runs in place after, as torch's sequence does."""
    packed = pack_weight(weight, conv.groups)
    if not _onednn.finite(packed):
        return _torchs(conv, input, weight, bias, relu)
    if depthwise(conv):
        out = _Depthwise.apply(input, weight, bias, conv, packed)
    else:
        out = _conv_backward.with_torch_backward(conv, lambda x, w, b: _run(conv, x, packed, b, False),
                                                 input, weight, bias)
    return relu_in_place(out) if relu else out


class _Depthwise(torch.autograd.Function):
    """A depthwise convolution, forward and backward by fastml's kernels (csrc/grouped_conv.cpp):
    the input's gradient gathers each input pixel's taps from the output gradient, the weight's
    sums each tap's products over every output pixel. On a 2-core Zen 3 torch's depthwise
    backward ran at 6 to 16 GFLOP/s on MobileNet's and ShuffleNet's layers. A backward that
    itself builds a graph (create_graph=True) is torch's, whose ops are differentiable."""

    @staticmethod
    def forward(ctx, input, weight, bias, conv, packed):
        ctx.save_for_backward(input, weight)
        ctx.has_bias, ctx.conv, ctx.packed = bias is not None, conv, packed
        return _run(conv, input, packed, bias, False)

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        conv = ctx.conv
        if torch.is_grad_enabled():  # double backward: torch's differentiable backward
            return _conv_backward.torch_backward(ctx, grad, input, weight, conv) + (None,)
        grad = grad.contiguous(memory_format=torch.channels_last)
        n, c, h, w = input.shape
        r, s = conv.kernel_size
        oh, ow = grad.shape[2:]
        geometry = (r, s, *conv.stride, *conv.padding, *conv.dilation, oh, ow)
        threads = _cpp.threads()
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.empty_like(input, memory_format=torch.channels_last)
            _cpp.kernel("depthwise_conv_backward_input", input.dtype)(
                grad.data_ptr(), n, h, w, c, ctx.packed.data_ptr(), *geometry, grad_input.data_ptr(), threads)
        if ctx.needs_input_grad[1]:
            packed = torch.empty((r, s, c), dtype=input.dtype)
            _cpp.kernel("depthwise_conv_backward_weight", input.dtype)(
                input.data_ptr(), grad.data_ptr(), n, h, w, c, *geometry, packed.data_ptr(), threads)
            grad_weight = packed.permute(2, 0, 1).reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None
