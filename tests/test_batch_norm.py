"""Batch normalisation over the batch's statistics (training mode), with its optional fused ReLU:
fastml.ops.batch_norm.batch_norm (the autograd.Function) on every backend against the float64
reference, fastml.functional.batch_norm against torch.nn.functional.batch_norm (values, gradients,
running statistics, errors, empty batches, non-contiguous and other-rank inputs), fastml.nn.
BatchNorm2d as a drop-in for torch.nn.BatchNorm2d, and fastml.patch's batch norms in training.

A spy on the op's dispatch (``kernel_calls``) checks that the forced backend's kernels really
ran, so that no comparison passes because a call quietly took torch's path."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as TF
from conftest import TOLERANCES, assert_close, magnitude, prefer, rand, upcast
from torch import nn

import fastml
from fastml import functional as F
from fastml.ops import batch_norm as bn_op
from fastml.ops.batch_norm import reference as bn_reference

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
AFFINE = {"weight+bias": (True, True), "weight": (True, False), "bias": (False, True), "none": (False, False)}

# Odd and prime sizes: N·H·W of 1·1·17 (one image), of 5 (H = W = 1: both layouts at once), C = 1
# (both layouts at once too), C = 17 (a SIMD vector and a tail), N·H·W = 3·19·23 = 1311 (several
# of the C++ kernel's 256-value runs, and both threads' shares).
SHAPES = [(3, 5, 7, 11), (1, 3, 1, 17), (5, 2, 1, 1), (2, 1, 3, 5), (2, 17, 3, 5), (3, 4, 19, 23)]


def _shape_id(shape):
    return "x".join(map(str, shape))


def _named(name):
    """assert_close's msg: torch's own message, prefixed with what is compared."""
    return lambda message: f"{name}: {message}"


@pytest.fixture
def kernel_calls(monkeypatch):
    """[(backend, "forward" | "backward", relu)] for every call the op dispatches to a backend."""
    calls = []
    real_impl = bn_op.impl

    class Spy:
        def __init__(self, name):
            self.name, self.module = name, real_impl(name)

        def forward(self, x, weight, bias, eps, relu):
            calls.append((self.name, "forward", relu))
            return self.module.forward(x, weight, bias, eps, relu)

        def backward(self, grad, x, weight, bias, stats, relu):
            calls.append((self.name, "backward", relu))
            return self.module.backward(grad, x, weight, bias, stats, relu)

    monkeypatch.setattr(bn_op, "impl", Spy)
    return calls


def _x(shape, dtype, backend, rng, layout=torch.contiguous_format, requires_grad=True, scale=1.0, offset=0.0):
    x = rand(*shape, dtype=torch.float64, generator=rng, scale=scale) + offset
    x = x.to(dtype=dtype, device=backend.device).contiguous(memory_format=layout)
    return x.requires_grad_(requires_grad)


def _params(channels, affine, dtype, backend, rng):
    """(weight, bias), each (C,) fresh random and requiring grad, or None where ``affine`` says."""
    return tuple(rand(channels, dtype=dtype, device=backend.device, generator=rng, requires_grad=True) if present
                 else None for present in affine)


def _other_layout(layout):
    return torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format


def _torch_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    out = TF.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(out) if relu else out


def _reference_gradients(x64, w64, b64, eps, relu_mask, upstream64):
    """The float64 oracle's gradients of (x, weight, bias) for an upstream gradient masked by
    ``relu_mask`` (None: no ReLU): reference.forward's torch ops, differentiated by autograd."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x64, w64, b64)]
    out, _ = bn_reference.forward(*leaves, eps, False)
    g = upstream64 if relu_mask is None else torch.where(relu_mask, upstream64, 0)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, g))
    return [next(grads) if t is not None else None for t in leaves]


# ---------------------------------------------------------------------------------------------
# The oracle itself


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_reference_agrees_with_torch(rng, layout, relu):
    """reference.forward / reference.backward (the oracle, and the reference backend) against
    torch's own batch norm and ReLU in float64: outputs, statistics and every gradient."""
    x = rand(3, 5, 7, 4, dtype=torch.float64, generator=rng).contiguous(memory_format=LAYOUTS[layout])
    w, b = rand(5, dtype=torch.float64, generator=rng), rand(5, dtype=torch.float64, generator=rng)
    out, stats = bn_reference.forward(x, w, b, 1e-3, relu)
    x_, w_, b_ = (t.clone().requires_grad_() for t in (x, w, b))
    expected = _torch_batch_norm(x_, None, None, w_, b_, True, 0.1, 1e-3, relu)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(stats, torch.stack((mean, var, (var + 1e-3).rsqrt())), rtol=1e-12, atol=1e-12)
    upstream = rand(*x.shape, dtype=torch.float64, generator=rng)
    ours = bn_reference.backward(upstream, x, w, b, stats, relu)
    theirs = torch.autograd.grad(expected, (x_, w_, b_), upstream)
    for name, got, want in zip(("input", "weight", "bias"), ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=_named(name))
    assert ours[0].is_contiguous(memory_format=LAYOUTS[layout])


