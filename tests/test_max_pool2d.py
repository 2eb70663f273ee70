"""fastml.functional.max_pool2d and fastml.nn.MaxPool2d on every backend against torch's own
max_pool2d and the float64 reference: values, indices (torch's convention: ties to the first
maximum, a NaN window to its last NaN, padding never chosen), gradients, and torch's errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as TF
from conftest import rand
from torch.nn.modules.utils import _pair

import fastml
from fastml import functional as F
from fastml.ops.max_pool2d import reference as pool_reference

# (input shape, kernel_size, stride, padding, dilation, ceil_mode)
CONFIGS = [
    ((2, 3, 8, 8), 2, None, 0, 1, False),             # LeNet's pool
    ((3, 2, 9, 11), 3, 2, 1, 1, False),               # overlapping windows, padding
    ((3, 2, 9, 11), 3, 2, 1, 1, True),                # ... with ceil_mode's partial last window
    ((1, 4, 7, 6), (2, 3), (1, 2), (1, 0), 1, True),  # rectangular everything
    ((2, 1, 13, 10), 3, 1, 1, 2, False),              # dilation
    ((2, 2, 10, 9), (3, 2), 3, (1, 1), (2, 3), True),  # dilation, stride 3, ceil_mode
    ((1, 1, 5, 5), 5, 1, 2, 1, False),                # kernel as large as the input, "same" padding
    ((2, 3, 1, 1), 1, 1, 0, 1, False),                # one-pixel planes
    ((1, 2, 6, 7), 4, 3, 2, 1, True),                 # padding = kernel / 2
]


def _ids(config):
    shape, k, s, p, d, ceil = config
    return f"{'x'.join(map(str, shape))}-k{k}-s{s}-p{p}-d{d}-{'ceil' if ceil else 'floor'}"


def _pool(x, config, **kwargs):
    _, k, s, p, d, ceil = config
    return F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True, **kwargs)


def _torch_pool(x, config):
    _, k, s, p, d, ceil = config
    return TF.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)


def _assert_same_pooling(ours, theirs):
    (out, indices), (expected_out, expected_indices) = ours, theirs
    assert out.dtype == expected_out.dtype and indices.dtype == torch.int64
    torch.testing.assert_close(out.cpu(), expected_out.cpu(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(indices.cpu(), expected_indices.cpu())


@pytest.mark.parametrize("config", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_matches_torch_values_indices_and_gradients(backend, rng, config):
    for dtype in (torch.float32, torch.float64):
        x = rand(*config[0], dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
        x_cpu = x.detach().cpu().requires_grad_()
        ours, theirs = _pool(x, config), _torch_pool(x_cpu, config)
        _assert_same_pooling(ours, theirs)
        grad = rand(*ours[0].shape, dtype=dtype, device=backend.device, generator=rng)
        (grad_x,) = torch.autograd.grad(ours[0], x, grad)
        (expected,) = torch.autograd.grad(theirs[0], x_cpu, grad.cpu(), retain_graph=True)
        # Overlapping windows add several gradients into one input, in an order that differs between
        # implementations (the GPU adds atomically): a sum of n terms in any order is within
        # (n - 1)·eps·Σ|terms| of another, which can exceed eps·|sum| where the terms cancel.
        (magnitude,) = torch.autograd.grad(theirs[0], x_cpu, grad.abs().cpu())
        terms = math.prod(_pair(config[1]))  # with stride 1 every tap of the window lands on one input
        bound = (terms - 1) * torch.finfo(dtype).eps * magnitude
        assert ((grad_x.cpu() - expected).abs() <= bound).all(), (grad_x.cpu() - expected).abs().max()


def test_ties_nan_and_infinite_windows(backend):
    """Ties keep the first maximum; a NaN wins and the last NaN is reported; a window of -inf
    reports its first element inside the input, never padding."""
    x = torch.tensor([[3.0, 3.0, 1.0, float("nan")],
                      [3.0, 2.0, float("nan"), 5.0],
                      [-float("inf"), -float("inf"), 0.0, 0.0],
                      [-float("inf"), -float("inf"), 0.0, 0.0]], device=backend.device)[None, None]
    for config in [(None, 2, None, 0, 1, False), (None, 3, 1, 1, 1, False), (None, 2, 1, 1, 1, True)]:
        _assert_same_pooling(_pool(x, config), _torch_pool(x.cpu(), config))
    out, indices = F.max_pool2d(x, 2, return_indices=True)
    assert indices.tolist() == [[[[0, 6], [8, 10]]]]
    assert out[0, 0, 0, 1].isnan() and out[0, 0, 1, 0].item() == -float("inf")


def test_ties_and_nans_everywhere_match_torchs_indices(backend, rng):
    """Windows full of ties, NaNs and -inf, over kernels, strides, paddings and dilations: the
    values and indices torch gives (its walk keeps the row-major first maximum, or the last NaN:
    a kernel that splits the window into rows and columns must keep that order)."""
    values = torch.tensor([-float("inf"), 0.0, 1.0, 2.0, float("nan")], dtype=torch.float64)
    weights = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5])
    configs = list(itertools.product([2, 3], [1, 2], [0, 1], [1, 2]))
    picks = torch.randperm(len(configs), generator=rng)[:(4 if backend.interpreted else len(configs))].tolist()
    for k, s, p, d in (configs[i] for i in picks):
        if p > k // 2:
            continue
        x = values[torch.multinomial(weights, 2 * 3 * 8 * 9, replacement=True, generator=rng)].reshape(2, 3, 8, 9)
        x = x.to(backend.device)
        for dtype in (torch.float32, torch.float64):
            config = (None, k, s, p, d, False)
            _assert_same_pooling(_pool(x.to(dtype), config), _torch_pool(x.to(dtype).cpu(), config))


def test_float64_reference_on_random_configurations(backend, rng):
    """Random odd-sized configurations against the float64 oracle (fastml's reference.py)."""
    options = list(itertools.product([1, 2, 3], [1, 2, 3], [0, 1], [1, 2], [False, True]))
    picks = torch.randperm(len(options), generator=rng)[:12].tolist()
    for k, s, p, d, ceil in (options[i] for i in picks):
        if p > k // 2:
            continue
        x = rand(2, 3, 7, 9, dtype=torch.float64, device=backend.device, generator=rng).round(decimals=1)  # ties
        try:
            expected = pool_reference.forward(x.cpu(), (k, k), (s, s), (p, p), (d, d), ceil)
        except RuntimeError:
            continue
        if min(expected[0].shape[2:]) < 1:
            continue
        _assert_same_pooling(F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True), expected)


