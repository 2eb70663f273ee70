"""fastml/_pointwise.py: the "matmul" variant of a 1x1 convolution (one matrix product), against
torch's convolution in float64: values, every gradient, torch's output layout, and the layers
that route to it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, patched_pair, rand

import fastml
from fastml import _pointwise, _route, _tune

CL = torch.channels_last
LAYOUTS = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.to(memory_format=CL),  # .to restrides a tensor that is both layouts
    "transposed": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),  # neither: copied
}


def _close(actual, expected):
    rtol, atol = TOLERANCES[torch.float64]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_writes_the_layout_torchs_convolution_writes(dtype):
    """Every mix of one-sized dimensions and input and weight layouts: the output's strides are
    F.conv2d's (a later op's own layout choice reads them)."""
    for (n, c, h, w, k), x_layout, w_layout in itertools.product(
            itertools.product((1, 2), (1, 3), (1, 4), (1, 3), (1, 5)), LAYOUTS, ("contiguous", "channels_last")):
        x = LAYOUTS[x_layout](torch.randn(n, c, h, w, dtype=dtype))
        weight = LAYOUTS[w_layout](torch.randn(k, c, 1, 1, dtype=dtype))
        conv = torch.nn.Conv2d(c, k, 1, dtype=dtype)
        expected = F.conv2d(x, weight)
        got = _pointwise.convolution(conv, x, weight, None)
        assert got.stride() == expected.stride(), ((n, c, h, w, k), x_layout, w_layout)


@pytest.mark.parametrize("x_layout", list(LAYOUTS))
@pytest.mark.parametrize("stride", [1, 2, (3, 1)])
def test_matches_float64_and_its_gradients_torchs(rng, x_layout, stride):
    for (n, c, h, w, k), bias, relu in itertools.product([(3, 5, 7, 6, 4), (2, 7, 1, 1, 3), (1, 1, 5, 3, 2), (0, 4, 3, 3, 5)],
                                                         (True, False), (False, True)):
        conv = torch.nn.Conv2d(c, k, 1, stride=stride, bias=bias, dtype=torch.float64)
        x = LAYOUTS[x_layout](rand(n, c, h, w, dtype=torch.float64, generator=rng)).requires_grad_()
        inputs = [x, conv.weight] + ([conv.bias] if bias else [])
        expected = F.conv2d(x, conv.weight, conv.bias, stride)
        if relu:
            expected = expected.relu()
        got = _pointwise.convolution(conv, x, conv.weight, conv.bias, relu)
        assert got.shape == expected.shape and got.dtype == torch.float64
        _close(got, expected)
        upstream = rand(*expected.shape, dtype=torch.float64, generator=rng)
        for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(expected, inputs, upstream),
                        strict=True):
            _close(a, b)


def test_gradcheck(rng):
    conv = torch.nn.Conv2d(3, 2, 1, stride=2, dtype=torch.float64)
    for layout in ("contiguous", "channels_last"):
        x = LAYOUTS[layout](rand(2, 3, 5, 4, dtype=torch.float64, generator=rng)).requires_grad_()
        assert torch.autograd.gradcheck(lambda x, w, b: _pointwise.convolution(conv, x, w, b),
                                        (x, conv.weight, conv.bias))
        assert torch.autograd.gradgradcheck(lambda x, w, b: _pointwise.convolution(conv, x, w, b),
                                            (x, conv.weight, conv.bias))


def test_applies_to_1x1_one_group_unpadded_floating_4d_input_only():
    x = torch.randn(2, 4, 5, 5)
    assert _pointwise.applies(torch.nn.Conv2d(4, 3, 1), x, torch.nn.Conv2d(4, 3, 1).weight)
    assert _pointwise.applies(torch.nn.Conv2d(4, 3, 1, padding="valid"), x, torch.randn(3, 4, 1, 1))
    assert _pointwise.applies(torch.nn.Conv2d(4, 3, 1, dilation=2), x, torch.randn(3, 4, 1, 1))  # no effect at 1x1
    for conv in (torch.nn.Conv2d(4, 3, 3), torch.nn.Conv2d(4, 2, 1, groups=2), torch.nn.Conv2d(4, 3, 1, padding=1)):
        assert not _pointwise.applies(conv, x, conv.weight)
    conv = torch.nn.Conv2d(4, 3, 1)
    assert not _pointwise.applies(conv, x[0], conv.weight)  # unbatched: torch's module handles it
    assert not _pointwise.applies(conv, x.double(), conv.weight)  # torch raises on the mismatch
    assert not _pointwise.applies(conv, x.to(torch.int32), conv.weight)


def test_a_routed_call_builds_only_its_own_variant():
    conv = torch.nn.Conv2d(4, 3, 1)
    x = torch.randn(2, 4, 5, 5).to(memory_format=CL)
    parameters = lambda: (conv.weight, conv.bias)  # noqa: E731
    assert "matmul" in fastml.nn.torch_conv_variants(conv, x, parameters)
    assert set(fastml.nn.torch_conv_variants(conv, x, parameters, only="matmul")) == {"matmul"}
    assert fastml.nn.torch_conv_variants(conv, x, parameters, only="winograd") == {}


@pytest.fixture
def prefer_matmul(monkeypatch):
    """The measured choice picks the "matmul" variant for every layer where it is a candidate."""
    real = _tune.choose

    def choose(key, kernels, tensor, run, rounds=None, within=None):
        if key[0].startswith("layer ") and "matmul" in kernels:
            return "matmul"
        return real(key, kernels, tensor, run, rounds, within)

    monkeypatch.setattr(_tune, "choose", choose)
    fastml.clear_tuning()
    yield
    fastml.clear_tuning()


@pytest.mark.parametrize("train", [False, True])
def test_patched_models_route_their_1x1_convolutions_to_it_and_match(rng, prefer_matmul, train):
    """A squeeze-excitation-like 1x1 on one pixel, a 1x1 with a folded batch norm and ReLU, and a
    strided one, channels-last: patched against unpatched in float64, outputs and gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 5, 1, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Conv2d(5, 4, 1)).double()
    model, patched = patched_pair(model, train, model[1])
    x = rand(3, 6, 7, 5, dtype=torch.float64, generator=rng).to(memory_format=CL).requires_grad_()
    for _ in range(2):  # the first call settles the routes, the second runs them
        outputs = [m(x) for m in (model, patched)]
        _close(outputs[1], outputs[0])
        upstream = rand(*outputs[0].shape, dtype=torch.float64, generator=rng)
        grads = [torch.autograd.grad(out, [x, *m.parameters()], upstream) for out, m in zip(outputs, (model, patched))]
        for a, b in zip(*grads, strict=True):
            _close(b, a)
    routed = [route for layer in patched.modules() for route in _route.routes(layer).values()]
    assert routed.count("matmul") == 3, routed
