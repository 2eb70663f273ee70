"""The convolution whose weight gradient is one matrix product over the unfolded input
(fastml/_gemm_weight_grad.py): the "gemm_weight_grad" variant a layer's measured choice may run
in training on channels-last input. The weight gradient against the float64 reference on odd
geometries (strides, dilations, rectangular kernels, padding wider than the kernel, 1x1), in
chunks of images and of rows; the whole layer's output and every gradient; gradcheck and
gradgradcheck; where it must not apply; and a layer taking the route."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, magnitude, prefer

import fastml
from fastml import _gemm_weight_grad, _route

CL = torch.channels_last

# (batch, in, out, height, width, kernel, stride, padding, dilation)
SHAPES = [
    (3, 5, 7, 11, 9, 3, 1, 1, 1),
    (2, 4, 6, 13, 10, (3, 2), (2, 1), (2, 0), (2, 1)),   # rectangular, strided, dilated
    (1, 3, 4, 7, 7, 5, (3, 2), 2, 1),                     # 5x5, unequal strides
    (2, 6, 3, 9, 8, 1, 1, 0, 1),                          # 1x1
    (2, 3, 5, 4, 5, 3, 1, 4, 1),                          # padding wider than the kernel's reach
    (1, 2, 3, 1, 3, 3, 1, 1, 1),                          # one row of pixels
]


def conv_of(shape, rng, dtype=torch.float32, bias=True):
    n, c, k, h, w, kernel, stride, padding, dilation = shape
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    conv = torch.nn.Conv2d(c, k, kernel, stride, padding, dilation, bias=bias).to(dtype)
    x = torch.randn(n, c, h, w, generator=rng, dtype=dtype).contiguous(memory_format=CL)
    return conv, x


def reference_weight_gradient(conv, x, grad):
    """torch's own convolution backward in float64."""
    return torch.ops.aten.convolution_backward(
        grad.double(), x.double(), conv.weight.double(), None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0, 0], 1, [False, True, False])[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])
