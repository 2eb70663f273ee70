"""The direct small-group convolution (fastml/_grouped.py, csrc/grouped_conv.cpp): the
"grouped_direct" variant a depthwise or grouped convolution layer's measured choice may run for
channels-last input. Against the float64 reference on odd sizes (every lane width, overlapping
channel vectors, border columns, strides, dilations, padding wider than the kernel), layout
included, forward and gradients (the depthwise backward kernels'; torch's backward for the
grouped), gradcheck and gradgradcheck; NaN and inf as torch's; the packed weight following the
weight; and where it must not apply."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, eval_conv_bn_relu, magnitude, patched_eval_run, prefer, refreshes_where_no_version_tells

import fastml
from fastml import _grouped, _route

pytestmark = pytest.mark.skipif(not _grouped._kernels_built(), reason="needs fastml's C++ kernels")

CL = torch.channels_last

# (batch, in, out, groups, height, width, kernel, stride, padding, dilation, bias)
SHAPES = [
    (3, 13, 13, 13, 11, 9, 3, 1, 1, 1, True),       # depthwise, channels not a multiple of any vector
    (2, 17, 17, 17, 6, 7, 5, 2, 2, 1, False),       # depthwise 5x5 stride 2, no bias
    (2, 24, 24, 24, 9, 10, (3, 2), (1, 2), (2, 1), (2, 1), True),  # rectangular everything
    (1, 3, 3, 3, 30, 30, 3, 1, 1, 1, True),         # depthwise narrower than half a vector: scalars
    (2, 40, 40, 5, 5, 5, 3, 1, 1, 1, True),         # 8 in, 8 out per group (RegNet's)
    (2, 36, 60, 6, 7, 8, 3, 2, 1, 1, True),         # 6 in, 10 out per group: an overlapping vector
    (1, 12, 36, 4, 9, 9, 3, 1, 0, 1, False),        # 3 in, 9 out per group, no padding
    (2, 8, 16, 4, 5, 5, 3, 1, 1, 1, True),          # 4 out per group
    (2, 32, 32, 2, 19, 21, 7, 3, 4, 1, True),       # 7x7, padding wider than the kernel's reach
    (2, 7, 7, 7, 1, 2, 3, 1, 1, 1, True),           # a 1x2 image: only the middle row of taps inside
    (2, 16, 16, 16, 3, 9, 3, 1, 0, 1, True),        # an output of one row
]


def conv_of(shape, generator, dtype=torch.float32):
    n, c, k, g, h, w, kernel, stride, padding, dilation, bias = shape
    conv = torch.nn.Conv2d(c, k, kernel, stride, padding, dilation, groups=g, bias=bias).to(dtype)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(n, c, h, w, generator=generator, dtype=torch.float64).to(dtype).contiguous(memory_format=CL)
    return conv, x


def reference(conv, x, relu):
    out = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                   conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.relu() if relu else out


def shape_id(shape):
    n, c, k, g, h, w, kernel, stride, padding, dilation, _ = shape
    return f"{n}x{c}x{h}x{w}-{k}g{g}-k{kernel}s{stride}p{padding}d{dilation}".replace(" ", "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64_and_torchs_layout(shape, relu, dtype, rng):
    conv, x = conv_of(shape, rng, dtype)
    with torch.no_grad():
        assert _grouped.applies(conv, x, conv.weight, conv.bias)
        out = _grouped.convolution(conv, x, conv.weight, conv.bias, relu)
        torchs = conv(x)
    expected = reference(conv, x, relu)
    assert_close(out, expected, scale=magnitude(expected))
    assert out.shape == torchs.shape and out.stride() == torchs.stride()  # the layout torch's module gives


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("where", ["input", "weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_give_torchs_answer(value, where, relu, rng):
    conv, x = conv_of((2, 16, 16, 4, 8, 7, 3, 1, 1, 1, True), rng)
    with torch.no_grad():
        {"input": x[1, 2, 3, 4:5], "weight": conv.weight[2, 1, 0, 2:], "bias": conv.bias[3:]}[where].fill_(value)
        out = _grouped.convolution(conv, x, conv.weight, conv.bias, relu)
        torchs = conv(x)
    if relu:
        torchs = torchs.relu()
    assert torch.equal(out.isnan(), torchs.isnan()) and torch.equal(out.isinf(), torchs.isinf())
    finite = torchs.isfinite()
    torch.testing.assert_close(out[finite], torchs[finite], rtol=1e-4, atol=1e-4)
    out = _grouped.differentiable_convolution(conv, x, conv.weight, conv.bias, relu)  # (packed per call)
    assert torch.equal(out.isnan(), torchs.isnan()) and torch.equal(out.isinf(), torchs.isinf())


def test_where_it_does_not_apply(rng):
    conv, x = conv_of(SHAPES[4], rng)
    w, b = conv.weight, conv.bias
    with torch.no_grad():
        assert _grouped.applies(conv, x, w, b)
        assert not _grouped.applies(conv, x.contiguous(), w, b)  # (N, C, H, W): torch answers in that layout
        traced = []
        torch.jit.trace(lambda t: traced.append(_grouped.applies(conv, t, w, b)) or t, x, check_trace=False)
        assert traced == [False]  # a traced graph would not see the cached packing
        assert not _grouped.applies(conv, x.half(), w.half(), b.half())  # float32 and float64 only
        assert not _grouped.applies(conv, x.double(), w, b)  # mixed dtypes: torch's error
        assert not _grouped.applies(conv, x[:0], w, b)  # empty
        assert not _grouped.applies(conv, x[:, :, ::2, ::2], w, b)  # strided, not dense channels-last
        assert not _grouped.applies(conv, x[:1, :, :1, :1].contiguous(), w, b)  # a 1x1 image is both layouts
        small = torch.randn(2, 40, 2, 2).contiguous(memory_format=CL)
        assert not _grouped.applies(torch.nn.Conv2d(40, 40, 3, groups=5), small, w, b)  # no output pixel
        for other in (torch.nn.Conv2d(40, 40, 3, padding=1),  # one group: oneDNN's, matmul, Winograd
                      torch.nn.Conv2d(40, 20, 3, padding=1, groups=10),  # 2 outputs per group: mostly empty vectors
                      torch.nn.Conv2d(40, 40, 3, padding=1, groups=5, padding_mode="reflect"),
                      torch.nn.Conv2d(40, 40, 3, padding="same", groups=5)):
            assert not _grouped.applies(other, x, other.weight, other.bias)
    assert _grouped.applies(conv, x, w, b)  # gradients wanted: differentiable_convolution


def test_the_packed_weight_follows_the_weight(rng):
    conv, x = conv_of(SHAPES[5], rng)

    def check(inp):
        with torch.no_grad():
            out = _grouped.convolution(conv, inp, conv.weight, conv.bias, False)
        expected = reference(conv, inp, False)
        assert_close(out, expected, scale=magnitude(expected))

    check(x)
    cache = conv.__dict__[_grouped.WEIGHT_ATTR]
    packed = cache.packed
    check(x)
    assert cache.packed is packed  # reused
    with torch.no_grad():
        conv.weight.mul_(-2)  # an optimizer step, load_state_dict: the version moves
    check(x)
    conv.weight = torch.nn.Parameter(torch.randn(conv.weight.shape, generator=rng))  # a new tensor
    check(x)
    check(torch.randn(1, 36, 5, 12, generator=rng).contiguous(memory_format=CL))  # another shape
    with torch.inference_mode():
        check(x)
    refreshes_where_no_version_tells(conv, x, lambda layer, inp, weight: _grouped.convolution(
        layer, inp, weight, layer.bias, False))
    check(x)  # outside inference mode again: its inference tensors are not reused here
    for copied in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):  # derived state: not copied
        assert copied.__dict__[_grouped.WEIGHT_ATTR].packed is None
        with torch.no_grad():
            torch.testing.assert_close(_grouped.convolution(copied, x, copied.weight, copied.bias, False),
                                       conv(x), rtol=1e-4, atol=1e-4)
    _route.forget_derived_weights(conv)  # as unpatch does
    assert _grouped.WEIGHT_ATTR not in conv.__dict__


def test_a_strided_weight_and_bias(rng):
    conv, x = conv_of(SHAPES[4], rng)
    with torch.no_grad():
        conv.weight = torch.nn.Parameter(torch.randn(40, 8, 3, 6, generator=rng)[..., ::2])
        conv.bias = torch.nn.Parameter(torch.randn(80, generator=rng)[::2])
        assert not conv.weight.is_contiguous() and not conv.bias.is_contiguous()
        out = _grouped.convolution(conv, x, conv.weight, conv.bias, False)
    expected = reference(conv, x, False)
    assert_close(out, expected, scale=magnitude(expected))


@pytest.mark.parametrize("upstream_layout", [CL, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gradients_match_torchs(shape, relu, upstream_layout, rng):
    """Depthwise: fastml's backward kernels; grouped: torch's own backward. Either way the
    float64 reference's gradients for the same upstream gradient, in whatever layout it comes."""
    conv, x = conv_of(shape, rng)
    x.requires_grad_()
    out = _grouped.differentiable_convolution(conv, x, conv.weight, conv.bias, relu)
    expected = reference(conv, x, relu)
    assert_close(out, expected, scale=magnitude(expected))
    torchs = conv(x).relu() if relu else conv(x)
    for layout in (torch.contiguous_format, CL):
        assert out.is_contiguous(memory_format=layout) == torchs.is_contiguous(memory_format=layout)
    upstream = torch.randn(out.shape, generator=rng).contiguous(memory_format=upstream_layout)
    wrt = [t for t in (x, conv.weight, conv.bias) if t is not None]
    mine = torch.autograd.grad(out, wrt, upstream)
    x64, w64 = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    b64 = None if conv.bias is None else conv.bias.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, b64, conv.stride, conv.padding, conv.dilation, conv.groups)
    ref = ref.relu() if relu else ref
    theirs = torch.autograd.grad(ref, [t for t in (x64, w64, b64) if t is not None], upstream.double())
    for a, b in zip(mine, theirs):  # against the float64 reference
        assert a.shape == b.shape
        assert_close(a, b, scale=magnitude(b))
    x.grad = None
    _grouped.differentiable_convolution(conv, x.detach(), conv.weight, conv.bias, relu).sum().backward()
    assert x.grad is None and conv.weight.grad is not None  # only the gradients asked for


