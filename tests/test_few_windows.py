"""fastml/_few_windows.py: the "few_windows" variant of a convolution whose large kernel fits its
input only a few times (one matrix product), against torch's convolution in float64: values,
every gradient, torch's layouts, what it applies to, and the layers and models that route to it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, patched_pair, prefer, rand

import fastml
from fastml import _few_windows, _recycle, _route, _tune

CL = torch.channels_last
LAYOUTS = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.to(memory_format=CL),
    "transposed": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),  # neither layout
}
# (batch, channels, input height and width, kernel height and width, out channels, stride, dilation):
# one window (the whole input; a stride changes nothing), several (odd, strided, dilated), an empty batch
CASES = [(3, 5, 3, 2, 3, 2, 4, 1, 1), (1, 7, 5, 5, 5, 5, 3, (2, 3), 1), (2, 1, 2, 1, 2, 1, 6, 1, 1),
         (3, 5, 4, 5, 3, 2, 4, 1, 1), (2, 3, 7, 6, 5, 5, 5, (2, 1), 1), (2, 4, 5, 5, 2, 2, 3, 1, 3),
         (1, 2, 9, 9, 3, 3, 2, 2, 1), (0, 4, 4, 3, 3, 3, 5, 1, 1), (0, 4, 3, 3, 3, 3, 5, 1, 1)]


def _close(actual, expected):
    rtol, atol = TOLERANCES[torch.float64]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("x_layout", list(LAYOUTS))
@pytest.mark.parametrize("w_layout", list(LAYOUTS))
def test_matches_float64_and_its_gradients_torchs(rng, x_layout, w_layout):
    """Odd sizes, non-square kernels and inputs, strides, dilation, with and without bias and
    ReLU, an empty batch: output, input, weight and bias gradients, and their layouts."""
    for (n, c, h, w, kh, kw, k, stride, dilation), bias, relu in itertools.product(CASES, (True, False),
                                                                                    (False, True)):
        conv = torch.nn.Conv2d(c, k, (kh, kw), stride=stride, dilation=dilation, bias=bias, dtype=torch.float64)
        weight = LAYOUTS[w_layout](conv.weight.detach()).requires_grad_()
        x = LAYOUTS[x_layout](rand(n, c, h, w, dtype=torch.float64, generator=rng)).requires_grad_()
        assert _few_windows.applies(conv, x, weight)
        inputs = [x, weight] + ([conv.bias] if bias else [])
        expected = F.conv2d(x, weight, conv.bias, stride, 0, dilation)
        if relu:  # in place, as the layers that fuse a ReLU apply it (.relu() would restride a one-pixel map)
            expected = expected.relu_()
        got = _few_windows.convolution(conv, x, weight, conv.bias, relu)
        case = (n, c, h, w, kh, kw, k, stride, dilation), x_layout, w_layout
        assert got.shape == expected.shape and got.dtype == torch.float64, case
        assert got.stride() == expected.stride(), case
        _close(got, expected)
        upstream = rand(*expected.shape, dtype=torch.float64, generator=rng)
        for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(expected, inputs, upstream),
                        strict=True):
            assert a.shape == b.shape
            _close(a, b)
            for layout in (torch.contiguous_format, CL) if a.dim() == 4 else ():  # torch's gradient layouts
                assert a.is_contiguous(memory_format=layout) == b.is_contiguous(memory_format=layout), (case, layout)


def test_gradcheck(rng):
    for (c, h, w, kernel) in ((3, 3, 2, (3, 2)), (2, 4, 3, 3)):  # one window, then two
        conv = torch.nn.Conv2d(c, 2, kernel, dtype=torch.float64)
        for layout in ("contiguous", "channels_last"):
            x = LAYOUTS[layout](rand(2, c, h, w, dtype=torch.float64, generator=rng)).requires_grad_()
            assert torch.autograd.gradcheck(lambda x, w, b: _few_windows.convolution(conv, x, w, b),
                                            (x, conv.weight, conv.bias))
            assert torch.autograd.gradgradcheck(lambda x, w, b: _few_windows.convolution(conv, x, w, b),
                                                (x, conv.weight, conv.bias))


def test_a_large_weight_gradient_lands_in_recycled_memory(monkeypatch, rng):
    """A weight gradient over the recycling threshold comes from fastml/_recycle.py (the product
    written into memory kept from the previous step), and still equals torch's."""
    monkeypatch.setattr(_recycle, "MIN_BYTES", 1024)
    conv = torch.nn.Conv2d(8, 16, 3, dtype=torch.float64)  # 16 x 72 float64 = 9 KiB of weight gradient
    x = rand(4, 8, 3, 3, dtype=torch.float64, generator=rng)
    _recycle.release()
    _few_windows.convolution(conv, x, conv.weight, conv.bias).square().sum().backward()
    assert _recycle.kept_bytes() == conv.weight.numel() * 8
    expected = torch.autograd.grad(F.conv2d(x, conv.weight, conv.bias).square().sum(), conv.weight)[0]
    _close(conv.weight.grad, expected)
    _recycle.release()