# ---------------------------------------------------------------------------------------------
# The op on every backend


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("affine", list(AFFINE), ids=list(AFFINE))
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
def test_op_matches_float64_reference(backend, rng, kernel_calls, shape, layout, affine, relu):
    """Output (shape, dtype, layout), statistics and the input, weight and bias gradients of
    fastml.ops.batch_norm.batch_norm against the float64 oracle, the upstream gradient in the
    other layout; the forced backend's own forward and backward ran."""
    layout = LAYOUTS[layout]
    eps = 1e-3 if shape[0] % 2 else 1e-5
    for dtype in backend.dtypes:
        kernel_calls.clear()
        x = _x(shape, dtype, backend, rng, layout)
        weight, bias = _params(shape[1], AFFINE[affine], dtype, backend, rng)
        out, stats = bn_op.batch_norm(x, weight, bias, eps, relu)
        x64, w64, b64 = upcast(x, weight, bias)
        expected, expected_stats = bn_reference.forward(x64.detach(), w64, b64, eps, relu)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert out.is_contiguous(memory_format=layout), out.stride()
        assert stats.shape == (3, shape[1]) and stats.dtype == dtype and not stats.requires_grad
        assert_close(stats, expected_stats, dtype)
        assert_close(out, expected, dtype, scale=magnitude(expected))
        if relu:
            assert (out.detach() >= 0).all()

        upstream = rand(*shape, dtype=dtype, device=backend.device, generator=rng).contiguous(
            memory_format=_other_layout(layout))
        wanted = [t for t in (x, weight, bias) if t is not None]
        grads = iter(torch.autograd.grad(out, wanted, upstream))
        ours = [next(grads) if t is not None else None for t in (x, weight, bias)]
        # The ReLU's mask as forward's own output has it (a value within rounding of 0 may fall
        # either side of it in another precision; forward's output is checked above).
        mask = (out.detach() > 0).cpu() if relu else None
        theirs = _reference_gradients(x64, w64, b64, eps, mask, upstream.detach().cpu().double())
        for name, got, want in zip(("input", "weight", "bias"), ours, theirs):
            if want is None:
                continue
            assert got.shape == want.shape and got.dtype == dtype, name
            assert_close(got, want, dtype, scale=magnitude(want))
        assert ours[0].is_contiguous(memory_format=layout), ours[0].stride()
        assert kernel_calls == [(backend.name, "forward", relu), (backend.name, "backward", relu)], kernel_calls


def test_op_relu_mask_where_a_half_precision_output_rounds_to_zero(backend, kernel_calls):
    """The seed with which test_op_matches_float64_reference once drew, in float16 and channels
    last, a pre-activation positive in the kernel's float32 and stored as 0: the Triton kernel's
    backward took the float32 sign as the ReLU's mask and passed that element's gradient, where
    torch's ReLU sees the stored 0 (an input gradient off by 0.41)."""
    test_op_matches_float64_reference(backend, torch.Generator().manual_seed(1304269363), kernel_calls,
                                      (3, 5, 7, 11), "channels_last", "weight", True)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_op_without_gradients(backend, rng, kernel_calls, layout, relu):
    """Without autograd (no input requires grad, or no_grad): the same output and statistics,
    nothing that requires grad."""
    x = _x((3, 6, 5, 7), torch.float32, backend, rng, LAYOUTS[layout], requires_grad=False)
    weight, bias = _params(6, (True, True), torch.float32, backend, rng)
    with torch.no_grad():
        out, stats = bn_op.batch_norm(x, weight, bias, 1e-5, relu)
    expected, expected_stats = bn_reference.forward(*upcast(x, weight.detach(), bias.detach()), 1e-5, relu)
    assert not out.requires_grad and not stats.requires_grad
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(out, expected, scale=magnitude(expected))
    assert_close(stats, expected_stats)
    assert kernel_calls == [(backend.name, "forward", relu)]


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_op_large_mean_against_the_spread(backend, rng, layout):
    """x = 50 + 0.5·N(0, 1) in float32: the variance from sums of squares about zero would lose
    most of its digits (E[x²] − E[x]² cancels 10⁴-fold); the statistics must keep float32's."""
    shape = (4, 3, 11, 13)
    x = _x(shape, torch.float32, backend, rng, LAYOUTS[layout], scale=0.5, offset=50.0)
    weight, bias = _params(3, (True, True), torch.float32, backend, rng)
    out, stats = bn_op.batch_norm(x, weight, bias, 1e-5, False)
    x64, w64, b64 = upcast(x, weight, bias)
    expected, expected_stats = bn_reference.forward(x64.detach(), w64.detach(), b64.detach(), 1e-5, False)
    assert_close(stats[0], expected_stats[0], scale=50.0)  # the mean: float32's rounding of 50
    assert_close(stats[1:], expected_stats[1:])  # variance and invstd: relative to their own size
    # out = x·scale + shift with |shift| ≈ 50·invstd·|weight|: rounding relative to that
    shift = (expected_stats[0] * expected_stats[2] * w64.detach()).abs().max()
    assert_close(out, expected, scale=float(shift))
    upstream = rand(*shape, dtype=torch.float32, generator=rng)
    ours = torch.autograd.grad(out, (x, weight, bias), upstream)
    theirs = _reference_gradients(x64, w64, b64, 1e-5, None, upstream.double())
    for got, want in zip(ours, theirs):
        assert_close(got, want, scale=magnitude(want))


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_op_mean_is_the_float64_mean_rounded_once(backend, rng, layout):
    """The batch mean of values about 50 (spread 0.5) in float32 is the float64 mean rounded to
    float32, within one unit in the last place: the weight's gradient multiplies its error by
    the sum of the upstream gradient. The reference backend once summed in float32 and lost a
    few units, which put its weight gradient 2.6e-4 off (about 1.1x the tolerance) for one seed of
    test_op_large_mean_against_the_spread, and up to 0.8x of it for others."""
    x = _x((4, 3, 11, 13), torch.float32, backend, rng, LAYOUTS[layout], requires_grad=False, scale=0.5,
           offset=50.0)
    with torch.no_grad():
        _, stats = bn_op.batch_norm(x, None, None, 1e-5, False)
    want = x.double().mean(dim=(0, 2, 3))
    ulp = torch.finfo(torch.float32).eps * 32  # (one unit in the last place in [32, 64))
    assert (stats[0].double().cpu() - want.cpu()).abs().max().item() <= ulp


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_gradcheck(backend, rng, layout, relu):
    """Finite differences in float64 through the functional API (x, weight, bias); double
    backward (the reference's torch ops on every backend) where it does not take minutes."""
    x = _x((2, 3, 3, 4), torch.float64, backend, rng, LAYOUTS[layout])
    weight, bias = _params(3, (True, True), torch.float64, backend, rng)

    def fn(x, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-3, relu=relu)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=backend.interpreted)
    assert torch.autograd.gradcheck(lambda x: fn(x, None, None), (x,), fast_mode=backend.interpreted)
    if not backend.interpreted:
        assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_op_with_no_channels(backend, rng):
    """C = 0 with N·H·W ≥ 1 is inside the backends' contract: empty output and (3, 0) stats."""
    for layout in LAYOUTS.values():
        x = torch.empty(3, 0, 4, 5, device=backend.device).contiguous(memory_format=layout).requires_grad_()
        weight = torch.empty(0, device=backend.device, requires_grad=True)
        bias = torch.empty(0, device=backend.device, requires_grad=True)
        out, stats = bn_op.batch_norm(x, weight, bias, 1e-5, True)
        assert out.shape == x.shape and stats.shape == (3, 0)
        grads = torch.autograd.grad(out, (x, weight, bias), torch.empty_like(out))
        assert [g.shape for g in grads] == [x.shape, (0,), (0,)]