# (input shape, kernel_size, stride, padding, dilation, ceil_mode): windows that overlap, so that
# one input can be the maximum of several windows and collect several gradients.
OVERLAPPING = [
    ((2, 3, 11, 12), 3, 2, 1, 1, False),                 # ResNet's stem pool
    ((2, 3, 11, 12), 3, 2, 1, 1, True),                  # ... with ceil_mode's partial last window
    ((2, 2, 13, 10), 3, 1, 1, 2, False),                 # dilation 2, stride 1: nine windows an input
    ((1, 3, 10, 9), (3, 2), (2, 1), (1, 1), (2, 3), True),  # rectangular, dilated, ceil_mode
]


@pytest.mark.parametrize("values", ["constant", "peaks", "ties"])
@pytest.mark.parametrize("config", OVERLAPPING, ids=[_ids(c) for c in OVERLAPPING])
def test_overlapping_windows_with_ties_match_the_float64_reference(backend, rng, config, values):
    """Overlapping windows over tied maxima: a constant input (every window takes its first element
    inside the input, the windows at the borders the same one), peaks at odd rows and columns
    (each the maximum of every window over it, several windows apart from the constant rest), small
    integers. Gradients that are multiples of 1/8 sum exactly in any order, so they equal the
    float64 reference's to the bit; random gradients are within rounding of it; a second backward
    gives the same bits."""
    shape, k, s, p, d, ceil = config
    x64 = torch.zeros(shape, dtype=torch.float64)
    if values == "constant":
        x64 += 0.5
    elif values == "peaks":
        x64[:, :, 1::4, 1::4] = 1.0
    else:
        x64 = rand(*shape, dtype=torch.float64, generator=rng, scale=1.5).round()
    expected_out, expected_indices = pool_reference.forward(x64, _pair(k), _pair(s), _pair(p), _pair(d), ceil)
    height, width = shape[2:]
    if values == "peaks":  # the case this test is about: inputs that several windows chose
        shared = pool_reference.backward(torch.ones_like(expected_out), expected_indices, height, width)
        assert (shared > 1).any()
    terms = math.prod(_pair(k))  # each window tap lands on at most one input
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype=dtype, device=backend.device).requires_grad_()
        out, indices = _pool(x, config)
        _assert_same_pooling((out, indices), (expected_out.to(dtype), expected_indices))
        dyadic = torch.randint(-16, 17, out.shape, generator=rng, dtype=torch.float64) / 8
        (grad_x,) = torch.autograd.grad(out, x, dyadic.to(dtype=dtype, device=backend.device), retain_graph=True)
        assert grad_x.dtype == dtype and grad_x.shape == x.shape
        expected = pool_reference.backward(dyadic, expected_indices, height, width)
        torch.testing.assert_close(grad_x.cpu().double(), expected, rtol=0, atol=0)
        n, c, oh, ow = out.shape
        grad = rand(n, c, ow, oh, dtype=dtype, device=backend.device, generator=rng).transpose(2, 3)  # strided
        (grad_x,) = torch.autograd.grad(out, x, grad, retain_graph=True)
        (again,) = torch.autograd.grad(out, x, grad)
        assert torch.equal(grad_x, again)
        exact = pool_reference.backward(grad.cpu().double(), expected_indices, height, width)
        magnitude = pool_reference.backward(grad.cpu().double().abs(), expected_indices, height, width)
        bound = terms * torch.finfo(dtype).eps * magnitude
        assert ((grad_x.cpu().double() - exact).abs() <= bound).all(), (grad_x.cpu().double() - exact).abs().max()