def test_applies_to_a_one_group_unpadded_kernel_over_1x1_with_few_windows_on_floating_4d_input_only():
    x = torch.randn(2, 4, 5, 5)
    assert _few_windows.applies(torch.nn.Conv2d(4, 3, 5), x, torch.randn(3, 4, 5, 5))
    assert _few_windows.applies(torch.nn.Conv2d(4, 3, 5, stride=3, padding="valid"), x, torch.randn(3, 4, 5, 5))
    assert _few_windows.applies(torch.nn.Conv2d(4, 3, 2), x, torch.randn(3, 4, 2, 2))  # 16 windows
    assert _few_windows.applies(torch.nn.Conv2d(4, 3, 3, dilation=2), x, torch.randn(3, 4, 3, 3))
    for conv in (torch.nn.Conv2d(4, 3, 5, padding=1), torch.nn.Conv2d(4, 3, 5, padding="same"),
                 torch.nn.Conv2d(4, 2, 5, groups=2)):
        assert not _few_windows.applies(conv, x, conv.weight)
    many = torch.nn.Conv2d(4, 3, 2)
    assert not _few_windows.applies(many, torch.randn(2, 4, 6, 5), many.weight)  # 20 windows
    too_large = torch.nn.Conv2d(4, 3, 3, dilation=3)
    assert not _few_windows.applies(too_large, x, too_large.weight)  # no window fits: torch raises
    one_pixel = torch.nn.Conv2d(4, 3, 1)
    assert not _few_windows.applies(one_pixel, x[:, :, :1, :1], one_pixel.weight)  # fastml/_pointwise.py's
    conv = torch.nn.Conv2d(4, 3, 5)
    assert not _few_windows.applies(conv, x[0], conv.weight)  # unbatched: torch's module handles it
    assert not _few_windows.applies(conv, x.double(), conv.weight)  # torch raises on the mismatch
    assert not _few_windows.applies(conv, x.to(torch.int32), conv.weight)
    # no input channels (torch's module answers with no output channels)
    assert not _few_windows.applies(torch.nn.Conv2d(4, 3, 3), torch.randn(2, 0, 3, 3), torch.empty(3, 0, 3, 3))
    assert not _few_windows.applies(conv, x.to("meta"), conv.weight.to("meta"))  # the CPU's only


def test_a_routed_call_builds_only_its_own_variant():
    conv = torch.nn.Conv2d(4, 3, 5)
    x = torch.randn(2, 4, 5, 5)
    parameters = lambda: (conv.weight, conv.bias)  # noqa: E731
    assert "few_windows" in fastml.nn.torch_conv_variants(conv, x, parameters)
    assert set(fastml.nn.torch_conv_variants(conv, x, parameters, only="few_windows")) == {"few_windows"}


@pytest.mark.parametrize("train", [False, True])
def test_patched_models_route_their_few_windows_convolutions_to_it_and_match(monkeypatch, rng, train):
    """A 4x4 kernel on 5x5 maps (four windows) with a batch norm (folded in eval) and ReLU, then a
    2x2 kernel on the 2x2 maps (one window, as LeNet-5's C5): patched against unpatched in
    float64, outputs, every gradient and the running statistics, and the routes taken."""
    prefer(monkeypatch, "few_windows")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(6, 8, 4), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 2), torch.nn.Flatten()).double()
    model, patched = patched_pair(model, train, model[4])
    x = rand(3, 2, 14, 14, dtype=torch.float64, generator=rng).requires_grad_()
    for _ in range(2):  # the first call settles the routes, the second runs them
        outputs = [m(x) for m in (model, patched)]
        _close(outputs[1], outputs[0])
        upstream = rand(*outputs[0].shape, dtype=torch.float64, generator=rng)
        grads = [torch.autograd.grad(out, [x, *m.parameters()], upstream)
                 for out, m in zip(outputs, (model, patched))]
        for a, b in zip(*grads, strict=True):
            _close(b, a)
    for name, value in model.state_dict().items():
        _close(patched.state_dict()[name], value)
    routed = [route for layer in patched.modules() for route in _route.routes(layer).values()]
    assert routed.count("few_windows") == 2, routed


def test_the_whole_model_check_is_made_for_the_routes_its_layers_took(monkeypatch):
    """fastml.tune's checks of the whole model (against its layers on torch's modules, and against
    itself unpatched) are keyed by each layer's routes, not only by which layers left torch's: a
    layer re-decided onto another variant (a new candidate, as this one was) makes another model,
    which a verdict kept for the old routes would misjudge (timm's VGG-11 with batch norms kept
    torch's modules on such a verdict and trained at 1.06x unpatched; judged anew, 4.4x)."""
    prefer(monkeypatch, "few_windows")
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 5), torch.nn.Flatten())
    fastml.patch(model)
    fastml.tune(model, torch.randn(2, 4, 5, 5))
    model_keys = {key[0]: key[-1] for key in _tune.decisions() if key[0].startswith("model ")}
    assert model_keys == {"model Sequential": ("0:Conv2d:few_windows",),
                          "model unpatched Sequential": ("0:Conv2d:few_windows",)}