@pytest.mark.parametrize("shape", [(1, 6, 6, 3, 5, 4, 3, 2, 1, 1, True), (2, 5, 5, 5, 5, 6, 3, (2, 1), (1, 2), (1, 2), True)],
                         ids=["grouped", "depthwise"])
def test_gradcheck_in_float64(shape, rng):
    conv, x = conv_of(shape, rng, torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda inp, w, b: _grouped.differentiable_convolution(conv, inp, w, b, False), (x, conv.weight, conv.bias))
    # a backward that builds a graph (create_graph=True) is torch's: gradients of gradients
    assert torch.autograd.gradgradcheck(
        lambda inp, w, b: _grouped.differentiable_convolution(conv, inp, w, b, False), (x, conv.weight, conv.bias))


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_a_layer_runs_it_where_it_measured_fastest(training, monkeypatch, rng):
    prefer(monkeypatch, "grouped_direct")
    unpatched, x = conv_of(SHAPES[5], rng)
    layer = fastml.nn.Conv2d(36, 60, 3, stride=2, padding=1, groups=6)
    layer.load_state_dict(unpatched.state_dict())
    with torch.set_grad_enabled(training):
        for _ in range(3):  # decides, then runs the route; in training each step changes the weight
            out = layer(x)
            if training:
                out.sum().backward()
                with torch.no_grad():
                    layer.weight -= 0.1 * layer.weight.grad
                layer.weight.grad = None
    assert set(_route.routes(layer).values()) == {"grouped_direct"}
    with torch.no_grad():
        out = layer(x)
    expected = reference(layer, x, False)
    assert_close(out, expected, scale=magnitude(expected))
    assert out.stride() == unpatched(x).stride()


def test_a_folded_depthwise_block_runs_it(monkeypatch, rng):
    """Conv2d(depthwise) → BatchNorm2d → ReLU in eval mode: patch folds the batch norm into the
    convolution, whose measured choice may then take this kernel, ReLU in its epilogue."""
    prefer(monkeypatch, "grouped_direct")
    x = torch.randn(3, 12, 9, 7, generator=rng).contiguous(memory_format=CL)
    model, out, expected = patched_eval_run(eval_conv_bn_relu(rng, channels=(12, 12), groups=12), x)
    assert set(_route.routes(model[0]).values()) == {"grouped_direct"}
    assert_close(out, expected, scale=magnitude(expected))
    assert out.is_contiguous(memory_format=CL)
    fastml.unpatch(model)
    assert _grouped.WEIGHT_ATTR not in model[0].__dict__  # the packed weight leaves with fastml
