"""``fastml.patch(model, channels_last=True)``: the model's activations in the channels-last layout
between its input and its output, where that measures faster.

oneDNN's CPU convolutions, batch norms and pools run faster on (N, H, W, C) memory than on
(N, C, H, W) for most layers of today's classifiers (depthwise and 1x1 convolutions most of all:
3x on MobileNet's depthwise layers on a 2-core Zen 4), and on that layout a convolution can run on
a weight packed once with its ReLU in the epilogue (fastml/_onednn.py). torch's ops keep the
layout they are given, so converting the model's input once is enough. Converting at each
convolution and back (the layers' "channels_last" variant) costs about what it saves.

The conversion is explicit (an option of ``patch``) because the tensors *inside* the model's
``forward`` then have channels-last strides: values are torch's to rounding, but code in
``forward`` that calls ``.view`` on a 4-D activation (rather than ``reshape`` or ``flatten``)
would fail on them. At the boundary nothing changes: a 4-D output is handed back in the layout
of the model's 4-D input, and other outputs (a classifier's logits) are unaffected.

Two hooks on the model do it: a forward pre-hook converts (N, C, H, W)-contiguous 4-D floating
point CPU inputs, positional or keyword, with a differentiable copy; a forward hook
(``always_call``, so a failed call leaves no state behind) converts 4-D outputs back when the
call converted an input. ``fastml.tune`` measures the whole model both ways, forward and backward
when training, and keeps the layout only where it is faster (``enabled``); ``unpatch`` removes
the hooks.
"""

from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair

ATTR = "_fastml_channels_last"


def _convertible(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 4 and value.device.type == "cpu"
            and value.is_floating_point() and value.is_contiguous()
            and not value.is_contiguous(memory_format=torch.channels_last))


def relayout(tensor: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``tensor`` in ``memory_format``, differentiably. A copy into an empty tensor of that
    layout: on a 2-core Zen 4, 2.7 ms for 16x64x56x56 float32 where ``tensor.contiguous
    (memory_format=...)`` takes 6.5 ms (torch runs that permute copy on one thread)."""
    return torch.empty_like(tensor, memory_format=memory_format).copy_(tensor)


def suggests_channels_last(t: torch.Tensor) -> bool:
    """``t.suggest_memory_format() == torch.channels_last``, the test torch's CPU convolution
    applies to its input and weight to pick its layout: the strides, read from the channels outward
    (C, W, H, N), never decrease, each dimension of more than one element spanning those inside
    it. A tensor that is contiguous both ways (one channel, 1x1 images, a 1x1 or depthwise weight)
    counts as channels-last when its strides were made so, which decides the layout of a
    convolution's output, which is not ambiguous."""
    if t.dim() != 4 or t.layout != torch.strided:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    spanned = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < spanned:
            return False
        if d == 0 and spanned == strides[1]:  # N and C could be either order: torch says no
            return False
        spanned = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def faulting_shape(weight: torch.Tensor, stride) -> bool:
    """Whether a convolution by ``weight`` with ``stride`` is one whose weight and bias gradients
    oneDNN computes out of bounds on channels-last memory: 1x1, a stride other than 1, fewer than
    16 input channels a group. Seen with torch 2.13.0 (oneDNN 3.12, ``jit_1x1:avx512_core``
    backward_weights, float32 and bfloat16) on a Zen 4: a segmentation fault or a corrupted heap
    from 4x3x64x64 up (one oneDNN pass computes both gradients: asking for either faults).
    RepVGG-A0's stem has such a convolution, and a layer's measured choice times it on that
    layout. The cause is oneDNN's (uxlfoundation/oneDNN issue 6035, open): the strided 1x1
    kernels copy the input to a unit-stride workspace whose rows they step by the channel block
    (16 floats for AVX-512, 8 for AVX2's kernel, where wrong weight gradients and hangs are
    reported too) where nhwc rows hold fewer. torch's other paths for it are sound (checked
    against float64 here): stride 1, 16 channels or more, padding, (N, C, H, W) memory, or the
    input's gradient alone. The test is a little wider than the fault (any stride, dtype and
    group count): where it holds, the convolution runs on copies."""
    return (weight.dim() == 4 and weight.shape[2] == 1 and weight.shape[3] == 1 and weight.shape[1] < 16
            and tuple(_pair(stride)) != (1, 1))


def faults(input: torch.Tensor, weight: torch.Tensor, stride, weight_or_bias_grad: bool) -> bool:
    """Whether torch's convolution of ``input`` by ``weight`` would run into the fault of
    ``faulting_shape``: on channels-last memory on the CPU, the weight's or the bias's gradient
    wanted (``weight_or_bias_grad``)."""
    return weight_or_bias_grad and faulting_shape(weight, stride) and runs_channels_last(input, weight)


def grads_wanted(weight: torch.Tensor, bias) -> bool:
    """Whether a convolution's call will want the weight's or the bias's gradient. While
    torch.jit.trace records, whatever the grad mode: the graph it records runs in either (and its
    check traces again under no_grad, where another graph would fail it)."""
    return ((torch.is_grad_enabled() or torch.jit.is_tracing())
            and (weight.requires_grad or isinstance(bias, torch.Tensor) and bias.requires_grad))


def runs_channels_last(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's CPU convolution of ``input`` by ``weight`` runs on channels-last memory:
    where either suggests it."""
    return input.device.type == "cpu" and (suggests_channels_last(input) or suggests_channels_last(weight))


def _guarded(convolve, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``convolve(input, weight, bias)`` (torch's convolution) where it would run into the fault of
    ``faults``, as two convolutions of plain torch ops: one on the layouts given, through which
    only the input's gradient flows (oneDNN's backward for the input alone is sound), and one on
    (N, C, H, W) copies, through which only the weight's and the bias's flow. The value and the
    output's and input's layouts are torch's; the forward runs twice, for a layer torch itself
    cannot train. Plain ops, so torch.func transforms, forward-mode AD and tracing see through
    it as through torch's own."""
    out = convolve(input, weight.detach(), None if bias is None else bias.detach())
    plain = torch.contiguous_format
    for_parameters = convolve(relayout(input.detach(), plain), relayout(weight, plain), bias)
    # zero in value, the parameters' gradient in backward; nan_to_num keeps an infinite output
    # (inf - inf) from turning the sum into NaN where torch's convolution gives inf
    bridge = (for_parameters - for_parameters.detach()).nan_to_num(0.0, 0.0, 0.0)
    return out + bridge


def torch_convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``conv._conv_forward(input, weight, bias)``, torch's convolution, except where it would run
    into the fault of ``faults`` (``_guarded``). A model torch itself cannot train (it crashes)
    then trains patched."""
    if (conv.kernel_size == (1, 1) and isinstance(input, torch.Tensor)
            and faults(input, weight, conv.stride, grads_wanted(weight, bias))):
        return _guarded(conv._conv_forward, input, weight, bias)
    return conv._conv_forward(input, weight, bias)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``torch.nn.functional.conv2d``, except where it would run into the fault of ``faults``
    (``_guarded``)."""
    if (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)
            and faulting_shape(weight, stride)  # (first: cheaper than the grad state faults is given)
            and faults(input, weight, stride, grads_wanted(weight, bias))):
        return _guarded(lambda x, w, b: torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups),
                        input, weight, bias)
    return torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)