# ---------------------------------------------------------------------------------------------
# The functional API against torch's


MOMENTA = [0.1, 0.7, 1.0, 0.0, 1]


@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.7, 1.0])
def test_running_statistics_with_infinities_as_torchs(backend, rng, momentum):
    """An infinite value in the batch (an infinite mean, a NaN variance) or in the running
    statistics: torch's update (1 − momentum) · running + momentum · batch gives ±inf where a
    lerp's other form, batch − (batch − running) · (1 − momentum), would give NaN."""
    x = rand(4, 3, 2, 2, dtype=torch.float64, device=backend.device, generator=rng)
    x[:, 0] = float("inf")
    x[0, 1, 0, 0] = -float("inf")
    for start in (0.5, float("inf"), -float("inf")):
        ours = [torch.full((3,), start, dtype=torch.float64, device=backend.device) for _ in range(2)]
        theirs = [t.cpu().clone() for t in ours]
        F.batch_norm(x, *ours, training=True, momentum=momentum)
        TF.batch_norm(x.cpu(), *theirs, training=True, momentum=momentum)
        for got, expected in zip(ours, theirs):
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("momentum", MOMENTA, ids=[repr(m) for m in MOMENTA])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_functional_training_matches_torch(backend, rng, kernel_calls, layout, relu, momentum):
    """F.batch_norm(training=True) against torch's batch norm (then ReLU) in float64: outputs,
    every gradient, and the running statistics updated in place over three batches (momentum,
    the unbiased variance: with N·H·W = 2 in the last batch, twice the biased one)."""
    layout = LAYOUTS[layout]
    for dtype in (torch.float32, torch.float64):
        running_mean = rand(6, dtype=dtype, device=backend.device, generator=rng)
        running_var = rand(6, dtype=dtype, device=backend.device, generator=rng).abs() + 0.5
        expected_mean, expected_var = upcast(running_mean, running_var)
        weight, bias = _params(6, (True, True), dtype, backend, rng)
        for shape in [(3, 6, 5, 7), (2, 6, 3, 1), (2, 6, 1, 1)]:
            kernel_calls.clear()
            x = _x(shape, dtype, backend, rng, layout)
            for t in (weight, bias):
                t.grad = None
            out = F.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=momentum,
                               eps=1e-4, relu=relu)
            x64, w64, b64 = upcast(x, weight, bias)
            expected = _torch_batch_norm(x64, expected_mean, expected_var, w64, b64, True, momentum, 1e-4, relu)
            assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous(memory_format=layout)
            assert_close(out, expected, scale=magnitude(expected))
            assert_close(running_mean, expected_mean)
            assert_close(running_var, expected_var)
            assert not running_mean.requires_grad and not running_var.requires_grad
            upstream = rand(*shape, dtype=dtype, device=backend.device, generator=rng)
            out.backward(upstream)
            expected.backward(upstream.cpu().double())
            # The input's gradient is a difference of terms of size |upstream| · invstd · |weight|:
            # with N·H·W = 2 and a variance well above eps the result is small by cancellation
            # (torch's own float32 misses the float64 one there, by as much), so its absolute
            # tolerance scales with those terms, as conftest.assert_close's scale is meant.
            var = x64.detach().var(dim=(0, 2, 3), unbiased=False)
            terms = magnitude(upstream) * (w64.detach().abs() * (var + 1e-4).rsqrt()).max().item()
            assert_close(x.grad, x64.grad, scale=max(terms, magnitude(x64.grad)))
            for name, got, want in (("weight", weight, w64), ("bias", bias, b64)):
                assert_close(got.grad, want.grad, scale=magnitude(want.grad))
            assert kernel_calls == [(backend.name, "forward", relu), (backend.name, "backward", relu)], kernel_calls


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_functional_eval_and_no_running_stats(backend, rng, relu):
    """training=False normalises with the running statistics and leaves them alone (torch's
    result to the bit: its own path); running statistics None in training normalise with the
    batch's and update nothing."""
    x = _x((3, 4, 5, 6), torch.float64, backend, rng)
    weight, bias = _params(4, (True, True), torch.float64, backend, rng)
    running_mean = rand(4, dtype=torch.float64, generator=rng)
    running_var = rand(4, dtype=torch.float64, generator=rng).abs() + 0.5
    kept = running_mean.clone(), running_var.clone()
    out = F.batch_norm(x, running_mean, running_var, weight, bias, relu=relu)
    expected = _torch_batch_norm(x, kept[0].clone(), kept[1].clone(), weight, bias, False, 0.1, 1e-5, relu)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(running_mean, kept[0]) and torch.equal(running_var, kept[1])
    out = F.batch_norm(x, None, None, weight, bias, training=True, relu=relu)
    expected = _torch_batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5, relu)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_functional_noncontiguous_inputs(backend, rng, kernel_calls):
    """Sliced and permuted inputs, and weight, bias and running statistics that are strided
    views of larger tensors: torch's values and gradients; the running statistics updated in
    the views, the elements between them untouched."""
    wide = rand(3, 10, 9, 14, dtype=torch.float64, device=backend.device, generator=rng)
    nhwc = rand(2, 7, 9, 5, dtype=torch.float64, device=backend.device, generator=rng)
    inputs = {
        "sliced": wide[:, ::2, 1:, ::2],
        "transposed": wide[:, :5, :7].transpose(2, 3),
        "nhwc-permuted": nhwc.permute(0, 3, 1, 2),  # channels-last strides
        "nhwc-sliced": nhwc.permute(0, 3, 1, 2)[:, :, ::2],
    }
    for name, view in inputs.items():
        kernel_calls.clear()
        channels = view.shape[1]
        store = rand(6, 2 * channels, dtype=torch.float64, device=backend.device, generator=rng)
        store[3] = store[3].abs() + 0.5  # running variances
        store.requires_grad_()
        weight, bias = store[0, ::2], store[1, 1::2]
        buffers = rand(2, 2 * channels + 1, dtype=torch.float64, device=backend.device, generator=rng).abs() + 0.5
        before = buffers.clone()
        running_mean, running_var = buffers[0, 1::2], buffers[1, :-1:2]
        assert not weight.is_contiguous() and not running_mean.is_contiguous()
        x = view.detach().requires_grad_()
        out = F.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=0.3, relu=True)
        x_, store_ = x.detach().clone().requires_grad_(), store.detach().clone().requires_grad_()
        expected_buffers = before.clone()
        # (torch's oracle takes contiguous copies of weight and bias: torch 2.13's CPU backward for a
        # channels-last input and gradient reads a strided weight as if it were contiguous)
        expected = _torch_batch_norm(x_, expected_buffers[0, 1::2], expected_buffers[1, :-1:2],
                                     store_[0, ::2].contiguous(), store_[1, 1::2].contiguous(), True, 0.3, 1e-5, True)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9, msg=_named(name))
        torch.testing.assert_close(buffers, expected_buffers, rtol=1e-12, atol=1e-12, msg=_named(name))
        upstream = rand(*out.shape, dtype=torch.float64, device=backend.device, generator=rng).contiguous(
            memory_format=torch.channels_last)
        out.backward(upstream)
        expected.backward(upstream)
        torch.testing.assert_close(x.grad, x_.grad, rtol=1e-9, atol=1e-9, msg=_named(name))
        torch.testing.assert_close(store.grad, store_.grad, rtol=1e-9, atol=1e-9, msg=_named(name))
        assert (backend.name, "forward", True) in kernel_calls, (name, kernel_calls)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (0, 0, 1, 1)],
                         ids=lambda s: _shape_id(s))
