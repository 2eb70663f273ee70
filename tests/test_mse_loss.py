"""fastml.functional.mse_loss (behind fastml.nn.MSELoss), on every backend, against torch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import SHIPPED_TIMING, FunctionRecorder, assert_close, magnitude, rand, upcast

import fastml
from fastml import _tune

REDUCTIONS = ("mean", "sum", "none")


def check(inp, tgt, reduction, generator):
    out = fastml.functional.mse_loss(inp, tgt, reduction=reduction)
    ri, rt = upcast(inp, tgt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.mse_loss(ri, rt, reduction=reduction)
    assert out.shape == ref.shape and out.dtype == inp.dtype
    assert_close(out, ref, inp.dtype, scale=magnitude(ref))
    up = rand(*out.shape, dtype=inp.dtype, device=inp.device, generator=generator)
    out.backward(up)
    ref.backward(up.detach().cpu().double())
    for t, r in zip((inp, tgt), (ri, rt)):
        if t.requires_grad:
            assert t.grad.shape == t.shape
            assert_close(t.grad, r.grad, inp.dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 17), (0, 4), (), (1001,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch(backend, dtype, shape, reduction, rng):
    dev = backend.device
    inp = rand(*shape, dtype=dtype, device=dev, generator=rng, requires_grad=True)
    tgt = rand(*shape, dtype=dtype, device=dev, generator=rng, requires_grad=True)
    check(inp, tgt, reduction, rng)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(backend, dtype, rng):
    inp = rand(5, 33, dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
    check(inp, rand(5, 33, dtype=dtype, device=backend.device, generator=rng), "mean", rng)


def test_broadcasting_warns_exactly_as_torch(backend, rng):
    inp = rand(6, 1, device=backend.device, generator=rng, requires_grad=True)
    tgt = rand(6, device=backend.device, generator=rng)
    with pytest.warns(UserWarning) as ours:
        fastml.functional.mse_loss(inp, tgt)
    with pytest.warns(UserWarning) as theirs:
        F.mse_loss(inp, tgt)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert ours[0].filename == __file__  # attributed to the caller, as torch does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(inp, tgt, "mean", rng)  # (6, 1) vs (6,) broadcasts to (6, 6), gradients sum back


def test_non_contiguous(backend, rng):
    inp = rand(8, 10, device=backend.device, generator=rng).t().requires_grad_()
    tgt = rand(10, 16, device=backend.device, generator=rng)[:, ::2]
    check(inp, tgt, "sum", rng)


def test_gradcheck(backend, rng):
    args = (rand(4, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True),
            rand(4, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True))
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda a, b: fastml.functional.mse_loss(a, b, reduction=reduction), args)


def test_empty_mean_is_nan(backend):
    out = fastml.functional.mse_loss(torch.empty(0, device=backend.device), torch.empty(0, device=backend.device))
    assert torch.isnan(out)


def test_options_torch_handles_are_handled(rng):
    """Legacy size_average / reduce, elementwise weights, type promotion: as torch does."""
    a, b = rand(4, 3, generator=rng), rand(4, 3, generator=rng)
    torch.testing.assert_close(fastml.functional.mse_loss(a, b, size_average=False),
                               F.mse_loss(a, b, size_average=False))
    torch.testing.assert_close(fastml.functional.mse_loss(a, b, reduce=False), F.mse_loss(a, b, reduce=False))
    wt = rand(4, 3, generator=rng).abs()
    torch.testing.assert_close(fastml.functional.mse_loss(a, b, weight=wt), F.mse_loss(a, b, weight=wt))
    torch.testing.assert_close(fastml.functional.mse_loss(a, b.double()), F.mse_loss(a, b.double()))
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        fastml.functional.mse_loss(a, b, reduction="avg")
    with pytest.raises(TypeError, match="target must be a Tensor"):
        fastml.functional.mse_loss(a, [1.0])


def test_double_backward(backend, rng):
    args = (rand(4, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True),
            rand(4, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True))
    for reduction in REDUCTIONS:
        assert torch.autograd.gradgradcheck(lambda a, b: fastml.functional.mse_loss(a, b, reduction=reduction), args)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [((5, 3), (5, 3)), ((4,), (4,)), ((), ()), ((0, 2), (0, 2)), ((3, 1), (3, 4))],
                         ids=str)
def test_torch_twin_is_torchs_mse_loss_bit_for_bit(shapes, reduction, rng):
    """functional.torch_mse_loss, the torch side of the drop-ins' routes (nn.MSELoss,
    LinearMSELoss): the same values, gradients (first and second order) and warning as
    F.mse_loss, whether it takes its shortcut (equal shapes) or not (broadcasting)."""
    inputs = [rand(*shape, dtype=torch.float64, generator=rng, requires_grad=True) for shape in shapes]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        out = fastml.functional.torch_mse_loss(*inputs, reduction)
    with warnings.catch_warnings(record=True) as torchs:
        warnings.simplefilter("always")
        ref = F.mse_loss(*twins, reduction=reduction)
    assert [str(w.message) for w in ours] == [str(w.message) for w in torchs]
    assert torch.equal(out, ref) or (out.isnan().all() and ref.isnan().all())
    up = torch.ones_like(out)
    grads = torch.autograd.grad(out, inputs, up, create_graph=True)
    ref_grads = torch.autograd.grad(ref, twins, up, create_graph=True)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    if out.numel():
        second = torch.autograd.grad(grads[0].sum(), inputs[0], allow_unused=True)[0]
        ref_second = torch.autograd.grad(ref_grads[0].sum(), twins[0], allow_unused=True)[0]
        assert torch.equal(second, ref_second)


def test_torch_twin_lets_function_modes_see_torchs_function(rng):
    """Under a TorchFunctionMode, the twin calls F.mse_loss itself, so the mode sees the call
    torch's module would make."""
    a, b = rand(3, 2, generator=rng), rand(3, 2, generator=rng)
    with FunctionRecorder() as mode:
        fastml.functional.torch_mse_loss(a, b, "mean")
    assert F.mse_loss in mode.seen


