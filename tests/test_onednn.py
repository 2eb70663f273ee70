"""torch's oneDNN convolution on a weight packed once, the ReLU in its epilogue (fastml/_onednn.py):
the "onednn_packed" variant a convolution layer's measured choice may run for channels-last input
in inference. Against the float64 reference, layout included, and where it must not apply."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, eval_conv_bn_relu, magnitude, prefer, raised, refreshes_where_no_version_tells

import fastml
from fastml import _fold, _onednn, _route

pytestmark = pytest.mark.skipif(_onednn._OPS is None, reason="this torch has no oneDNN pointwise convolution ops")

CL = torch.channels_last

# (batch, in, out, height, width, kernel, stride, padding, dilation, groups, bias)
SHAPES = [
    (3, 5, 7, 11, 9, 3, 1, 1, 1, 1, True),     # odd sizes, same padding
    (2, 6, 6, 10, 13, 3, 2, 1, 1, 6, False),   # depthwise, stride 2
    (2, 8, 12, 7, 7, 1, 1, 0, 1, 2, True),     # grouped 1x1
    (1, 3, 8, 15, 15, 7, 2, 3, 1, 1, True),    # the 7x7 stride-2 stem
    (2, 4, 5, 9, 8, 3, 1, 2, 2, 1, True),      # dilated
    (5, 16, 16, 3, 4, (3, 1), (1, 2), (1, 0), 1, 4, False),  # rectangular kernel, stride
]


def conv_of(shape, generator):
    n, c, k, h, w, kernel, stride, padding, dilation, groups, bias = shape
    conv = torch.nn.Conv2d(c, k, kernel, stride, padding, dilation, groups, bias)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    x = torch.randn(n, c, h, w, generator=generator).contiguous(memory_format=CL)
    return conv, x


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x{}x{}x{}x{}-k{}".format(*s[:3], s[3], s[5]))
def test_matches_float64_and_torchs_layout(shape, relu, rng):
    conv, x = conv_of(shape, rng)
    with torch.no_grad():
        assert _onednn.applies(conv, x, conv.weight, conv.bias)
        out = _onednn.packed_convolution(conv, x, conv.weight, conv.bias, relu)
        expected = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                            conv.stride, conv.padding, conv.dilation, conv.groups)
        torchs = conv(x)
    if relu:
        expected = expected.relu()
    assert_close(out, expected, scale=magnitude(expected))
    assert out.shape == torchs.shape and out.stride() == torchs.stride()  # the layout torch's module gives


def test_where_it_does_not_apply(rng):
    conv, x = conv_of(SHAPES[0], rng)
    w, b = conv.weight, conv.bias
    with torch.no_grad():
        assert not _onednn.applies(conv, x.contiguous(), w, b)  # (N, C, H, W): torch would answer in that layout
        assert not _onednn.applies(conv, x[0], w, b)  # unbatched
        assert not _onednn.applies(conv, x.double(), w.double(), b.double())  # oneDNN packs float32 only
        assert not _onednn.applies(conv, x[:0], w, b)  # empty
        assert not _onednn.applies(conv, x.transpose(2, 3), w, b)  # strided, neither layout
        ones = torch.randn(2, 5, 1, 1).contiguous(memory_format=CL)  # both layouts at once: torch's choice
        assert not _onednn.applies(conv, ones, w, b)
    assert not _onednn.applies(conv, x, w, b)  # gradients wanted: the op has no backward
    reflect = torch.nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect")
    same = torch.nn.Conv2d(5, 7, 3, padding="same")
    with torch.no_grad():
        assert not _onednn.applies(reflect, x, reflect.weight, reflect.bias)
        assert not _onednn.applies(same, x, same.weight, same.bias)
        assert _onednn.applies(conv, x, w, b)


def test_the_packing_follows_the_weight_and_the_input_shape(rng):
    conv, x = conv_of(SHAPES[0], rng)

    def check(inp):
        with torch.no_grad():
            torch.testing.assert_close(_onednn.packed_convolution(conv, inp, conv.weight, conv.bias, False), conv(inp),
                                       rtol=1e-4, atol=1e-4)

    check(x)
    packed = conv.__dict__[_onednn.PACKED_ATTR].packed
    check(x)
    assert conv.__dict__[_onednn.PACKED_ATTR].packed is packed  # reused
    with torch.no_grad():
        conv.weight.mul_(-2)  # an optimizer step, load_state_dict: the version moves
    check(x)
    conv.weight = torch.nn.Parameter(torch.randn(conv.weight.shape, generator=rng))  # a new tensor
    check(x)
    check(torch.randn(1, 5, 6, 20, generator=rng).contiguous(memory_format=CL))  # another shape
    refreshes_where_no_version_tells(conv, x, lambda layer, inp, weight: _onednn.packed_convolution(
        layer, inp, weight, layer.bias, False))
    for copied in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):  # derived state: not copied
        assert copied.__dict__[_onednn.PACKED_ATTR].packed is None
        with torch.no_grad():
            torch.testing.assert_close(_onednn.packed_convolution(copied, x, copied.weight, copied.bias, False),
                                       conv(x), rtol=1e-4, atol=1e-4)


def test_a_layer_runs_the_packed_variant_where_it_measured_fastest(monkeypatch, rng):
    prefer(monkeypatch, "onednn_packed")
    calls = []
    real = _onednn.packed_convolution
    monkeypatch.setattr(_onednn, "packed_convolution", lambda *a: calls.append(a[-1]) or real(*a))
    reference, x = conv_of(SHAPES[0], rng)
    layer = fastml.nn.Conv2d(5, 7, 3, padding=1)
    layer.load_state_dict(reference.state_dict())
    with torch.no_grad():
        layer(x)  # decides the op, then the layer
        calls.clear()
        out = layer(x)
        assert calls == [False]
        assert out.stride() == reference(x).stride()
        assert_close(out, F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), 1, 1),
                     scale=magnitude(out))
    assert set(_route.routes(layer).values()) == {"onednn_packed"}
    # with gradients the variant is not offered, and the layer decides afresh for that signature
    for _ in range(2):  # decides the backward, then settles the route
        layer(x).sum().backward()
    assert calls == [False] and layer.weight.grad is not None
    assert len(_route.routes(layer)) == 2  # both signatures remembered


def test_a_folded_run_packs_the_folded_weight_with_the_relu_in_its_epilogue(monkeypatch, rng):
    prefer(monkeypatch, "onednn_packed")
    reference = eval_conv_bn_relu(rng)
    model = copy.deepcopy(reference)
    fastml.patch(model)
    calls = []
    real = _onednn.packed_convolution
    monkeypatch.setattr(_onednn, "packed_convolution", lambda *a: calls.append(a[-1]) or real(*a))
    x = torch.randn(3, 4, 9, 7, generator=rng).contiguous(memory_format=CL)
    with torch.no_grad():
        model(x)
        out = model(x)
        expected = reference.double()(x.double())
    assert calls and all(calls)  # the ReLU went to the epilogue
    assert _fold.fold_of(model[0]).active()
    assert_close(out, expected, scale=magnitude(expected))
    assert out.is_contiguous(memory_format=CL)


def test_the_fused_conv_relu_pool_module_offers_it_too(monkeypatch, rng):
    prefer(monkeypatch, "onednn_packed")
    layer = fastml.nn.ConvReLUPool2d(5, 7, 3, padding=1, pool_kernel_size=2)
    x = torch.randn(3, 5, 11, 9, generator=rng).contiguous(memory_format=CL)
    with torch.no_grad():
        layer(x)
        out = layer(x)
        expected = F.max_pool2d(F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), 1, 1).relu(), 2)
    assert set(_route.routes(layer).values()) == {"onednn_packed"}
    assert_close(out, expected, scale=magnitude(expected))
    assert out.stride() == layer._torch_forward(x).stride()


@pytest.mark.parametrize("where", ["input", "weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_the_relu_keeps_nan_as_torchs(value, where, rng):
    # oneDNN's ReLU post-op is max(x, 0): NaN would come out 0 where torch's relu keeps it
    conv, x = conv_of(SHAPES[0], rng)
    with torch.no_grad():
        {"input": x[1, 2, 3, 4:5], "weight": conv.weight[2, 1, 0, 2:], "bias": conv.bias[3:]}[where].fill_(value)
        out = _onednn.packed_convolution(conv, x, conv.weight, conv.bias, True)
        torchs = conv(x).relu()
    assert torchs.isnan().any() or value == float("inf")  # an inf alone may not make one
    assert torch.equal(out.isnan(), torchs.isnan()) and torch.equal(out.isinf(), torchs.isinf())


def settled_twins(variant: str, monkeypatch, x: torch.Tensor, out_channels: int = 8):
    """(torch's 3x3 Conv2d, a fastml.nn.Conv2d twin whose route for ``x`` settled on ``variant``),
    depthwise for the grouped kernel; skipped where the variant's kernels are not built."""
    from fastml import _grouped, _winograd
    if variant != "onednn_packed" and not (_winograd._kernels_built() and _grouped._kernels_built()):
        pytest.skip("needs fastml's C++ kernels")
    prefer(monkeypatch, variant)
    channels = x.shape[1]
    groups = channels if variant == "grouped_direct" else 1
    unpatched = torch.nn.Conv2d(channels, out_channels, 3, padding=1, groups=groups)
    layer = fastml.nn.Conv2d(channels, out_channels, 3, padding=1, groups=groups)
    layer.load_state_dict(unpatched.state_dict())
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert set(_route.routes(layer).values()) == {variant}
    return unpatched, layer


@pytest.mark.parametrize("variant", ["onednn_packed", "winograd", "grouped_direct"])
def test_a_settled_variant_gives_way_to_torch_under_forward_mode_ad(variant, monkeypatch, rng):
    """Forward-mode AD (torch.autograd.forward_ad) carries tangents through torch's ops only:
    a layer whose route settled on a variant that calls oneDNN's or fastml's kernels directly
    must run torch's module for a dual input, or the tangent would be silently dropped."""
    x = torch.randn(2, 8, 6, 7, generator=rng).contiguous(memory_format=CL)
    tangent = torch.randn(x.shape, generator=rng).contiguous(memory_format=CL)
    unpatched, layer = settled_twins(variant, monkeypatch, x)
    with torch.no_grad():
        with torch.autograd.forward_ad.dual_level():
            actual = torch.autograd.forward_ad.unpack_dual(layer(torch.autograd.forward_ad.make_dual(x, tangent)))
            expected = torch.autograd.forward_ad.unpack_dual(unpatched(torch.autograd.forward_ad.make_dual(x, tangent)))
    assert actual.tangent is not None
    assert_close(actual.primal, expected.primal, scale=magnitude(expected.primal))
    assert_close(actual.tangent, expected.tangent, scale=magnitude(expected.tangent))


REPLACEMENTS = {
    "bias_short": lambda k, cpg: {"bias": torch.randn(1)},
    "bias_strided": lambda k, cpg: {"bias": torch.randn(2 * k)[::2]},
    "bias_expanded": lambda k, cpg: {"bias": torch.randn(1).expand(k)},
    "weight_1x1": lambda k, cpg: {"weight": torch.randn(k, cpg, 1, 1)},
    "weight_fewer_inputs": lambda k, cpg: {"weight": torch.randn(k, max(cpg // 2, 1), 3, 3)},
}


@pytest.mark.parametrize("replacement", sorted(REPLACEMENTS))
@pytest.mark.parametrize("variant", ["onednn_packed", "winograd", "grouped_direct"])
def test_a_settled_variant_takes_tensors_replaced_after_as_torch(variant, replacement, monkeypatch, rng):
    """A layer's route settles on a variant, then its bias or weight is replaced by a tensor of
    another size or layout (a new Parameter). The variants size their kernels from the layer's
    attributes and read the tensors by address: they must give way to torch's module, which
    computes what the tensors' shapes say or raises, where a kernel read past their end."""
    channels = 16 if variant == "grouped_direct" else 8
    x = torch.randn(2, channels, 6, 7, generator=rng).contiguous(memory_format=CL)
    unpatched, layer = settled_twins(variant, monkeypatch, x, out_channels=16)
    for name, value in REPLACEMENTS[replacement](16, channels // unpatched.groups).items():
        setattr(unpatched, name, torch.nn.Parameter(value))
        setattr(layer, name, torch.nn.Parameter(value))
    with torch.no_grad():
        error = raised(lambda: unpatched(x))
        if error is not None:
            with pytest.raises(type(error), match=re.escape(str(error).splitlines()[0])):
                layer(x)
            return
        expected, actual = unpatched(x), layer(x)
    assert actual.shape == expected.shape
    assert_close(actual, expected, scale=magnitude(expected))


def test_routes_are_copied_within_the_process_and_not_pickled(monkeypatch, rng):
    """A layer's settled routes were measured on this machine: a deep copy keeps them, a pickle
    (torch.save of the model, loaded perhaps on another CPU) leaves them to be measured there."""
    prefer(monkeypatch, "onednn_packed")
    layer = fastml.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 6, 7, generator=rng).contiguous(memory_format=CL)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert set(_route.routes(layer).values()) == {"onednn_packed"}
    copied = copy.deepcopy(layer)
    assert _route.routes(copied) == _route.routes(layer)
    assert _route.routes(copied) is not _route.routes(layer)
    assert _route.routes(pickle.loads(pickle.dumps(layer))) == {}


@pytest.mark.parametrize("context", ["autocast", "vmap"])
@pytest.mark.parametrize("variant", ["onednn_packed", "winograd", "grouped_direct"])
def test_a_settled_variant_gives_way_to_torch_under_autocast_and_vmap(variant, context, monkeypatch, rng):
    """A route settled outside torch.autocast or torch.func.vmap: under autocast, torch's module
    computes in bfloat16 and returns it, and under vmap its ops see batched tensors, which a
    variant calling oneDNN or fastml's kernels directly would not (a float32 output, where
    torch's is bfloat16; no data pointer). The layer must run torch's module there."""
    # Two batches, each laid out channels-last (as vmap shows each to the layer).
    batches = torch.randn(2, 2, 6, 7, 8, generator=rng).permute(0, 1, 4, 2, 3)
    x = batches[0]
    assert x.is_contiguous(memory_format=CL)
    unpatched, layer = settled_twins(variant, monkeypatch, x)
    with torch.no_grad():
        if context == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                actual, expected = layer(x), unpatched(x)
            assert actual.dtype == expected.dtype == torch.bfloat16
        else:
            actual, expected = torch.func.vmap(layer)(batches), torch.func.vmap(unpatched)(batches)
    assert_close(actual.float(), expected.float(), scale=magnitude(expected.float()))