def test_empty_batches_behave_as_torch(backend, shape, relu):
    """N = 0, C = 0, H = 0: whatever torch does (an empty result, an error), in training and
    eval, with and without running statistics and affine parameters, then backward."""
    channels = shape[1]
    for layout, training, stats, affine in itertools.product(LAYOUTS.values(), (True, False), (True, False),
                                                             (True, False)):
        if not training and not stats:
            continue  # torch's own error for that is tested with the bad arguments

        def run(fn):
            x = torch.empty(shape, device=backend.device).contiguous(memory_format=layout).requires_grad_()
            rm = torch.zeros(channels, device=backend.device) + 0.25 if stats else None
            rv = torch.ones(channels, device=backend.device) + 0.5 if stats else None
            w = torch.full((channels,), 1.5, device=backend.device, requires_grad=True) if affine else None
            b = torch.full((channels,), 0.5, device=backend.device, requires_grad=True) if affine else None
            try:
                out = fn(x, rm, rv, w, b, training)
                out.sum().backward()
            except Exception as error:  # compared with torch's below
                return error
            return out, rm, rv, x.grad, None if w is None else w.grad, None if b is None else b.grad

        theirs = run(lambda *a: _torch_batch_norm(*a, 0.1, 1e-5, relu))
        ours = run(lambda *a: F.batch_norm(*a, relu=relu))
        case = (shape, layout, training, stats, affine)
        if isinstance(theirs, Exception):
            assert type(ours) is type(theirs) and str(ours) == str(theirs), (case, ours, theirs)
            continue
        assert not isinstance(ours, Exception), (case, ours)
        assert ours[0].shape == theirs[0].shape and ours[0].dtype == theirs[0].dtype, case
        for got, want in zip(ours[1:], theirs[1:]):
            assert (got is None) == (want is None), case
            if got is not None:
                torch.testing.assert_close(got, want, equal_nan=True, msg=_named(case))


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 1, 1, 1), (1, 4)], ids=lambda s: _shape_id(s))
def test_one_value_per_channel_in_training_raises_torchs_error(backend, shape, relu):
    """N·H·W = 1 in training: torch's ValueError, from the functional and the module (train mode,
    or eval mode without running statistics); eval mode with running statistics normalises."""
    x = torch.randn(shape, device=backend.device)
    message = f"Expected more than 1 value per channel when training, got input size {x.shape}"
    with pytest.raises(ValueError) as theirs:
        TF.batch_norm(x, None, None, training=True)
    assert str(theirs.value) == message
    for running in (None, torch.zeros(shape[1], device=backend.device)):
        with pytest.raises(ValueError) as ours:
            F.batch_norm(x, running, None if running is None else running + 1, training=True, relu=relu)
        assert str(ours.value) == message
    if len(shape) == 4:
        module, twin = fastml.nn.BatchNorm2d(shape[1]).to(backend.device), torch.nn.BatchNorm2d(shape[1])
        with pytest.raises(ValueError) as ours:
            module(x)
        assert str(ours.value) == message
        with pytest.raises(ValueError):
            twin(x.cpu())
        assert int(module.num_batches_tracked) == int(twin.num_batches_tracked)  # torch counts it first
        module.eval()
        twin.eval()
        torch.testing.assert_close(module(x).cpu(), twin(x.cpu()))
        untracked = fastml.nn.BatchNorm2d(shape[1], track_running_stats=False).to(backend.device).eval()
        with pytest.raises(ValueError) as ours:
            untracked(x)
        assert str(ours.value) == message