def test_backward_without_the_window_takes_any_indices(backend, rng):
    """A backend's backward called with indices alone (the custom op's schema lets the window go):
    any indices inside the input planes, -1 passed over."""
    from fastml.ops.max_pool2d import impl

    height, width = 5, 7
    # -1 (a window with nothing inside the input) but on the reference, whose scatter_add takes none
    indices = torch.randint(0 if backend.name == "reference" else -1, height * width, (2, 3, 4, 3), generator=rng)
    grad = rand(2, 3, 4, 3, dtype=torch.float64, generator=rng)
    ours = impl(backend.name).backward(grad.to(backend.device), indices.to(backend.device), height, width)
    expected = pool_reference.backward(grad * (indices >= 0), indices.clamp(min=0), height, width)  # -1: no part
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck(backend, rng):
    x = rand(2, 2, 6, 7, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True), (x,),
                                    fast_mode=backend.interpreted)
    assert torch.autograd.gradgradcheck(lambda t: F.max_pool2d(t, 2, 1), (x,), fast_mode=backend.interpreted)


def test_unbatched_empty_noncontiguous_and_channels_last(backend, rng):
    x = rand(3, 9, 8, device=backend.device, generator=rng)
    out, indices = F.max_pool2d(x, 2, return_indices=True)
    _assert_same_pooling((out, indices), TF.max_pool2d(x.cpu(), 2, return_indices=True))
    assert out.shape == (3, 4, 4)
    empty = x.new_empty(0, 3, 9, 8)
    out, indices = F.max_pool2d(empty, 3, 2, 1, return_indices=True)
    assert out.shape == indices.shape == (0, 3, 5, 4)
    wide = rand(2, 6, 10, 12, device=backend.device, generator=rng)
    strided = wide[:, ::2, 1:, ::2]
    assert not strided.is_contiguous()
    _assert_same_pooling(F.max_pool2d(strided, 2, 1, return_indices=True),
                         TF.max_pool2d(strided.cpu(), 2, 1, return_indices=True))
    last = wide.to(memory_format=torch.channels_last)
    out = F.max_pool2d(last, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.cpu(), TF.max_pool2d(wide.cpu(), 2), rtol=0, atol=0)
    # an unbatched image of channels-last strides (one image of a channels-last batch): torch's
    # output and indices are contiguous (channels_last is a layout of 4-D tensors)
    image = last[1]
    ours, theirs = F.max_pool2d(image, 2, return_indices=True), TF.max_pool2d(image, 2, return_indices=True)
    assert [t.stride() for t in ours] == [t.stride() for t in theirs]
    _assert_same_pooling(ours, tuple(t.cpu() for t in theirs))