def test_weight_gradient_matches_the_float64_reference(shape, dtype, rng):
    conv, x = conv_of(shape, rng, dtype)
    grad = torch.randn_like(F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation), dtype=dtype)
    actual = _gemm_weight_grad.weight_gradient(grad, x, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
    expected = reference_weight_gradient(conv, x, grad)
    assert actual.shape == conv.weight.shape and actual.dtype == dtype
    assert_close(actual, expected, scale=magnitude(expected))


CHUNKED = [(3, 4, 5, 10, 9, 3, 1, 1, 1), SHAPES[1], SHAPES[4]]


@pytest.mark.parametrize("rows", [1, 3, "two images"], ids=["row-by-row", "three-rows", "two-images"])
@pytest.mark.parametrize("shape", CHUNKED, ids=["plain", "strided-dilated", "wide-padding"])
def test_chunks_of_rows_and_of_images_give_the_same_gradient(shape, rows, monkeypatch, rng):
    conv, x = conv_of(shape, rng, torch.float64)
    grad = torch.randn_like(F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation))
    n, _, p, q = grad.shape
    r, s = conv.kernel_size
    bytes_per_row = q * r * s * conv.in_channels * 8
    budget = 2 * p if rows == "two images" else rows  # output rows per chunk
    monkeypatch.setattr(_gemm_weight_grad, "last_level_cache_bytes", lambda: 2 * budget * bytes_per_row)
    chunks = list(_gemm_weight_grad._chunks(n, p, bytes_per_row))
    assert len(chunks) == (-(-n // 2) if rows == "two images" else n * -(-p // rows))
    covered = [(i, j) for n0, n1, p0, p1 in chunks for i in range(n0, n1) for j in range(p0, p1)]
    assert sorted(covered) == [(i, j) for i in range(n) for j in range(p)]  # every output row once
    actual = _gemm_weight_grad.weight_gradient(grad, x, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
    expected = reference_weight_gradient(conv, x, grad)
    assert_close(actual, expected, scale=magnitude(expected))


def test_an_upstream_gradient_in_either_layout(rng):
    conv, x = conv_of(SHAPES[0], rng, torch.float64)
    grad = torch.randn_like(F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation))
    expected = reference_weight_gradient(conv, x, grad)
    for upstream in (grad.contiguous(), grad.contiguous(memory_format=CL)):
        actual = _gemm_weight_grad.weight_gradient(upstream, x, conv.weight.shape, conv.stride, conv.padding,
                                                   conv.dilation)
        assert_close(actual, expected, scale=magnitude(expected))


@pytest.mark.parametrize("relu", [False, True], ids=["conv", "conv-relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_output_and_every_gradient_match_the_float64_reference(bias, relu, rng):
    conv, x = conv_of(SHAPES[1], rng, bias=bias)
    x.requires_grad_()
    out = _gemm_weight_grad.convolution(conv, x, conv.weight, conv.bias, relu)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_x = x.detach().double().requires_grad_()
    ref = copy.deepcopy(conv).double()
    ref.zero_grad(set_to_none=True)
    expected = F.conv2d(ref_x, ref.weight, ref.bias, conv.stride, conv.padding, conv.dilation)
    expected = expected.relu() if relu else expected
    expected.backward(grad.double())
    assert out.is_contiguous(memory_format=CL)  # the layout torch's convolution writes for such input
    assert_close(out, expected, scale=magnitude(expected))
    assert_close(x.grad, ref_x.grad, scale=magnitude(ref_x.grad))
    assert conv.weight.grad.is_contiguous()  # the parameter's layout: .grad takes it without a copy
    assert_close(conv.weight.grad, ref.weight.grad, scale=magnitude(ref.weight.grad))
    if bias:
        assert_close(conv.bias.grad, ref.bias.grad, scale=magnitude(ref.bias.grad))


def test_gradcheck_and_gradgradcheck(rng):
    conv, x = conv_of((2, 3, 4, 6, 5, 3, (2, 1), 1, (1, 2)), rng, torch.float64)
    x.requires_grad_()

    def run(inp, w, b):
        return _gemm_weight_grad.convolution(conv, inp, w, b, False)
    assert torch.autograd.gradcheck(run, (x, conv.weight, conv.bias), check_batched_grad=True)
    # a backward that builds a graph is torch's own
    assert torch.autograd.gradgradcheck(run, (x, conv.weight, conv.bias))


def test_where_it_applies(rng):
    conv, x = conv_of(SHAPES[0], rng)
    assert _gemm_weight_grad.applies(conv, x, conv.weight, conv.bias)
    assert not _gemm_weight_grad.applies(conv, x.contiguous(), conv.weight, conv.bias)  # (N, C, H, W): torch's
    with torch.no_grad():
        assert not _gemm_weight_grad.applies(conv, x, conv.weight, conv.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _gemm_weight_grad.applies(conv, x, conv.weight, conv.bias)
    assert not _gemm_weight_grad.applies(conv, x.double(), conv.weight, conv.bias)
    assert not _gemm_weight_grad.applies(conv, x[:0], conv.weight, conv.bias)
    grouped = torch.nn.Conv2d(6, 6, 3, padding=1, groups=2)
    assert not _gemm_weight_grad.applies(grouped, torch.randn(2, 6, 5, 5).contiguous(memory_format=CL),
                                         grouped.weight, grouped.bias)
    with torch.autograd.forward_ad.dual_level():  # no jvp: torch's own under forward-mode AD
        assert not _gemm_weight_grad.applies(conv, x, conv.weight, conv.bias)
    reflect = torch.nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect")
    assert not _gemm_weight_grad.applies(reflect, x, reflect.weight, reflect.bias)
    same = torch.nn.Conv2d(5, 7, 3, padding="same")
    assert not _gemm_weight_grad.applies(same, x, same.weight, same.bias)
    conv.weight.requires_grad_(False)
    assert not _gemm_weight_grad.applies(conv, x, conv.weight, conv.bias)  # no weight gradient to compute


def test_a_layer_runs_it_where_it_measured_fastest(monkeypatch, rng):
    prefer(monkeypatch, "gemm_weight_grad")
    unpatched, x = conv_of(SHAPES[0], rng)
    layer = fastml.nn.Conv2d(5, 7, 3, padding=1)
    layer.load_state_dict(unpatched.state_dict())
    for _ in range(3):  # decides, then runs the route
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.square().sum().backward()
    assert set(_route.routes(layer).values()) == {"gemm_weight_grad"}
    expected = unpatched(x)
    expected.square().sum().backward()
    assert_close(out, expected, scale=magnitude(expected))
    assert_close(layer.weight.grad, unpatched.weight.grad, scale=magnitude(unpatched.weight.grad))
    assert_close(layer.bias.grad, unpatched.bias.grad, scale=magnitude(unpatched.bias.grad))