def _bad_call_cases():
    x = torch.randn(2, 3, 4, 5)
    c = 3

    def stats(n=c):
        return torch.zeros(n), torch.ones(n)

    return {
        "running_mean-size": lambda bn, relu: bn(x, torch.zeros(4), torch.ones(c), training=True, **relu),
        "running_var-size": lambda bn, relu: bn(x, torch.zeros(c), torch.ones(4), training=True, **relu),
        "weight-size": lambda bn, relu: bn(x, *stats(), torch.ones(4), training=True, **relu),
        "bias-size": lambda bn, relu: bn(x, *stats(), None, torch.ones(2), training=True, **relu),
        "weight-rank": lambda bn, relu: bn(x, *stats(), torch.ones(c, 2), training=True, **relu),
        "running_mean-rank": lambda bn, relu: bn(x, torch.zeros(1, c), torch.ones(c), training=True, **relu),
        "half-a-pair": lambda bn, relu: bn(x, torch.zeros(c), None, training=True, **relu),
        "other-half": lambda bn, relu: bn(x, None, torch.ones(c), training=True, **relu),
        "eval-without-stats": lambda bn, relu: bn(x, None, None, training=False, **relu),
        "weight-dtype": lambda bn, relu: bn(x, *stats(), torch.ones(c, dtype=torch.float64), training=True, **relu),
        "running-dtype": lambda bn, relu: bn(x, torch.zeros(c).double(), torch.ones(c).double(), training=True,
                                             **relu),
        "eps-zero-training": lambda bn, relu: bn(x, *stats(), training=True, eps=0.0, **relu),
        "eps-negative-training": lambda bn, relu: bn(x, *stats(), training=True, eps=-1e-5, **relu),
        "eps-negative-eval": lambda bn, relu: bn(x, *stats(), training=False, eps=-1e-5, **relu),
        "eps-none": lambda bn, relu: bn(x, *stats(), training=True, eps=None, **relu),
        "eps-str": lambda bn, relu: bn(x, *stats(), training=True, eps="1e-5", **relu),
        "training-int": lambda bn, relu: bn(x, *stats(), training=1, **relu),
        "training-str": lambda bn, relu: bn(x, *stats(), training="yes", **relu),
        "momentum-none": lambda bn, relu: bn(x, *stats(), training=True, momentum=None, **relu),
        "momentum-str": lambda bn, relu: bn(x, *stats(), training=True, momentum="0.1", **relu),
        "weight-int": lambda bn, relu: bn(x, *stats(), 5, training=True, **relu),
        "input-int": lambda bn, relu: bn(x.int(), *stats(), training=True, **relu),
        "input-list": lambda bn, relu: bn([[1.0, 2.0]], *stats(), training=True, **relu),
        "input-1d": lambda bn, relu: bn(torch.randn(5), None, None, training=True, **relu),
    }


BAD_CALLS = _bad_call_cases()


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_arguments_raise_torchs_errors(backend, case, relu):
    """Every bad call torch rejects raises the same exception type with the same message (which
    names the argument where torch's does)."""
    call = BAD_CALLS[case]
    with pytest.raises(Exception) as theirs:
        call(TF.batch_norm, {})
    with pytest.raises(Exception) as ours:
        call(F.batch_norm, {"relu": relu})
    assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)
    if not case.startswith(("eps-none", "eps-str")):  # torch's own message there is a comparison's TypeError
        assert str(ours.value) == str(theirs.value)


def test_relu_must_be_a_bool():
    """relu is fastml's own argument: a value other than True or False is refused, not read as
    one (torch checks the others)."""
    with pytest.raises(TypeError, match="relu must be True or False"):
        F.batch_norm(torch.randn(2, 3, 4, 4), None, None, training=True, relu="no")


def test_module_input_errors_are_torchs(backend):
    """fastml.nn.BatchNorm2d rejects what torch.nn.BatchNorm2d rejects, with its messages."""
    for x in (torch.randn(2, 3, 5), torch.randn(2, 3), torch.randn(2, 3, 4, 5, 6), torch.randn(2, 4, 5, 5)):
        with pytest.raises(Exception) as theirs:
            torch.nn.BatchNorm2d(3)(x)
        with pytest.raises(type(theirs.value)) as ours:
            fastml.nn.BatchNorm2d(3).to(backend.device)(x.to(backend.device))
        assert str(ours.value) == str(theirs.value)