def test_indices_feed_max_unpool2d(backend, rng):
    x = rand(2, 3, 8, 6, device=backend.device, generator=rng)
    out, indices = F.max_pool2d(x, 2, return_indices=True)
    restored = TF.max_unpool2d(out, indices, 2, output_size=x.shape[2:])
    expected = TF.max_unpool2d(*TF.max_pool2d(x.cpu(), 2, return_indices=True), 2, output_size=x.shape[2:])
    torch.testing.assert_close(restored.cpu(), expected, rtol=0, atol=0)


def test_other_dtypes_run_torch():
    x = torch.randn(1, 2, 6, 6).to(torch.bfloat16)
    torch.testing.assert_close(F.max_pool2d(x, 2), TF.max_pool2d(x, 2), rtol=0, atol=0)


@pytest.mark.parametrize("args, message", [
    (((1, 1, 4, 4), 5), "Output size is too small"),
    (((1, 1, 4, 4), 2, 2, 2), "pad should be at most half of effective kernel size"),
    (((4, 4), 2), "3D or 4D"),
    (((1, 1, 4, 4), 2, 0), "stride should not be zero"),
    (((1, 1, 4, 4), 0, 1), "kernel size should be greater than zero"),
    (((1, 1, 4, 4), 2, 1, 0, 0), "dilation should be greater than zero"),
    # torch's pooling takes C ints: a kernel would take these as one window
    (((1, 1, 4, 4), 2, 2 ** 31), "without overflow"),
    (((1, 1, 4, 4), 2, 2 ** 40), "without overflow"),
    (((1, 1, 4, 4), 1, 1, 0, 2 ** 31), "without overflow"),
])
def test_bad_arguments_raise_torchs_errors(backend, args, message):
    shape, *rest = args
    with pytest.raises(RuntimeError, match=message):
        F.max_pool2d(torch.randn(shape, device=backend.device), *rest)
    with pytest.raises(RuntimeError, match=message):
        TF.max_pool2d(torch.randn(shape), *rest)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), return_indices=True),
])
def test_module_is_a_drop_in(backend, rng, kwargs):
    ours, theirs = fastml.nn.MaxPool2d(**kwargs), torch.nn.MaxPool2d(**kwargs)
    assert isinstance(ours, torch.nn.MaxPool2d)
    assert repr(ours) == repr(theirs) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = rand(2, 3, 9, 10, device=backend.device, generator=rng)
    a, b = ours(x), theirs(x.cpu())
    if kwargs.get("return_indices"):
        _assert_same_pooling(a, b)
    else:
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)


def test_a_channel_sliced_channels_last_view_pools_into_channels_last(backend, rng):
    """torch lays its output out by the input's stride order (suggest_memory_format), which a
    channel-sliced view of a channels-last tensor keeps, though it is not channels-last-contiguous:
    torch's own test_pooling_max_nhwc pools such a view."""
    x = rand(4, 8, 10, 10, device=backend.device, generator=rng).contiguous(memory_format=torch.channels_last)[:, ::2]
    x.requires_grad_()
    out, indices = F.max_pool2d(x, (2, 2), (1, 1), (1, 1), (2, 2), return_indices=True)
    expected, expected_indices = TF.max_pool2d(x, (2, 2), (1, 1), (1, 1), (2, 2), return_indices=True)
    assert out.stride() == expected.stride() and indices.stride() == expected_indices.stride()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    grad = rand(*out.shape, device=backend.device, generator=rng)
    ours, = torch.autograd.grad(out, x, grad)
    theirs, = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
