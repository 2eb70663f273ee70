"""fastml.functional.linear (the kernels behind fastml.nn.Linear), on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, magnitude, rand, upcast

import fastml
from fastml.functional import ShapeError

SHAPES = [((1,), 1, 1), ((7,), 3, 2), ((37,), 13, 5), ((131,), 67, 17), ((0,), 5, 3), ((2, 3, 5), 11, 7), ((), 4, 3),
          ((70,), 129, 33)]
INTERPRETED_SHAPES = [((7,), 3, 2), ((37,), 13, 5), ((0,), 5, 3), ((2, 3, 5), 11, 7)]


def check(x, w, b, generator):
    out = fastml.functional.linear(x, w, b)
    rx, rw, rb = upcast(x, w, b)
    ref = F.linear(rx, rw, rb)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert_close(out, ref, x.dtype, scale=magnitude(ref))
    upstream = rand(*out.shape, dtype=x.dtype, device=x.device, generator=generator)
    out.backward(upstream)
    ref.backward(upstream.detach().cpu().double())
    for t, r in zip((x, w, b), (rx, rw, rb)):
        if t is not None and t.requires_grad:
            assert_close(t.grad, r.grad, x.dtype, scale=magnitude(r.grad))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64_reference(backend, dtype, shape, bias, rng):
    lead, d, o = shape
    if backend.interpreted and shape not in INTERPRETED_SHAPES:
        pytest.skip("kept small under the Triton interpreter")
    dev = backend.device
    x = rand(*lead, d, dtype=dtype, device=dev, generator=rng, requires_grad=True)
    w = rand(o, d, dtype=dtype, device=dev, generator=rng, requires_grad=True)
    b = rand(o, dtype=dtype, device=dev, generator=rng, requires_grad=True) if bias else None
    check(x, w, b, rng)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(backend, dtype, rng):
    dev = backend.device
    x = rand(21, 19, dtype=dtype, device=dev, generator=rng, requires_grad=True)
    w = rand(6, 19, dtype=dtype, device=dev, generator=rng, requires_grad=True)
    b = rand(6, dtype=dtype, device=dev, generator=rng, requires_grad=True)
    check(x, w, b, rng)


def float64_args(device, generator):
    """input (5, 4), weight (3, 4), bias (3,) in float64, all requiring grad."""
    return [rand(*shape, dtype=torch.float64, device=device, generator=generator, requires_grad=True)
            for shape in ((5, 4), (3, 4), (3,))]


def test_gradcheck_float64(backend, rng):
    assert torch.autograd.gradcheck(fastml.functional.linear, float64_args(backend.device, rng))


def test_non_contiguous(backend, rng):
    dev = backend.device
    x = rand(9, 14, device=dev, generator=rng)[:, ::2].requires_grad_()
    w = rand(7, 5, device=dev, generator=rng).t().requires_grad_()
    b = rand(10, device=dev, generator=rng)[::2].requires_grad_()
    check(x, w, b, rng)


def test_only_weight_requires_grad(backend, rng):
    dev = backend.device
    x = rand(11, 6, device=dev, generator=rng)
    w = rand(4, 6, device=dev, generator=rng, requires_grad=True)
    check(x, w, None, rng)
    assert x.grad is None


def test_one_dimensional_weight_and_mixed_dtypes_follow_torch(rng):
    """Configurations the kernels do not cover give torch's own result (or error)."""
    x, w = rand(5, 4, generator=rng), rand(4, generator=rng)
    torch.testing.assert_close(fastml.functional.linear(x, w), F.linear(x, w))
    xi = torch.ones(3, 4, dtype=torch.int64)
    wi = torch.ones(2, 4, dtype=torch.int64)
    torch.testing.assert_close(fastml.functional.linear(xi, wi), F.linear(xi, wi))
    with pytest.raises(RuntimeError):
        fastml.functional.linear(x, rand(2, 4, dtype=torch.float64, generator=rng))


def test_bad_shapes():
    with pytest.raises(ShapeError, match=r"input has 3 features"):
        fastml.functional.linear(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ShapeError, match="weight must be 2-D"):
        fastml.functional.linear(torch.randn(2, 3), torch.randn(1, 4, 3))
    with pytest.raises(RuntimeError, match="expanded size"):  # torch's own error: bias is broadcast as torch does
        fastml.functional.linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(5))
    with pytest.raises(ShapeError, match="at least 1 dimension"):
        fastml.functional.linear(torch.tensor(2.0), torch.randn(4, 1))


def test_double_backward(backend, rng):
    assert torch.autograd.gradgradcheck(fastml.functional.linear, float64_args(backend.device, rng))


def test_sparse_input_follows_torch(rng):
    dense = rand(6, 5, generator=rng) * (torch.rand(6, 5, generator=rng) > 0.5)
    w, b = rand(3, 5, generator=rng), rand(3, generator=rng)
    sparse = dense.to_sparse()
    torch.testing.assert_close(fastml.functional.linear(sparse, w, b), F.linear(sparse, w, b))
    assert fastml.nn.Linear(5, 3)(sparse).shape == (6, 3)


@pytest.mark.parametrize("in_features, input_shape, torch_words", [
    (1, (), r"both arguments to linear need to be at least 1D"),
    (7, (4, 8), r"mat1 and mat2 shapes cannot be multiplied \(4x8 and 7x2\)"),
])
def test_shape_errors_say_torchs_words_too(in_features, input_shape, torch_words):
    """fastml's ShapeError names the argument, and carries the message torch's own linear gives,
    which code and tests written against torch match (torch's test_linear_raise_on_scalar_input)."""
    layer = fastml.nn.Linear(in_features, 2)
    for call in (lambda x: layer(x), lambda x: fastml.functional.linear(x, layer.weight, layer.bias)):
        with pytest.raises(ShapeError, match=torch_words):
            call(torch.ones(input_shape))
