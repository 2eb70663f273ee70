"""Every way fastml.nn.Conv2d can compute a layer (fastml's kernels and each of torch's variants the
measured choice may pick, fastml/nn.py's torch_conv_variants) hands back the output and the
gradients of input, weight and bias in the layouts torch's own convolution does: channels-last
when the input or the weight suggests it (``suggest_memory_format``, which counts a tensor that is
both layouts by its strides), else contiguous. A drop-in must not change what ``.stride()`` or
``torch.autograd.grad`` show, whichever path measured fastest on the machine at hand."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastml.nn
from fastml import _layout
from fastml.nn import torch_conv_variants

CL = torch.channels_last

# (in, out, kernel, stride, groups): a 1x1 at both strides, 3x3 at both strides, depthwise, grouped;
# one channel in
CONVS = [(16, 32, 1, 1, 1), (16, 32, 1, 2, 1), (16, 32, 3, 1, 1), (16, 32, 3, 2, 1), (32, 32, 3, 1, 32), (32, 64, 3, 1, 4),
         (1, 8, 3, 1, 1)]


def layout(t: torch.Tensor) -> str:
    if t.dim() != 4:
        return "contiguous" if t.is_contiguous() else "strided"
    plain, last = t.is_contiguous(), t.is_contiguous(memory_format=CL)
    return "either" if plain and last else "contiguous" if plain else "channels_last" if last else "strided"


def same_layout(a: str, b: str) -> bool:
    return a == b or "either" in (a, b)


def run(forward, x, parameters, train):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(train)
    with torch.set_grad_enabled(train):
        out = forward(x)
    if not train:
        return out, [layout(out)]
    upstream = torch.empty_like(out).copy_(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = torch.autograd.grad(out, [x, *parameters], upstream)
    return out, [layout(out)] + [layout(g) for g in grads]


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("weight_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", CONVS, ids=lambda c: "{}to{}-k{}s{}g{}".format(*c))
def test_every_path_keeps_torchs_layouts(shape, input_format, weight_format, train):
    c_in, c_out, k, stride, groups = shape
    torch.manual_seed(0)
    ours = fastml.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups)
    twin = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups)
    twin.load_state_dict(ours.state_dict())
    if weight_format == "channels_last":
        ours.to(memory_format=CL)
        twin.to(memory_format=CL)
    x = torch.randn(4, c_in, 14, 14)
    if input_format == "channels_last":
        x = x.to(memory_format=CL)
    expected, expected_layouts = run(twin, x, list(twin.parameters()), train)
    with torch.set_grad_enabled(train):
        paths = torch_conv_variants(ours, x.requires_grad_(train), lambda: (ours.weight, ours.bias))
    paths["fastml"] = ours._fastml_forward
    for name, forward in paths.items():
        out, layouts = run(forward, x, list(ours.parameters()), train)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        assert all(map(same_layout, layouts, expected_layouts)), \
            f"{name}: output, grads {layouts}, torch's {expected_layouts}"


@pytest.mark.parametrize("shape,fmt", itertools.product([(2, 4, 3, 4), (4, 1, 5, 5), (4, 3, 1, 1), (0, 3, 2, 2),
                                                         (3, 2, 1, 5), (1, 1, 1, 1)],
                                                        [torch.contiguous_format, CL]))
def test_suggests_channels_last_is_torchs_rule(shape, fmt):
    t = torch.randn(shape).to(memory_format=fmt)
    # torch's CPU convolution shows its rule (suggest_memory_format is not exposed to Python): a
    # 1x1 weight and padding make an output of 2 channels and 3x3 or more, never both layouts
    weight = torch.ones(2, shape[1], 1, 1)
    expected = layout(torch.nn.functional.conv2d(t, weight, padding=1)) == "channels_last"
    assert _layout.suggests_channels_last(t) == expected
    strided = torch.empty(4, 6, 5, 5)[:, ::2]  # neither layout
    assert not _layout.suggests_channels_last(strided)
