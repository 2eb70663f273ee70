"""Autograd beyond reverse mode, where torch's twins support it: forward-mode AD (jvp) and the
torch.func transforms (vmap, grad), on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rand

import fastml

# The Triton cases (seconds each on the interpreter) repeat the kernels' own tests in each autograd
# mode: long there (CI runs them).
pytestmark = pytest.mark.interpreter_long()

REDUCTIONS = ("mean", "sum", "none")


def float64(*shapes, device, generator):
    return [rand(*s, dtype=torch.float64, device=device, generator=generator, requires_grad=True) for s in shapes]


def test_linear_forward_ad(backend, rng):
    args = float64((5, 4), (3, 4), (3,), device=backend.device, generator=rng)
    assert torch.autograd.gradcheck(fastml.functional.linear, args, check_forward_ad=True,
                                    check_backward_ad=True, check_batched_grad=False)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_loss_forward_ad(backend, reduction, rng):
    args = float64((4, 3), (4, 3), device=backend.device, generator=rng)
    assert torch.autograd.gradcheck(lambda a, b: fastml.functional.mse_loss(a, b, reduction=reduction), args,
                                    check_forward_ad=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_mse_forward_ad(backend, reduction, rng):
    args = float64((5, 4), (3, 4), (3,), (5, 3), device=backend.device, generator=rng)
    assert torch.autograd.gradcheck(lambda *a: fastml.functional.linear_mse(*a, reduction=reduction), args,
                                    check_forward_ad=True, fast_mode=backend.interpreted)


def test_jvp_matches_torch(backend, rng):
    x, w, b, y = (t.detach() for t in float64((6, 4), (2, 4), (2,), (6, 2), device=backend.device, generator=rng))
    tangents = tuple(torch.randn_like(t) for t in (x, w, b, y))
    ours = torch.func.jvp(lambda *a: fastml.functional.linear_mse(*a), (x, w, b, y), tangents)
    theirs = torch.func.jvp(lambda x, w, b, y: F.mse_loss(F.linear(x, w, b), y), (x, w, b, y), tangents)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)


def test_vmap_and_func_grad(backend, rng):
    x = rand(7, 3, 4, device=backend.device, generator=rng)
    lin, ref = fastml.nn.Linear(4, 2, device=backend.device), torch.nn.Linear(4, 2, device=backend.device)
    ref.load_state_dict(lin.state_dict())
    torch.testing.assert_close(torch.func.vmap(lin)(x), torch.func.vmap(ref)(x))
    params = dict(lin.named_parameters())

    def loss(p, xb):
        return fastml.functional.mse_loss(torch.func.functional_call(lin, p, (xb,)), torch.ones(3, 2, device=xb.device))

    def ref_loss(p, xb):
        return F.mse_loss(torch.func.functional_call(ref, p, (xb,)), torch.ones(3, 2, device=xb.device))

    ours = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    theirs = torch.func.vmap(torch.func.grad(ref_loss), in_dims=(None, 0))(dict(ref.named_parameters()), x)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k])
    y = rand(7, 3, 2, device=backend.device, generator=rng)
    w, b = params["weight"].detach(), params["bias"].detach()
    torch.testing.assert_close(
        torch.func.vmap(lambda xb, yb: fastml.functional.linear_mse(xb, w, b, yb))(x, y),
        torch.func.vmap(lambda xb, yb: F.mse_loss(F.linear(xb, w, b), yb))(x, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batched_gradients(backend, reduction, rng):
    """gradcheck's batched-grad check runs backward under vmap (is_grads_batched)."""
    lin_args = float64((5, 4), (3, 4), (3,), device=backend.device, generator=rng)
    assert torch.autograd.gradcheck(fastml.functional.linear, lin_args, check_batched_grad=True,
                                    fast_mode=backend.interpreted)
    mse_args = float64((4, 3), (4, 3), device=backend.device, generator=rng)
    assert torch.autograd.gradcheck(lambda a, b: fastml.functional.mse_loss(a, b, reduction=reduction), mse_args,
                                    check_batched_grad=True, fast_mode=backend.interpreted)
    fused_args = float64((5, 4), (3, 4), (3,), (5, 3), device=backend.device, generator=rng)
    assert torch.autograd.gradcheck(lambda *a: fastml.functional.linear_mse(*a, reduction=reduction), fused_args,
                                    check_batched_grad=True, fast_mode=backend.interpreted)


# The fused losses form their gradients going forward, and backward hands them over as they are
# when the incoming gradient is exactly 1 (fastml.ops.scaled). What is handed over must behave
# as a fresh gradient: under a retained graph, after in-place edits of .grad, and summed with
# the gradient of a second use.
FORMED_FORWARD = {
    "linear_cross_entropy": (lambda x, w, b, t: fastml.functional.linear_cross_entropy(x, w, t[0], linear_bias=b),
                             lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b), t[0])),
    "linear_mse": (lambda x, w, b, t: fastml.functional.linear_mse(x, w, b, t[1]),
                   lambda x, w, b, t: F.mse_loss(F.linear(x, w, b), t[1])),
    "cross_entropy": (lambda x, w, b, t: fastml.functional.cross_entropy(F.linear(x, w, b), t[0]),
                      lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b), t[0])),
}


@pytest.mark.parametrize("op", list(FORMED_FORWARD))
def test_gradients_formed_forward_behave_as_fresh_ones(backend, op, rng):
    ours, theirs = FORMED_FORWARD[op]
    n, d, c = 7, 5, 3
    params = float64((n, d), (c, d), (c,), device=backend.device, generator=rng)
    targets = (torch.randint(0, c, (n,), generator=rng).to(backend.device),
               rand(n, c, dtype=torch.float64, device=backend.device, generator=rng))
    expected = torch.autograd.grad(theirs(*params, targets), params)

    loss = ours(*params, targets)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    for p in params:
        p.grad.mul_(3)  # in place, on what the first backward handed over
    loss.backward()  # the saved gradients handed over again, onto 3x the first
    for p, g, e in zip(params, first, expected):
        torch.testing.assert_close(g, e)
        torch.testing.assert_close(p.grad, 4 * e)

    for p in params:
        p.grad = None
    (ours(*params, targets) + 2 * ours(*params, targets)).backward()  # incoming 1 and 2, summed
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, 3 * e)