OTHER_INPUTS = {
    "2d": ((6, 3), torch.float32),
    "3d": ((4, 3, 7), torch.float64),
    "5d": ((2, 3, 3, 4, 2), torch.float32),
    "float16": ((2, 3, 4, 5), torch.float16),
    "bfloat16": ((2, 3, 4, 5), torch.bfloat16),
}


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("case", list(OTHER_INPUTS), ids=list(OTHER_INPUTS))
def test_other_ranks_and_dtypes_behave_as_torch(backend, rng, case, relu):
    """Ranks and dtypes the kernels do not take run torch's batch norm: torch's outputs,
    gradients and running statistics to the bit, training and eval."""
    shape, dtype = OTHER_INPUTS[case]
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    stats_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    for training in (True, False):
        results = []
        for fn in (lambda *a: _torch_batch_norm(*a, 0.1, 1e-5, relu), lambda *a: F.batch_norm(*a, relu=relu)):
            gen = torch.Generator().manual_seed(seed)
            x = rand(*shape, generator=gen).to(dtype).requires_grad_()
            rm, rv = torch.randn(3, generator=gen).to(stats_dtype), (torch.rand(3, generator=gen) + 0.5).to(stats_dtype)
            w = torch.randn(3, generator=gen).to(stats_dtype).requires_grad_()
            b = torch.randn(3, generator=gen).to(stats_dtype).requires_grad_()
            out = fn(x, rm, rv, w, b, training)
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
            results.append((out, rm, rv, x.grad, w.grad, b.grad))
        for got, want in zip(*reversed(results)):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# NaN and the ReLU's boundary


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_nan_inputs_as_torch(backend, rng, layout, relu):
    """A NaN in one channel (as its first value, where a kernel may take its shift, and inside
    another): that channel's outputs and statistics NaN as torch's (the ReLU keeps NaN), its
    running statistics NaN, every other channel untouched by it; gradients as torch's."""
    for dtype in (torch.float32, torch.float64):
        x = _x((3, 4, 5, 6), dtype, backend, rng, LAYOUTS[layout], requires_grad=False)
        with torch.no_grad():
            x[0, 1, 0, 0] = float("nan")
            x[2, 3, 4, 1] = float("nan")
        x.requires_grad_()
        weight, bias = _params(4, (True, True), dtype, backend, rng)
        running_mean = rand(4, dtype=dtype, device=backend.device, generator=rng)
        running_var = rand(4, dtype=dtype, device=backend.device, generator=rng).abs() + 0.5
        expected_mean, expected_var = upcast(running_mean, running_var)
        out = F.batch_norm(x, running_mean, running_var, weight, bias, training=True, relu=relu)
        x64, w64, b64 = upcast(x, weight, bias)
        expected = _torch_batch_norm(x64, expected_mean, expected_var, w64, b64, True, 0.1, 1e-5, relu)
        assert out[:, [1, 3]].isnan().all() and not out[:, [0, 2]].isnan().any()
        assert_close(out, expected)
        assert running_mean[[1, 3]].isnan().all() and running_var[[1, 3]].isnan().all(), (running_mean,
                                                                                           running_var)
        assert_close(running_mean, expected_mean)
        assert_close(running_var, expected_var)
        _, stats = bn_op.batch_norm(x.detach(), weight.detach(), bias.detach(), 1e-5, relu)
        assert stats[:, [1, 3]].isnan().all(), stats  # mean, variance and invstd
        upstream = rand(3, 4, 5, 6, dtype=dtype, device=backend.device, generator=rng)
        out.backward(upstream)
        expected.backward(upstream.cpu().double())
        for name, got, want in (("input", x, x64), ("weight", weight, w64), ("bias", bias, b64)):
            assert_close(got.grad, want.grad, scale=magnitude(want.grad.nan_to_num()))


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_infinite_inputs_update_running_stats_as_torch(backend, rng, layout):
    """±inf in a channel: torch's batch norm gives a batch mean of ±inf (and a NaN variance), so
    its running mean becomes ±inf; the outputs of that channel are NaN."""
    x = _x((3, 4, 5, 6), torch.float64, backend, rng, LAYOUTS[layout], requires_grad=False)
    x[1, 1, 2, 2] = float("inf")
    x[0, 2, 0, 0] = -float("inf")
    running = [torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    expected_running = [t.clone() for t in running]
    out = F.batch_norm(x, *running, training=True)
    expected = TF.batch_norm(x, *expected_running, training=True)
    torch.testing.assert_close(out, expected, equal_nan=True)
    torch.testing.assert_close(running, expected_running, equal_nan=True)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_relu_boundary_weight_zero(backend, rng, kernel_calls, layout):
    """weight = 0: the pre-ReLU value is exactly ``bias``. bias = 0 → exactly 0, the mask off (no
    gradient reaches weight or bias: a kernel taking ≥ 0 as on would pass Σ grad to the bias);
    bias > 0 → on everywhere; bias < 0 → off. Exact values, torch's gradients."""
    for dtype in (torch.float32, torch.float64):
        kernel_calls.clear()
        x = _x((3, 5, 4, 7), dtype, backend, rng, LAYOUTS[layout])
        weight = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.3], dtype=dtype, device=backend.device, requires_grad=True)
        bias = torch.tensor([0.0, 0.75, -0.5, 0.0, 0.0], dtype=dtype, device=backend.device, requires_grad=True)
        out = F.batch_norm(x, None, None, weight, bias, training=True, relu=True)
        assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
        assert torch.equal(out[:, 1], torch.full_like(out[:, 1], 0.75))
        assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
        upstream = rand(*x.shape, dtype=dtype, device=backend.device, generator=rng)
        out.backward(upstream)
        # channels 0, 2, 3: the mask off everywhere, so no gradient at all reaches weight or bias
        assert weight.grad[[0, 2, 3]].tolist() == [0.0] * 3 and bias.grad[[0, 2, 3]].tolist() == [0.0] * 3
        torch.testing.assert_close(bias.grad[1], upstream[:, 1].sum(), rtol=TOLERANCES[dtype][0], atol=1e-4)
        assert torch.equal(x.grad[:, :4], torch.zeros_like(x.grad[:, :4]))  # scale 0
        x64, w64, b64 = upcast(x, weight, bias)
        expected = _torch_batch_norm(x64, None, None, w64, b64, True, 0.1, 1e-5, True)
        expected.backward(upstream.cpu().double())
        assert_close(out, expected)
        for got, want in ((x, x64), (weight, w64), (bias, b64)):
            assert_close(got.grad, want.grad, scale=magnitude(want.grad))
        assert kernel_calls == [(backend.name, "forward", True), (backend.name, "backward", True)]


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_relu_boundary_values_at_the_mean(backend, rng, layout):
    """Each channel a shuffled copy of {-3, …, 3} thrice: the mean is exactly 0, so with bias 0
    every 0 in x is exactly 0 before the ReLU (any weight): mask off there, as torch's."""
    for dtype in (torch.float32, torch.float64):
        values = torch.arange(-3, 4, dtype=torch.float64).repeat(3)
        planes = torch.stack([values[torch.randperm(21, generator=rng)] for _ in range(4)])  # (C, 21)
        x = planes.reshape(4, 3, 1, 7).transpose(0, 1).to(dtype=dtype, device=backend.device)
        x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
        weight = rand(4, dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
        bias = torch.zeros(4, dtype=dtype, device=backend.device, requires_grad=True)
        out = F.batch_norm(x, None, None, weight, bias, training=True, relu=True)
        zeros = x.detach() == 0
        assert zeros.sum() == 12 and (out.detach()[zeros] == 0).all()
        upstream = rand(*x.shape, dtype=dtype, device=backend.device, generator=rng)
        out.backward(upstream)
        x64, w64, b64 = upcast(x, weight, bias)
        expected = _torch_batch_norm(x64, None, None, w64, b64, True, 0.1, 1e-5, True)
        expected.backward(upstream.cpu().double())
        assert_close(out, expected)
        for got, want in ((x, x64), (weight, w64), (bias, b64)):
            assert_close(got.grad, want.grad, scale=magnitude(want.grad))


# ---------------------------------------------------------------------------------------------
# fastml.nn.BatchNorm2d as a drop-in


MODULE_KWARGS = [
    {},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"momentum": None, "affine": False},
    {"track_running_stats": False, "affine": False, "eps": 0.1},
    {"momentum": 1.0},
]


