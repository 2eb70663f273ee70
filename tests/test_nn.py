"""Drop-in modules against their torch.nn twins: construction, state_dict, outputs, gradients."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from conftest import assert_close, magnitude, rand

import fastml
from fastml.nn import Linear, LinearMSELoss, MSELoss


def twin_pair(fastml_cls, torch_cls, *args, **kwargs):
    torch.manual_seed(1234)
    ours = fastml_cls(*args, **kwargs)
    torch.manual_seed(1234)
    theirs = torch_cls(*args, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("in_features,out_features,bias,dtype",
                         [(1, 1, True, None), (2, 1, True, None), (13, 7, False, None), (0, 3, True, None),
                          (5, 0, True, None), (9, 4, True, torch.float64), (6, 2, False, torch.float64)])
def test_linear_is_a_drop_in(backend, in_features, out_features, bias, dtype, rng):
    ours, theirs = twin_pair(Linear, torch.nn.Linear, in_features, out_features, bias=bias, dtype=dtype,
                             device=backend.device)
    assert isinstance(ours, torch.nn.Linear)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)  # same initialisation from the same seed

    for lead in [(), (3,), (2, 5), (0,), (2, 1, 3)]:
        x = rand(*lead, in_features, dtype=dtype or torch.float32, device=backend.device, generator=rng)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = ours(xa), theirs(xb)
        assert out.shape == ref.shape
        assert_close(out, ref.double(), scale=magnitude(ref))
        up = rand(*out.shape, dtype=out.dtype, device=backend.device, generator=rng)
        out.backward(up)
        ref.backward(up)
        assert_close(xa.grad, xb.grad.double(), scale=10.0)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert_close(p.grad, q.grad.double(), scale=magnitude(q.grad))
        ours.zero_grad(), theirs.zero_grad()


def test_linear_state_dict_round_trip():
    ours, theirs = Linear(4, 3), torch.nn.Linear(4, 3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    theirs2 = torch.nn.Linear(4, 3)
    theirs2.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs2(x), ours(x))
    copied = copy.deepcopy(ours)
    assert isinstance(copied, Linear)
    torch.testing.assert_close(copied(x), ours(x))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_is_a_drop_in(backend, reduction, rng):
    ours, theirs = MSELoss(reduction=reduction), torch.nn.MSELoss(reduction=reduction)
    assert isinstance(ours, torch.nn.MSELoss) and repr(ours) == repr(theirs)
    assert ours.reduction == theirs.reduction
    for shape in [(5,), (3, 4), (2, 3, 5), (0, 2)]:
        a = rand(*shape, device=backend.device, generator=rng, requires_grad=True)
        b = rand(*shape, device=backend.device, generator=rng)
        out = ours(a, b)
        a2 = a.detach().clone().requires_grad_()
        ref = theirs(a2, b)
        assert_close(out, ref.double(), scale=magnitude(ref))
        out.sum().backward()
        ref.sum().backward()
        assert_close(a.grad, a2.grad.double())


def test_mse_loss_legacy_constructor_arguments():
    for size_average, reduce in itertools.product([None, True, False], repeat=2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = MSELoss(size_average=size_average, reduce=reduce)
            theirs = torch.nn.MSELoss(size_average=size_average, reduce=reduce)
        assert ours.reduction == theirs.reduction
        a, b = torch.randn(4, 3), torch.randn(4, 3)
        torch.testing.assert_close(ours(a, b), theirs(a, b))


def test_mse_loss_broadcast_warning():
    with pytest.warns(UserWarning, match="different to the input size"):
        MSELoss()(torch.randn(4, 1), torch.randn(4))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_mse_loss_equals_linear_then_mse(backend, bias, reduction, rng):
    fused = LinearMSELoss(6, 3, bias=bias, reduction=reduction, device=backend.device)
    linear = torch.nn.Linear(6, 3, bias=bias, device=backend.device)
    linear.load_state_dict(fused.state_dict())  # loads into an nn.Linear ...
    fused.load_state_dict(linear.state_dict())  # ... and back
    x = rand(11, 6, device=backend.device, generator=rng)
    y = rand(11, 3, device=backend.device, generator=rng)
    loss, ref = fused(x, y), torch.nn.MSELoss(reduction=reduction)(linear(x), y)
    assert_close(loss, ref.double(), scale=magnitude(ref))
    assert_close(fused.predict(x), linear(x).double(), scale=10.0)
    loss.sum().backward()
    ref.sum().backward()
    for p, q in zip(fused.parameters(), linear.parameters()):
        assert_close(p.grad, q.grad.double(), scale=magnitude(q.grad))


@pytest.mark.parametrize("replaced_at", [0, 4])
@pytest.mark.parametrize("bias_shape", [(1,), ()])
def test_linear_mse_loss_broadcasts_a_one_element_bias_on_every_route(bias_shape, replaced_at, rng):
    """A bias replaced by one that broadcasts, as nn.Linear then nn.MSELoss take it, before and
    after the module's route settles: torch's result each time (it raised before the route
    settled, and broadcast after, when the route had settled on torch's ops)."""
    fused, linear = LinearMSELoss(6, 3, dtype=torch.float64), torch.nn.Linear(6, 3, dtype=torch.float64)
    linear.load_state_dict(fused.state_dict())
    x, y = rand(11, 6, generator=rng).double(), rand(11, 3, generator=rng).double()
    for step in range(8):
        if step == replaced_at:
            value = rand(*bias_shape, generator=rng).double()
            fused.bias, linear.bias = torch.nn.Parameter(value.clone()), torch.nn.Parameter(value.clone())
        loss, ref = fused(x, y), torch.nn.MSELoss()(linear(x), y)
        assert_close(loss, ref, scale=magnitude(ref))
        loss.backward()
        ref.backward()
        for p, q in zip(fused.parameters(), linear.parameters()):
            assert p.shape == q.shape
            assert_close(p.grad, q.grad, scale=magnitude(q.grad))
            p.grad = q.grad = None


def test_linear_mse_loss_module_contract():
    torch.manual_seed(0)
    fused = LinearMSELoss(4, 2)
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2)
    assert fused.state_dict().keys() == linear.state_dict().keys()
    for k in ("weight", "bias"):
        assert torch.equal(fused.state_dict()[k], linear.state_dict()[k])  # nn.Linear's initialisation
    assert "reduction='mean'" in repr(fused)
    assert LinearMSELoss(3, 1, bias=False).bias is None
    assert LinearMSELoss(3, 1, dtype=torch.float64).weight.dtype == torch.float64
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        LinearMSELoss(3, 1, reduction="median")