def test_torch_twin_rejects_a_bad_reduction_as_torch_does(rng):
    a = rand(3, generator=rng)
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        F.mse_loss(a, a, reduction="avg")
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        fastml.functional.torch_mse_loss(a, a, "avg")


def test_a_routed_call_warns_as_the_callers_every_time(rng):
    """Routed (the measured choice settles the call's signature on one path or the other), the
    broadcasting warning still comes once per call, attributed to the caller, as torch's."""
    inp = rand(6, 1, generator=rng, requires_grad=True)
    tgt = rand(6, generator=rng)
    for _ in range(3):  # the first call settles the route; the others follow it
        with pytest.warns(UserWarning, match="different to the input size") as ours:
            fastml.functional.mse_loss(inp, tgt).backward()
        assert len(ours) == 1 and ours[0].filename == __file__


def test_the_layer_warns_once_a_call_while_its_route_is_measured(rng, monkeypatch):
    """fastml.nn.MSELoss, called with a target to broadcast on a signature not yet decided, times
    torch's forward and fastml's several times (as many as it ships with, not the test run's few):
    the caller still sees torch's one warning a call, and the results and gradients of torch's
    layer."""
    monkeypatch.setattr(_tune, "ROUNDS", SHIPPED_TIMING[0])
    monkeypatch.setattr(_tune, "SAMPLE_SECONDS", SHIPPED_TIMING[1])
    inp = rand(5, 3, 1, generator=rng, requires_grad=True)  # a shape no other test routes
    tgt = rand(5, 1, 7, generator=rng)
    ours, torchs = fastml.nn.MSELoss(), torch.nn.MSELoss()
    for _ in range(3):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = ours(inp, tgt)
        assert [str(w.message) for w in seen] == [
            f"Using a target size ({tgt.size()}) that is different to the input size ({inp.size()}). This will likely "
            "lead to incorrect results due to broadcasting. Please ensure they have the same size."]
        (grad,) = torch.autograd.grad(out, inp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torchs(inp, tgt)
        (expected_grad,) = torch.autograd.grad(expected, inp)
        assert_close(out, expected, torch.float32)
        assert_close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("make", [lambda g: rand(7, 5, generator=g).t(),
                                  lambda g: rand(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last),
                                  lambda g: rand(5, 1, 3, generator=g).transpose(0, 2),
                                  lambda g: rand(6, 8, generator=g)[:, ::2]],
                         ids=["transposed", "channels_last", "size-1 dimension", "sliced"])
def test_none_gives_the_loss_torchs_strides(backend, make, rng):
    """Elementwise, torch's loss takes the input's layout (its memory order): so does fastml's."""
    inp = make(rng).to(backend.device).requires_grad_()
    tgt = rand(*inp.shape, device=backend.device, generator=rng)
    with fastml.use_backend(backend.name):
        out = fastml.functional.mse_loss(inp, tgt, reduction="none")
    expected = F.mse_loss(inp, tgt, reduction="none")
    assert out.stride() == expected.stride()
    check(inp, tgt, "none", rng)


def test_none_takes_the_strides_order_of_an_input_that_is_not_dense(rng):
    """torch's elementwise ops lay the output out in the input's stride order, dense or not: a
    channel-sliced channels-last view gives a channels-last loss; a sliced contiguous one a
    contiguous loss."""
    channels_last = rand(4, 8, 6, 5, generator=rng).contiguous(memory_format=torch.channels_last)
    for x in (channels_last[:, ::2], rand(4, 8, 6, 5, generator=rng)[:, ::2], channels_last[:, ::2].transpose(2, 3)):
        target = rand(*x.shape, generator=rng)
        ours = fastml.functional.mse_loss(x, target, reduction="none")
        theirs = F.mse_loss(x, target, reduction="none")
        assert ours.stride() == theirs.stride()
        assert_close(ours, theirs, torch.float32, scale=magnitude(theirs))


def test_none_of_a_broadcast_input_is_contiguous_as_torchs(rng):
    """An expanded input (a stride of 0) gives torch's layout, the other operand's: contiguous."""
    for x in (rand(1, 4, generator=rng).expand(3, 4), rand(1, 6, 5, 7, generator=rng).expand(2, 6, 5, 7),
              rand(2, 1, 5, 7, generator=rng).expand(2, 6, 5, 7)):
        target = rand(*x.shape, generator=rng)
        assert fastml.functional.mse_loss(x, target, reduction="none").stride() == \
            F.mse_loss(x, target, reduction="none").stride()