def _kwargs_id(kwargs):
    return "-".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


@pytest.mark.parametrize("kwargs", MODULE_KWARGS, ids=[_kwargs_id(k) for k in MODULE_KWARGS])
def test_module_is_a_drop_in(backend, rng, kernel_calls, kwargs):
    """Built with the same arguments as torch.nn.BatchNorm2d: same repr and state_dict; over
    training steps (both layouts), eval, and training again, the same outputs, input and
    parameter gradients, running statistics and num_batches_tracked, in float64."""
    channels = 5
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    theirs = torch.nn.BatchNorm2d(channels, **kwargs).double()
    ours = fastml.nn.BatchNorm2d(channels, **kwargs).double()
    assert isinstance(ours, torch.nn.BatchNorm2d) and repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.copy_(rand(channels, dtype=torch.float64, generator=rng))
            theirs.bias.copy_(rand(channels, dtype=torch.float64, generator=rng))
    ours.load_state_dict(theirs.state_dict())
    ours.to(backend.device)
    phases = [("train", torch.contiguous_format), ("train", torch.channels_last), ("train", torch.contiguous_format),
              ("eval", torch.channels_last), ("eval", torch.contiguous_format), ("train", torch.channels_last)]
    for mode, layout in phases:
        kernel_calls.clear()
        getattr(ours, mode)()
        getattr(theirs, mode)()
        x = _x((3, channels, 6, 7), torch.float64, backend, rng, layout)
        x_theirs = x.detach().cpu().requires_grad_()
        out, expected = ours(x), theirs(x_theirs)
        assert out.is_contiguous(memory_format=layout) == expected.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-9, atol=1e-9)
        upstream = rand(*x.shape, dtype=torch.float64, generator=rng)
        ours.zero_grad()
        theirs.zero_grad()
        out.backward(upstream.to(backend.device))
        expected.backward(upstream)
        torch.testing.assert_close(x.grad.cpu(), x_theirs.grad, rtol=1e-9, atol=1e-9)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-9, atol=1e-9, msg=_named(name))
        state, expected_state = ours.state_dict(), theirs.state_dict()
        assert list(state) == list(expected_state)
        for key in state:
            torch.testing.assert_close(state[key].cpu(), expected_state[key], rtol=1e-12, atol=1e-12, msg=_named(key))
        batch_statistics = mode == "train" or not theirs.track_running_stats
        assert kernel_calls == ([(backend.name, "forward", False), (backend.name, "backward", False)]
                       if batch_statistics else []), (mode, kernel_calls)
    if theirs.track_running_stats:
        assert int(ours.num_batches_tracked) == 4


