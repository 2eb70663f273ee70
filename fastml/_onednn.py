"""torch's oneDNN convolution with its weight packed once and a ReLU in its epilogue: a variant of
torch's own convolution that a layer's measured choice may run, for channels-last input in
inference.

Eager ``F.conv2d`` on the CPU hands oneDNN the weight in torch's plain (K, C, R, S) layout on
every call, and oneDNN reorders it into its blocked layout each time; a following ReLU is a second
pass over the output. torch also has the ops its own compiler (inductor) uses for frozen CPU
models: ``mkldnn._reorder_convolution_weight`` packs the weight once, and
``mkldnn._convolution_pointwise`` runs the convolution on the packed weight with a post-op such
as ReLU applied as each output block is written. On a 2-core Zen 4, with channels-last input at
batch 16, that measured 1.04x to 1.64x torch's convolution + ReLU on ResNet's and MobileNet's
layers (bench/results/).

It is offered only where it computes what torch's module would, layout included:
- channels-last input (the pointwise op writes a channels-last output, as torch's convolution does
  for such input; for (N, C, H, W)-contiguous input torch writes that layout, and converting back
  costs more than the packing saves);
- no gradient wanted (the op has no backward);
- float32 on the CPU, zero padding given as numbers, and a torch built with oneDNN that has the ops.

The packed weight is cached on the layer, keyed by the source weight's identity, storage and
version (an optimizer step, ``load_state_dict`` or a newly folded weight changes one of them;
``_route.state_key``) and by the input's shape, for which oneDNN chose the packing.
"""

from __future__ import annotations

import torch

from fastml import _route
from fastml.functional import _variant_can_run
from fastml.ops import forward_ad_active, relu_in_place

PACKED_ATTR = "_fastml_packed_weight"
_route.DERIVED_WEIGHT_ATTRS.add(PACKED_ATTR)


def _ops():
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        return ops._reorder_convolution_weight.default, ops._convolution_pointwise.default
    except (AttributeError, RuntimeError):  # a torch without inductor's CPU ops
        return None


_OPS = _ops()


def ops():
    """(reorder the weight, convolve on the packed weight) as torch's mkldnn ops, or None where
    this torch lacks them; for other variants built on the same packing (fastml/_winograd.py)."""
    return _OPS


def applies(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``packed_convolution`` computes ``conv``'s convolution of ``input`` with ``weight``
    and ``bias`` as torch's module would (see the module's docstring)."""
    if not packable(conv, input, weight, bias):
        return False
    return not gradients_wanted(input, weight, bias)


def gradients_wanted(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a convolution of these would be recorded for a backward."""
    return torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def packable(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """``applies`` but for the gradient: whether oneDNN's packed convolution can compute this
    forward as torch's module would, layout included (for a variant with a backward of its own,
    fastml/_winograd.py). Never while a graph is traced (torch.compile, torch.jit.trace): the
    packing is cached state a graph would not see; nor under forward-mode AD, whose tangents
    these ops would drop."""
    if _OPS is None or not _variant_can_run(input, weight, bias) or forward_ad_active():
        return False  # (traced, under torch.func's transforms, autocast or a dispatch mode: torch's ops)
    if input.dim() != 4 or input.device.type != "cpu" or input.dtype != torch.float32:
        return False
    if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        return False
    if not strictly_channels_last(input) or not shapes_agree(conv, input, weight, bias):
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    return input.numel() != 0


def shapes_agree(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the 4-D ``input``, ``weight`` and ``bias`` have the shapes ``conv``'s attributes
    say. The variants size their kernels from those attributes, and walk the tensors by address:
    a tensor replaced after the layer was made (a new Parameter, another ``.data``) may be
    smaller. torch's own convolution then computes what the tensors' shapes say, or raises."""
    return (input.shape[1] == conv.in_channels
            and weight.shape == (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
            and (bias is None or bias.shape == (conv.out_channels,)))


def strictly_channels_last(input: torch.Tensor) -> bool:
    """Whether the 4-D ``input`` is channels-last and not also (N, C, H, W)-contiguous: a tensor
    that is both (1x1 images, one channel) gets torch's own layout choice, not a variant's."""
    return not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)


def packed_convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``conv``'s convolution of ``input`` (then ReLU if ``relu``) on oneDNN with ``weight``
    packed once per weight version and input shape. Only where ``applies``."""
    reorder, convolution = _OPS
    padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    state = _route.state_key(weight)  # None: packed anew at every call
    key = None if state is None else (state, tuple(input.shape), torch.is_inference_mode_enabled())
    cache = conv.__dict__.get(PACKED_ATTR)
    if cache is None:
        cache = PackedWeight()
        object.__setattr__(conv, PACKED_ATTR, cache)  # a plain attribute: not state, not a buffer
    # The source weight itself is held with its packing: while it lives, no other tensor can take
    # its storage, so (identity, storage, version) cannot be matched by a different weight.
    if key is None or cache.source is not weight or cache.key != key:
        with torch.no_grad():
            cache.packed = reorder(weight.detach(), padding, stride, dilation, conv.groups, list(input.shape))
            cache.finite = finite(weight)
        cache.source, cache.key = weight, key
    bias = None if bias is None else bias.detach().contiguous()  # (oneDNN reads it densely)
    # oneDNN's ReLU post-op is max(x, 0), which turns NaN into 0 where torch's relu keeps it. A NaN
    # out of the convolution needs an inf or NaN in its input, weight or bias (or an overflow to
    # inf - inf, left alone): where a sum says there may be one, the ReLU runs after, as torch's.
    epilogue = relu and cache.finite and finite(input) and (bias is None or finite(bias))
    out = convolution(input, cache.packed, bias, padding, stride, dilation, conv.groups,
                      "relu" if epilogue else "none", [], "")
    return relu_in_place(out) if relu and not epilogue else out


def finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no inf or NaN, or its sum overflowed (one read, no allocation the
    size of the tensor: a few percent of the convolution that reads it)."""
    return bool(tensor.sum().isfinite())


class PackedWeight:
    """A layer's packed weight and what it was packed from. Derived state: a copy or a pickle of
    the layer starts without it (oneDNN's packed tensors can be neither)."""
    __slots__ = ("source", "key", "packed", "finite")

    def __init__(self) -> None:
        self.source = self.key = self.packed = None
        self.finite = False

    def __reduce__(self):
        return PackedWeight, ()

    def __deepcopy__(self, memo):
        return PackedWeight()