def convolution_backward(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, conv: torch.nn.Conv2d,
                         wanted: list[bool]) -> tuple:
    """``aten.convolution_backward`` of ``conv``'s convolution for the gradients ``wanted`` (input,
    weight, bias), except where it would run into the fault of ``faults``: there on (N, C, H, W)
    copies, the input's gradient handed back in the layout torch's would have."""
    faulting = faults(input, weight, conv.stride, wanted[1] or wanted[2])
    if faulting:
        grad, input, weight = (relayout(t, torch.contiguous_format) for t in (grad, input, weight))
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, input, weight, [weight.shape[0]] if wanted[2] else None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0, 0], conv.groups, wanted)
    if faulting:  # (torch's channels-last pass hands both back channels-last)
        grad_input, grad_weight = (None if g is None else relayout(g, torch.channels_last)
                                   for g in (grad_input, grad_weight))
    return grad_input, grad_weight, grad_bias


class Relayout(torch.autograd.Function):
    """``x`` copied into ``memory_format``, its gradient handed back in ``grad_memory_format``: a
    kernel that runs on one layout, behind a layer whose twin hands gradients back in another,
    gives torch's layouts to the gradients too."""

    @staticmethod
    def forward(ctx, x, memory_format, grad_memory_format):
        ctx.grad_memory_format = grad_memory_format
        if x.is_contiguous(memory_format=memory_format) and not (
                memory_format == torch.contiguous_format and suggests_channels_last(x)):
            # No copy: only the gradient's layout changes. (A tensor contiguous both ways whose
            # strides were made channels-last, a 1x1 weight, is copied: torch would still read
            # its strides as channels-last.)
            return x.view_as(x)
        return relayout(x, memory_format)

    @staticmethod
    def backward(ctx, grad):
        return relayout(grad, ctx.grad_memory_format), None, None


def _back(value):
    if isinstance(value, torch.Tensor):
        if value.dim() == 4 and not value.is_contiguous() and value.is_contiguous(memory_format=torch.channels_last):
            return relayout(value, torch.contiguous_format)
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_back(v) for v in value)
    if isinstance(value, list):
        return [_back(v) for v in value]
    if isinstance(value, dict) and type(value) is dict:
        return {k: _back(v) for k, v in value.items()}
    return value


class ChannelsLast:
    """The model's layout conversion: its hooks and whether it is on (``enabled``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.enabled = True
        self._converted: list[bool] = []  # per call in progress (a model may call itself)
        self._handles = (model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, always_call=True))

    def _before(self, module, args, kwargs):
        converted = False
        if self.enabled:
            if any(_convertible(a) for a in args):
                args = tuple(relayout(a, torch.channels_last) if _convertible(a) else a for a in args)
                converted = True
            if any(_convertible(v) for v in kwargs.values()):
                kwargs = {k: relayout(v, torch.channels_last) if _convertible(v) else v for k, v in kwargs.items()}
                converted = True
        self._converted.append(converted)
        return args, kwargs

    def _after(self, module, args, output):
        converted = self._converted.pop() if self._converted else False
        return _back(output) if converted else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __getstate__(self):  # a copy of the model (deepcopy, pickle) copies its hooks, and this with them
        state = dict(self.__dict__)
        state["_converted"] = []
        return state


def of(model: torch.nn.Module) -> ChannelsLast | None:
    return model.__dict__.get(ATTR)


def apply(model: torch.nn.Module) -> bool:
    """Adds the conversion to ``model``; False if it has it already."""
    if of(model) is not None:
        return False
    object.__setattr__(model, ATTR, ChannelsLast(model))
    return True


def remove(model: torch.nn.Module) -> bool:
    """Removes the conversion; False if the model had none."""
    layout = model.__dict__.pop(ATTR, None)
    if layout is None:
        return False
    layout.remove()
    return True