def test_module_float32_and_state_dict_round_trip(backend, rng):
    """float32 training steps against torch's module, and the state_dict taken back by a torch
    module (and the other way), which then computes the same."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ours, theirs = fastml.nn.BatchNorm2d(7, momentum=0.2).to(backend.device), torch.nn.BatchNorm2d(7, momentum=0.2)
    for step in range(3):
        x = _x((4, 7, 5, 3), torch.float32, backend, rng, requires_grad=False)
        assert_close(ours(x), theirs(x.double().cpu().float()).double())
    for key, value in theirs.state_dict().items():
        if value.is_floating_point():
            assert_close(ours.state_dict()[key], value.double())
        else:
            torch.testing.assert_close(ours.state_dict()[key].cpu(), value)
    restored = torch.nn.BatchNorm2d(7, momentum=0.2)
    restored.load_state_dict(ours.state_dict())
    again = fastml.nn.BatchNorm2d(7, momentum=0.2)
    again.load_state_dict(restored.state_dict())
    again.to(backend.device)
    x = _x((4, 7, 5, 3), torch.float32, backend, rng, requires_grad=False)
    for mode in ("eval", "train"):
        getattr(restored, mode)()
        getattr(again, mode)()
        assert_close(again(x), restored(x.cpu()).double())  # float32 against float32: the table's float32 tolerance
    assert int(again.num_batches_tracked) == int(restored.num_batches_tracked) == 4


def test_module_cumulative_average(backend, rng):
    """momentum=None: the running statistics are the plain average of the batches' (factor
    1/num_batches_tracked), as torch's."""
    ours, theirs = fastml.nn.BatchNorm2d(3, momentum=None).double(), torch.nn.BatchNorm2d(3, momentum=None).double()
    batches = [_x((2, 3, 4, 3), torch.float64, backend, rng, requires_grad=False) for _ in range(4)]
    for x in batches:
        ours(x)
        theirs(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches]).mean(0)
    torch.testing.assert_close(ours.running_mean, means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, variances, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize("fastest", ["cpp", "reference"])
def test_measured_choice_moves_buffers_once_per_call(rng, monkeypatch, fastest):
    """With the backend chosen by measurement (every candidate timed on the first call of a
    class), each training call moves the running statistics and num_batches_tracked exactly once,
    as torch's module does, and computes the same."""
    prefer(monkeypatch, fastest)
    ours, theirs = fastml.nn.BatchNorm2d(4).double(), torch.nn.BatchNorm2d(4).double()
    for step in range(3):
        x = rand(3, 4, 5, 6, dtype=torch.float64, generator=rng, requires_grad=True)
        x_theirs = x.detach().clone().requires_grad_()
        out, expected = ours(x), theirs(x_theirs)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
        out.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(x.grad, x_theirs.grad, rtol=1e-9, atol=1e-9)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=_named(key))
    running_mean, running_var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    x = rand(3, 4, 5, 6, dtype=torch.float64, generator=rng)
    F.batch_norm(x, running_mean, running_var, training=True, relu=True)
    TF.batch_norm(x, expected_mean, expected_var, training=True)
    torch.testing.assert_close((running_mean, running_var), (expected_mean, expected_var), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# fastml.patch: batch norms in training


def _bn_model():
    """conv → bn → relu (folded, the ReLU fused into the batch norm in training), pool, a batch
    norm with no conv before it (op "batch_norm"), conv → bn (folded, no ReLU)."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.BatchNorm2d(6, momentum=None), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.Flatten())


def _randomise(model, generator):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=generator, dtype=torch.float64) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=generator, dtype=torch.float64) - 0.5)
    return model


def _step(model, x, upstream):
    x = x.detach().requires_grad_()
    out = model(x)
    params = list(model.parameters())
    grads = torch.autograd.grad(out, [x, *params], upstream)
    return [out.detach(), *grads]


def _assert_same(model, reference, x, upstream):
    for index, (got, want) in enumerate(zip(_step(model, x, upstream), _step(reference, x, upstream))):
        assert_close(got, want, scale=max(1.0, float(want.abs().max())))
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=_named(name))


def test_patched_model_trains_as_torch(backend, rng, kernel_calls):
    """fastml.patch on a float64 model in training mode: outputs, the input's and every
    parameter's gradient, running statistics and num_batches_tracked as the unpatched model's,
    over train → eval → train; in training the folded conv → bn → relu runs the batch norm with
    the ReLU fused (the ReLU module passes its input through) and the lone batch norm runs
    fastml's kernels; a state_dict round trip; unpatch restores torch's classes."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    reference = _randomise(_bn_model().double(), rng)
    model = copy.deepcopy(reference)
    report = fastml.patch(model)
    assert {r.name: r.new for r in report.replaced}.get("4") == "fastml.nn.BatchNorm2d", report
    assert [f.names for f in report.fused] == [("0", "1", "2"), ("5", "6")], report
    assert isinstance(model[4], fastml.nn.BatchNorm2d)
    assert model[1] is not reference[1] and all(isinstance(model[i], nn.BatchNorm2d) for i in (1, 4, 6))
    assert list(model.state_dict()) == list(reference.state_dict())

    x = rand(3, 3, 6, 8, dtype=torch.float64, generator=rng)
    upstream = rand(3, 4 * 3 * 4, dtype=torch.float64, generator=rng)
    for mode in ("train", "train", "eval", "train"):
        kernel_calls.clear()
        getattr(model, mode)()
        getattr(reference, mode)()
        _assert_same(model, reference, x, upstream)
        ours = [call for call in kernel_calls if call[0] == backend.name]
        if mode == "train":
            # bn 1 with its ReLU, bn 4 and bn 6 without, forward and backward
            assert sorted(ours) == sorted([(backend.name, "forward", True), (backend.name, "forward", False),
                                           (backend.name, "forward", False), (backend.name, "backward", True),
                                           (backend.name, "backward", False), (backend.name, "backward", False)]), \
                kernel_calls
            # (the ReLU is applied in the batch norm's pass: its forward above ran with relu True;
            # called on its own, the ReLU module applies itself, as torch's: fastml/_runs.py)
            y = torch.randn(2, 6, 3, 3, dtype=torch.float64)
            assert torch.equal(model[2](y), y.relu())
        else:
            assert ours == [], kernel_calls  # the folds and the eval batch norm: no batch statistics
    assert int(model[4].num_batches_tracked) == 3

    restored = copy.deepcopy(reference)
    restored.load_state_dict(model.state_dict())
    model.load_state_dict(reference.state_dict())
    _assert_same(model, restored, x, upstream)

    fastml.unpatch(model)
    assert [type(m) for m in model] == [type(m) for m in reference]
    _assert_same(model, restored, x, upstream)  # (restored took the same steps as model since)


def test_patch_batch_norm_op_alone(backend, rng, kernel_calls):
    """patch(model, ops="batch_norm"): no fold, so every BatchNorm2d becomes fastml.nn.BatchNorm2d
    (ReLUs stay torch's); training and eval as the unpatched model's."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    reference = _randomise(_bn_model().double(), rng)
    model = copy.deepcopy(reference)
    report = fastml.patch(model, ops="batch_norm")
    assert sorted(r.name for r in report.replaced) == ["1", "4", "6"], report
    assert not report.fused
    assert all(type(model[i]) is fastml.nn.BatchNorm2d for i in (1, 4, 6)) and type(model[2]) is nn.ReLU
    x = rand(2, 3, 5, 7, dtype=torch.float64, generator=rng)
    upstream = rand(2, 4 * 2 * 3, dtype=torch.float64, generator=rng)
    for mode in ("train", "eval", "train"):
        kernel_calls.clear()
        getattr(model, mode)()
        getattr(reference, mode)()
        _assert_same(model, reference, x, upstream)
        ours = [call for call in kernel_calls if call[0] == backend.name]
        assert len(ours) == (6 if mode == "train" else 0) and all(not relu for _, _, relu in ours), kernel_calls


@pytest.mark.parametrize("fastest", ["cpp", "reference"])
def test_patched_model_trains_as_torch_under_the_measured_choice(rng, monkeypatch, fastest):
    """Without a forced backend, each layer's route is measured (a fastml kernel, or torch's
    module, timed on the first call of a class): whichever wins, the patched model in training
    computes what the unpatched one does (the ReLU applied exactly once), and its running
    statistics move once per step."""
    prefer(monkeypatch, fastest)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    reference = _randomise(_bn_model().double(), rng)
    model = copy.deepcopy(reference)
    fastml.patch(model)
    x = rand(3, 3, 6, 8, dtype=torch.float64, generator=rng)
    upstream = rand(3, 4 * 3 * 4, dtype=torch.float64, generator=rng)
    for mode in ("train", "train", "eval", "train"):
        getattr(model, mode)()
        getattr(reference, mode)()
        _assert_same(model, reference, x, upstream)


def test_a_channel_sliced_channels_last_view_normalises_into_channels_last(backend, rng):
    """torch's batch norm lays its output out by the input's stride order, which a channel-sliced
    view of a channels-last tensor keeps (suggest_memory_format)."""
    x = rand(4, 8, 6, 5, dtype=torch.float64, device=backend.device, generator=rng)
    x = x.contiguous(memory_format=torch.channels_last)[:, ::2]
    out = F.batch_norm(x, None, None, training=True)
    expected = TF.batch_norm(x, None, None, training=True)
    assert out.stride() == expected.stride()
    assert_close(out, expected, torch.float64, scale=magnitude(expected))