def course_data(generator):
    true_w, true_b = torch.tensor([2.0, -3.4]), 4.2
    return fastml.data.synthetic_linear(true_w, true_b, 1000, generator=generator), true_w, true_b


@pytest.mark.parametrize("api", ["LinearMSELoss", "Linear+MSELoss"])
def test_course_experiment_with_drop_ins(backend, api, rng):
    """w = [2, -3.4], b = 4.2, 1000 examples, lr 0.03, batch 10, 3 epochs → loss near 5e-5."""
    if backend.interpreted:
        pytest.skip("300 steps through the Triton interpreter: covered by LinearRegression's test")
    (X, y), true_w, true_b = course_data(rng)
    if api == "LinearMSELoss":
        model = LinearMSELoss(2, 1)
        step_loss = model
    else:
        net, criterion = Linear(2, 1), MSELoss()
        model = net
        step_loss = lambda xb, yb: criterion(net(xb), yb)  # noqa: E731
    with torch.no_grad():
        model.weight.normal_(0, 0.01, generator=rng)
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    for _ in range(3):
        for xb, yb in fastml.data.batches(X, y, batch_size=10, generator=rng):
            loss = step_loss(xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        final = step_loss(X, y).item() / 2  # the course prints (y_hat - y)^2 / 2
    assert 2.5e-5 < final < 1e-4
    assert (model.weight.detach().reshape(-1) - true_w).abs().max() < 1e-2
    assert abs(model.bias.item() - true_b) < 1e-2


def test_autocast_behaves_like_torch():
    """Under torch.autocast, linear runs in the lower precision and mse_loss in float32, as torch's."""
    ours, theirs = twin_pair(Linear, torch.nn.Linear, 8, 4)
    x, y = torch.randn(5, 8), torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ours(x), theirs(x)
        assert out.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref)
        loss, ref_loss = MSELoss()(out, y), torch.nn.MSELoss()(ref, y)
        assert loss.dtype == ref_loss.dtype
        torch.testing.assert_close(loss, ref_loss)
        fused = LinearMSELoss(8, 4)
        fused.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(fused(x, y), torch.nn.MSELoss()(theirs(x), y))
