"""Winograd F(2x2, 3x3) (fastml/_winograd.py): the "winograd" variant a 3x3 stride-1 convolution
layer's measured choice may run for channels-last input in inference. Against the float64
reference on odd sizes, chunked or not, layout included; torch's answer where an inf or NaN
goes in; the transformed weight following the weight; and where it must not apply."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import (assert_close, eval_conv_bn_relu, magnitude, patched_eval_run, prefer, rand,
                      refreshes_where_no_version_tells)

import fastml
from fastml import _fold, _onednn, _route, _winograd

pytestmark = pytest.mark.skipif(_onednn.ops() is None or not _winograd._kernels_built(),
                                reason="needs torch's oneDNN pointwise convolution and fastml's C++ kernels")

CL = torch.channels_last

# (batch, in, out, height, width, padding, bias)
SHAPES = [
    (3, 5, 7, 11, 9, 1, True),   # odd output: the last tile row and column half outside
    (2, 6, 4, 10, 12, 1, False),  # even output, no bias
    (1, 3, 8, 3, 3, 0, True),    # one output pixel, one tile
    (2, 1, 1, 7, 5, 2, True),    # one channel in and out, padding wider than the kernel's reach
    (4, 17, 9, 6, 13, (0, 1), True),  # rectangular padding
    (1, 2, 3, 1, 1, 1, False),   # a 1x1 image: every tap but the centre in the padding
]


def conv_of(shape, generator):
    n, c, k, h, w, padding, bias = shape
    conv = torch.nn.Conv2d(c, k, 3, padding=padding, bias=bias)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    x = torch.randn(n, c, h, w, generator=generator).contiguous(memory_format=CL)
    return conv, x


def reference(conv, x, relu):
    out = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                   1, conv.padding)
    return out.relu() if relu else out


def shape_id(shape):
    return "x".join(str(s) for s in shape[:5]) + f"-p{shape[5]}"


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64_and_torchs_layout(shape, relu, rng):
    conv, x = conv_of(shape, rng)
    if x.is_contiguous():  # a 1x1 image is both layouts: oneDNN's variants leave it to torch
        with torch.no_grad():
            assert not _winograd.applies(conv, x, conv.weight, conv.bias)
        return
    with torch.no_grad():
        assert _winograd.applies(conv, x, conv.weight, conv.bias)
        out = _winograd.convolution(conv, x, conv.weight, conv.bias, relu)
        torchs = conv(x)
    expected = reference(conv, x, relu)
    assert_close(out, expected, scale=magnitude(expected))
    assert out.shape == torchs.shape and out.stride() == torchs.stride()  # the layout torch's module gives


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunks_of_tiles_cover_the_output_once(chunk, monkeypatch, rng):
    monkeypatch.setattr(_winograd, "chunk_tiles", lambda c, k, tiles: min(chunk, tiles))
    conv, x = conv_of((3, 5, 7, 11, 9, 1, True), rng)  # 3 x 6 x 5 = 90 tiles: a partial last chunk
    with torch.no_grad():
        out = _winograd.convolution(conv, x, conv.weight, conv.bias, True)
    expected = reference(conv, x, True)
    assert_close(out, expected, scale=magnitude(expected))


def test_chunk_size_follows_the_cache_the_cpu_reports(monkeypatch):
    assert _winograd.last_level_cache_bytes() > 0
    monkeypatch.setattr(_winograd, "last_level_cache_bytes", lambda: 32 << 20)
    big = _winograd.chunk_tiles(64, 64, 10**6)
    monkeypatch.setattr(_winograd, "last_level_cache_bytes", lambda: 1 << 20)
    small = _winograd.chunk_tiles(64, 64, 10**6)
    assert big == (16 << 20) // (16 * 128 * 4) and small == _winograd.MIN_CHUNK_TILES
    assert _winograd.chunk_tiles(64, 64, 10) == 10  # never more than there are


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("where", ["input", "weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_give_torchs_answer(value, where, relu, rng):
    conv, x = conv_of((2, 3, 4, 8, 7, 1, True), rng)
    with torch.no_grad():
        {"input": x[1, 2, 3, 4:5], "weight": conv.weight[2, 1, 0, 2:], "bias": conv.bias[3:]}[where].fill_(value)
        out = _winograd.convolution(conv, x, conv.weight, conv.bias, relu)
        torchs = conv(x)
    if relu:
        torchs = torchs.relu()
    assert torch.equal(out.isnan(), torchs.isnan()) and torch.equal(out.isinf(), torchs.isinf())
    finite = torchs.isfinite()
    torch.testing.assert_close(out[finite], torchs[finite], rtol=1e-4, atol=1e-4)


def test_where_it_does_not_apply(rng):
    conv, x = conv_of(SHAPES[0], rng)
    w, b = conv.weight, conv.bias
    with torch.no_grad():
        assert not _winograd.applies(conv, x.contiguous(), w, b)  # (N, C, H, W): torch answers in that layout
        traced = []
        torch.jit.trace(lambda t: traced.append(_winograd.applies(conv, t, w, b)) or t, x, check_trace=False)
        assert traced == [False]  # a traced graph would not see the kernels' writes
        assert not _winograd.applies(conv, x.double(), w.double(), b.double())  # float32 only
        assert not _winograd.applies(conv, x[:0], w, b)  # empty
        small = torch.randn(2, 5, 2, 4).contiguous(memory_format=CL)
        assert not _winograd.applies(torch.nn.Conv2d(5, 7, 3), small, w, b)  # no output pixel
        for other in (torch.nn.Conv2d(5, 7, 3, stride=2, padding=1), torch.nn.Conv2d(5, 7, 3, dilation=2),
                      torch.nn.Conv2d(5, 7, 5, padding=2), torch.nn.Conv2d(5, 5, 3, padding=1, groups=5),
                      torch.nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect")):
            assert not _winograd.applies(other, x, other.weight, other.bias)
        assert _winograd.applies(conv, x, w, b)
    assert _winograd.applies(conv, x, w, b)  # gradients wanted: differentiable_convolution


def test_the_transformed_weight_follows_the_weight(rng):
    conv, x = conv_of(SHAPES[0], rng)

    def check(inp):
        with torch.no_grad():
            out = _winograd.convolution(conv, inp, conv.weight, conv.bias, False)
        expected = reference(conv, inp, False)
        assert_close(out, expected, scale=magnitude(expected))

    check(x)
    cache = conv.__dict__[_winograd.WEIGHT_ATTR]
    grouped = cache.grouped
    check(x)
    assert cache.grouped is grouped  # reused
    with torch.no_grad():
        conv.weight.mul_(-2)  # an optimizer step, load_state_dict: the version moves
    check(x)
    conv.weight = torch.nn.Parameter(torch.randn(conv.weight.shape, generator=rng))  # a new tensor
    check(x)
    check(torch.randn(1, 5, 6, 20, generator=rng).contiguous(memory_format=CL))  # another shape
    with torch.inference_mode():
        check(x)
    check(x)  # outside inference mode again: its inference tensors are not reused here
    refreshes_where_no_version_tells(conv, x, lambda layer, inp, weight: _winograd.convolution(
        layer, inp, weight, layer.bias, False))
    for copied in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):  # derived state: not copied
        assert copied.__dict__[_winograd.WEIGHT_ATTR].grouped is None
        with torch.no_grad():
            torch.testing.assert_close(_winograd.convolution(copied, x, copied.weight, copied.bias, False),
                                       conv(x), rtol=1e-4, atol=1e-4)
    _route.forget_derived_weights(conv)  # as unpatch does
    assert _winograd.WEIGHT_ATTR not in conv.__dict__


def test_a_layer_runs_winograd_where_it_measured_fastest(monkeypatch, rng):
    prefer(monkeypatch, "winograd")
    reference_conv, x = conv_of(SHAPES[0], rng)
    layer = fastml.nn.Conv2d(5, 7, 3, padding=1)
    layer.load_state_dict(reference_conv.state_dict())
    with torch.no_grad():
        layer(x)  # decides the op, then the layer
        out = layer(x)
    assert set(_route.routes(layer).values()) == {"winograd"}
    assert out.stride() == reference_conv(x).stride()
    expected = reference(layer, x, False)
    assert_close(out, expected, scale=magnitude(expected))


def test_a_folded_run_and_the_fused_module_offer_it(monkeypatch, rng):
    prefer(monkeypatch, "winograd")
    x = torch.randn(3, 4, 9, 7, generator=rng).contiguous(memory_format=CL)
    model, out, expected = patched_eval_run(eval_conv_bn_relu(rng), x)
    assert _fold.fold_of(model[0]).active()
    assert set(_route.routes(model[0]).values()) == {"winograd"}
    assert_close(out, expected, scale=magnitude(expected))
    assert out.is_contiguous(memory_format=CL)
    fastml.unpatch(model)
    assert _winograd.WEIGHT_ATTR not in model[0].__dict__  # the derived weight leaves with fastml

    fused = fastml.nn.ConvReLUPool2d(5, 7, 3, padding=1, pool_kernel_size=2)
    x = torch.randn(3, 5, 11, 9, generator=rng).contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x)
        out = fused(x)
    assert set(_route.routes(fused).values()) == {"winograd"}
    expected = F.max_pool2d(reference(fused, x, True), 2)
    assert_close(out, expected, scale=magnitude(expected))
    assert out.stride() == fused._torch_forward(x).stride()


def test_a_strided_weight_and_bias(rng):
    conv, x = conv_of(SHAPES[0], rng)
    with torch.no_grad():
        conv.weight = torch.nn.Parameter(torch.randn(7, 5, 3, 6, generator=rng)[..., ::2])
        conv.bias = torch.nn.Parameter(torch.randn(14, generator=rng)[::2])
        assert not conv.weight.is_contiguous() and not conv.bias.is_contiguous()
        out = _winograd.convolution(conv, x, conv.weight, conv.bias, False)
    expected = reference(conv, x, False)
    assert_close(out, expected, scale=magnitude(expected))


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=shape_id)
def test_with_gradients_the_backward_is_torchs(shape, relu, rng):
    conv, x = conv_of(shape, rng)
    x.requires_grad_()
    out = _winograd.differentiable_convolution(conv, x, conv.weight, conv.bias, relu)
    expected = reference(conv, x, relu)
    assert_close(out, expected, scale=magnitude(expected))
    torchs = conv(x).relu() if relu else conv(x)
    # torch's layout (its strides of size-1 dimensions differ between grad modes: not compared)
    for layout in (torch.contiguous_format, CL):
        assert out.is_contiguous(memory_format=layout) == torchs.is_contiguous(memory_format=layout)
    upstream = torch.randn(out.shape, generator=rng).contiguous(memory_format=CL)
    wrt = [t for t in (x, conv.weight, conv.bias) if t is not None]
    # the same upstream gradient through torch's own convolution backward: torch's gradients
    for mine, theirs in zip(torch.autograd.grad(out, wrt, upstream), torch.autograd.grad(torchs, wrt, upstream)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * magnitude(theirs))
    # and only those asked for
    x.grad = None
    _winograd.differentiable_convolution(conv, x.detach(), conv.weight, conv.bias, relu).sum().backward()
    assert x.grad is None and conv.weight.grad is not None


def test_a_training_layer_runs_winograd_where_it_measured_fastest(monkeypatch, rng):
    prefer(monkeypatch, "winograd")
    unpatched, x = conv_of(SHAPES[0], rng)
    layer = fastml.nn.Conv2d(5, 7, 3, padding=1)
    layer.load_state_dict(unpatched.state_dict())
    for _ in range(3):  # decides, then runs the route; each step changes the weight
        out = layer(x)
        out.sum().backward()
        with torch.no_grad():
            layer.weight -= 0.1 * layer.weight.grad
        layer.weight.grad = None
    assert set(_route.routes(layer).values()) == {"winograd"}
    expected = reference(layer, x, False)
    with torch.no_grad():
        assert_close(layer(x.requires_grad_()), expected, scale=magnitude(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_transform_is_g_w_gt_in_float64_rounded_once(rng, dtype):
    """The C++ weight transform (every training step runs it) against the float64 einsum."""
    g = torch.tensor(_winograd._G, dtype=torch.float64)
    for k, c in ((1, 1), (5, 3), (17, 33)):
        weight = rand(k, c, 3, 3, dtype=dtype, generator=rng)
        weight[0, 0, 1, 1] = 0.0  # (non-finite weights: the convolution's own tests, which recompute directly)
        expected = torch.einsum("ar,kcrs,bs->abkc", g, weight.double(), g).reshape(16 * k, c, 1, 1).to(dtype)
        got = _winograd.transform_weight(weight.transpose(2, 3).contiguous().transpose(2, 3))  # strided: read right
        assert got.shape == expected.shape and got.dtype == dtype and got.is_contiguous()
        # float32: bit for bit (float64 sums rounded once); float64: the sums' order, units in the last place
        exact = dtype == torch.float32
        ulp = 0 if exact else 4 * torch.finfo(torch.float64).eps * float(weight.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=ulp)
