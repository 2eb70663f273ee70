"""fastml.functional.cdist: the drop-in for torch.cdist, on every backend, against the float64
reference (torch.cdist without its matrix-product shortcut) and torch.cdist itself."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, rand, upcast

import fastml
from fastml import functional as F

NORMS = [2.0, 1.0, math.inf]


def reference(x1, x2, p):
    a, b = upcast(x1, x2)
    return torch.cdist(a, b, p, compute_mode="donot_use_mm_for_euclid_dist")


@pytest.mark.parametrize("p", NORMS, ids=["p2", "p1", "pinf"])
@pytest.mark.parametrize("shapes", [((7, 3), (11, 3)), ((1, 1), (1, 1)), ((37, 19), (53, 19)),
                                    ((2, 13, 5), (2, 17, 5)), ((3, 1, 4, 6), (2, 9, 6))],
                         ids=["small", "one", "odd", "batched", "broadcast"])
def test_matches_float64_reference(backend, rng, p, shapes):
    for dtype in (torch.float32, torch.float64):
        x1 = rand(*shapes[0], dtype=dtype, device=backend.device, generator=rng)
        x2 = rand(*shapes[1], dtype=dtype, device=backend.device, generator=rng)
        out = F.cdist(x1, x2, p)
        expected = reference(x1, x2, p)
        assert out.shape == torch.cdist(x1, x2, p).shape and out.dtype == dtype
        assert_close(out, expected, scale=expected.abs().max())


def test_exact_far_from_the_origin(backend):
    """torch's matrix-product shortcut cancels here (it finds 0); fastml's differences do not."""
    x = torch.full((30, 1), 512695.0, device=backend.device)
    y = torch.full((30, 1), 512804.0, device=backend.device)
    assert torch.cdist(x, y)[0, 0].item() == 0.0  # torch's known inexactness, the reason for this test
    assert torch.equal(F.cdist(x, y), torch.full((30, 30), 109.0, device=backend.device))
    far = rand(40, 8, generator=torch.Generator().manual_seed(1), device=backend.device) + 1e4
    near = far[:20] + 1e-2 * rand(20, 8, generator=torch.Generator().manual_seed(2), device=backend.device)
    assert_close(F.cdist(far, near), reference(far, near, 2.0), scale=1e-2)


@pytest.mark.parametrize("p", NORMS, ids=["p2", "p1", "pinf"])
def test_gradcheck(backend, rng, p):
    x1 = rand(2, 5, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    x2 = rand(2, 6, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: F.cdist(a, b, p), (x1, x2), fast_mode=backend.interpreted)


@pytest.mark.parametrize("p", NORMS, ids=["p2", "p1", "pinf"])
def test_gradients_match_torch_and_vanish_at_zero_distance(backend, rng, p):
    x1 = rand(6, 4, dtype=torch.float64, device=backend.device, generator=rng)
    x2 = torch.cat([x1[:3], rand(5, 4, dtype=torch.float64, device=backend.device, generator=rng)])
    grads = []
    for fn in (F.cdist, lambda a, b, p: torch.cdist(a, b, p, compute_mode="donot_use_mm_for_euclid_dist")):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        fn(a, b, p).sum().backward()
        grads.append((a.grad, b.grad))
    for ours, theirs in zip(*grads):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs)


def test_double_backward_as_torch(backend, rng):
    """torch.cdist has no second derivative; fastml's reaches the same error, not a wrong value."""
    x1 = rand(4, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    x2 = rand(5, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    for fn in (F.cdist, torch.cdist):
        (g,) = torch.autograd.grad(fn(x1, x2).sum(), x1, create_graph=True)
        with pytest.raises(NotImplementedError, match="_cdist_backward"):
            g.sum().backward()


def test_noncontiguous_and_empty(backend, rng):
    base = rand(9, 14, generator=rng, device=backend.device)
    x1, x2 = base[:, ::2], base.t()[:5, :7]
    assert not x1.is_contiguous() and not x2.is_contiguous()
    assert_close(F.cdist(x1, x2), reference(x1, x2, 2.0), scale=10)
    for a, b in [((0, 3), (4, 3)), ((4, 3), (0, 3)), ((4, 0), (5, 0)), ((0, 2, 3), (0, 5, 3))]:
        x, y = torch.randn(*a, device=backend.device), torch.randn(*b, device=backend.device)
        torch.testing.assert_close(F.cdist(x, y), torch.cdist(x, y))


def test_nan_as_torch(backend):
    x1 = torch.randn(4, 3, device=backend.device)
    x2 = torch.randn(5, 3, device=backend.device)
    x1[1, 2] = float("nan")
    for p in NORMS:  # NaN propagates through p = 2 and 1; the maximum of p = inf passes it over
        torch.testing.assert_close(F.cdist(x1, x2, p).cpu(), reference(x1, x2, p).to(x1.dtype), equal_nan=True)


@pytest.mark.parametrize("p", [0.0, 0.5, 3.0])
def test_other_norms_run_torch(rng, p):
    x1, x2 = rand(5, 3, generator=rng), rand(6, 3, generator=rng)
    torch.testing.assert_close(F.cdist(x1, x2, p), torch.cdist(x1, x2, p))


@pytest.mark.parametrize("args, error", [
    ((torch.zeros(3), torch.zeros(4, 3)), RuntimeError),
    ((torch.zeros(2, 3), torch.zeros(4, 2)), RuntimeError),
    ((torch.zeros(2, 3), torch.zeros(4, 3), -1.0), RuntimeError),
    ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 3, dtype=torch.int64)), RuntimeError),
])
def test_bad_input_raises_torchs_error(args, error):
    with pytest.raises(error) as theirs:
        torch.cdist(*args)
    with pytest.raises(error) as ours:
        F.cdist(*args)
    assert str(ours.value) == str(theirs.value)


def test_each_backend_runs_its_kernel(backend, monkeypatch):
    """The selected backend's forward runs (not a silent fallback to torch)."""
    calls = []
    module = fastml._backend.load("fastml.ops.cdist", backend.name)
    real = module.forward
    monkeypatch.setattr(module, "forward", lambda *a: (calls.append(1), real(*a))[1])
    F.cdist(torch.randn(3, 2, device=backend.device), torch.randn(4, 2, device=backend.device))
    assert calls == [1]
