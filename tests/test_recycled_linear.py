"""Large gradients on recycled memory (fastml/_recycle.py) and the Linear variant that writes its
weight gradient there (fastml/_recycled_linear.py): the memory comes back only when nothing
holds it, the variant computes torch's linear and every gradient (float64 reference, gradcheck,
gradgradcheck, forward-mode), ``.grad`` takes the block without a copy, and a layer (plain, and
folded with its ReLU) runs it where it measured fastest."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, magnitude, prefer

import fastml
from fastml import _recycle, _recycled_linear, _route


@pytest.fixture
def recycle_everything(monkeypatch):
    """Recycles blocks of any size (the real floor, 32 MiB, is too large for a test's tensors)."""
    _recycle.release()
    monkeypatch.setattr(_recycle, "MIN_BYTES", 1)
    yield
    _recycle.release()


def test_a_free_block_comes_back_and_a_held_one_does_not(recycle_everything):
    first = _recycle.empty((5, 7), torch.float32, "cpu")
    address = first.data_ptr()
    del first
    again = _recycle.empty((5, 7), torch.float32, "cpu")
    assert again.data_ptr() == address  # nothing held it: the same block
    assert again.shape == (5, 7) and again.is_contiguous() and again.dtype == torch.float32
    held = _recycle.empty((5, 7), torch.float32, "cpu")  # `again` still alive: a fresh block, kept instead
    assert held.data_ptr() != address
    view = held[1:]  # a view holds the block too
    del held
    assert _recycle.empty((5, 7), torch.float32, "cpu").data_ptr() not in (address, view.data_ptr() - 7 * 4)
    # other shapes and dtypes have blocks of their own
    assert _recycle.empty((7, 5), torch.float32, "cpu").shape == (7, 5)
    assert _recycle.empty((5, 7), torch.float64, "cpu").dtype == torch.float64
    assert _recycle.kept_bytes() > 0
    assert fastml.empty_cache() > 0 and _recycle.kept_bytes() == 0


def test_a_kept_block_counts_as_held_while_a_saved_tensor_or_grad_has_it(recycle_everything):
    block = _recycle.empty((6, 4), torch.float64, "cpu")
    address = block.data_ptr()
    weight = torch.zeros(6, 4, dtype=torch.float64, requires_grad=True)
    weight.grad = block
    del block
    assert _recycle.empty((6, 4), torch.float64, "cpu").data_ptr() != address  # .grad has it
    weight.grad = None
    x = _recycle.empty((6, 4), torch.float64, "cpu").fill_(2).requires_grad_()
    address = x.data_ptr()
    y = (x * x).sum()  # autograd saves x
    del x
    assert _recycle.empty((6, 4), torch.float64, "cpu").data_ptr() != address
    del y


def test_a_block_whose_storage_object_is_held_or_shared_is_never_reused(recycle_everything):
    block = _recycle.empty((4, 3), torch.float32, "cpu")
    address = block.data_ptr()
    storage = block.untyped_storage()  # the very object kept: it adds nothing to the use count
    del block
    assert _recycle.empty((4, 3), torch.float32, "cpu").data_ptr() != address
    del storage
    shared = _recycle.empty((2, 5), torch.float32, "cpu").share_memory_()  # another process may hold it
    address = shared.data_ptr()
    del shared
    assert _recycle.empty((2, 5), torch.float32, "cpu").data_ptr() != address


def test_small_blocks_and_other_devices_are_plain_tensors():
    _recycle.release()
    assert _recycle.empty((3, 3), torch.float32, "cpu").shape == (3, 3)
    assert _recycle.kept_bytes() == 0  # under MIN_BYTES: malloc's heap reuses them anyway
    assert _recycle.empty((0, 5), torch.float32, "meta").device.type == "meta"


def test_the_number_of_kept_shapes_is_bounded(recycle_everything):
    for rows in range(_recycle.MAX_KEPT + 5):
        _recycle.empty((rows + 1, 3), torch.float32, "cpu")
    assert len(_recycle._kept) == _recycle.MAX_KEPT


SHAPES = [((7, 13), 11, True), ((2, 3, 17), 5, False), ((1, 1), 1, True), ((0, 9), 4, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, out_features, bias", SHAPES, ids=["2d", "3d-no-bias", "1x1", "empty"])
def test_forward_and_gradients_match_the_float64_reference(shape, out_features, bias, dtype, recycle_everything,
                                                           rng):
    x = torch.randn(*shape, generator=rng, dtype=dtype).requires_grad_()
    weight = torch.randn(out_features, shape[-1], generator=rng, dtype=dtype).requires_grad_()
    b = torch.randn(out_features, generator=rng, dtype=dtype).requires_grad_() if bias else None
    grad = torch.randn(*shape[:-1], out_features, generator=rng, dtype=dtype)
    reference = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, b)]
    expected = F.linear(*reference)
    expected.backward(grad.double())
    for step in range(2):  # the second step's weight gradient lands on the first's block
        for t in (x, weight, b):
            if t is not None:
                t.grad = None
        out = _recycled_linear.linear(x, weight, b)
        out.backward(grad)
        assert_close(out, expected, scale=magnitude(expected))
        for actual, wanted in zip((x, weight, b), reference):
            if actual is not None:
                assert actual.grad.is_contiguous() and actual.grad.dtype == dtype
                assert_close(actual.grad, wanted.grad, scale=magnitude(wanted.grad))
    assert torch.equal(out, F.linear(x, weight, b))  # torch's own forward, bit for bit


def test_the_weight_gradient_becomes_grad_without_a_copy(recycle_everything, rng):
    x = torch.randn(9, 6, generator=rng)
    weight = torch.randn(4, 6, generator=rng, requires_grad=True)
    _recycled_linear.linear(x, weight, None).sum().backward()
    first = weight.grad.data_ptr()
    assert first == _recycle._kept[((4, 6), torch.float32)].data_ptr()
    weight.grad = None  # zero_grad(set_to_none=True)
    _recycled_linear.linear(x, weight, None).sum().backward()
    assert weight.grad.data_ptr() == first
    held = weight.grad  # kept by the caller: the next step's gradient is accumulated, not written over
    expected = held.clone()
    _recycled_linear.linear(x, weight, None).sum().backward()
    assert_close(held, 2 * expected)
    assert_close(weight.grad, 2 * expected)


def test_gradcheck_gradgradcheck_and_forward_mode(recycle_everything, rng):
    x = torch.randn(5, 3, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_recycled_linear.linear, (x, weight, b), check_forward_ad=True,
                                    check_batched_grad=True)
    assert torch.autograd.gradgradcheck(_recycled_linear.linear, (x, weight, b))


def test_forward_mode_with_a_tangent_on_one_input_only(recycle_everything, rng):
    x = torch.randn(4, 3, 5, generator=rng, dtype=torch.float64)
    weight = torch.randn(6, 5, generator=rng, dtype=torch.float64)
    b = torch.randn(6, generator=rng, dtype=torch.float64)
    tangents = [torch.randn_like(t) for t in (x, weight, b)]
    for which in range(3):
        primals = [x, weight, b]
        with torch.autograd.forward_ad.dual_level():
            primals[which] = torch.autograd.forward_ad.make_dual(primals[which], tangents[which])
            actual = torch.autograd.forward_ad.unpack_dual(_recycled_linear.linear(*primals)).tangent
        originals = (x, weight, b)
        expected = torch.func.jvp(lambda t: F.linear(*[t if i == which else o for i, o in enumerate(originals)]),
                                  (originals[which],), (tangents[which],))[1]
        assert actual.shape == expected.shape
        assert_close(actual, expected, scale=magnitude(expected))


def test_where_it_applies():
    big = torch.nn.Linear(4096, 2048)  # 32 MiB of float32 weight
    x = torch.randn(2, 4096)
    assert _recycled_linear.applies(x, big.weight, big.bias)
    with torch.no_grad():
        assert not _recycled_linear.applies(x, big.weight, big.bias)  # no gradient: nothing to recycle
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _recycled_linear.applies(x, big.weight, big.bias)
    torch.func.grad(lambda inp: (assert_not_applies(inp, big) or inp).sum())(x)
    assert not _recycled_linear.applies(x.double(), big.weight, big.bias)
    small = torch.nn.Linear(64, 32)
    assert not _recycled_linear.applies(torch.randn(2, 64), small.weight, small.bias)
    big.weight.requires_grad_(False)
    assert not _recycled_linear.applies(x, big.weight, big.bias)


def assert_not_applies(input, layer):
    assert not _recycled_linear.applies(input, layer.weight, layer.bias)  # a torch.func transform


@pytest.mark.parametrize("with_relu", [False, True], ids=["linear", "linear-relu"])
def test_a_layer_runs_it_where_it_measured_fastest(with_relu, monkeypatch, recycle_everything, rng):
    prefer(monkeypatch, "recycled_grad")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    unpatched = torch.nn.Sequential(torch.nn.Linear(13, 7), *([torch.nn.ReLU()] if with_relu else []))
    model = copy.deepcopy(unpatched)
    fastml.patch(model)
    x = torch.randn(5, 13, generator=rng)
    for _ in range(3):  # decides, then runs the route
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
    assert set(_route.routes(model[0]).values()) == {"recycled_grad"}
    unpatched.zero_grad()
    expected = unpatched(x)
    expected.square().sum().backward()
    assert_close(out, expected, scale=magnitude(expected))
    for mine, theirs in zip(model.parameters(), unpatched.parameters()):
        assert_close(mine.grad, theirs.grad, scale=magnitude(theirs.grad))
    # under a torch.func transform the settled route gives way to torch's own linear
    params = {name: p.detach() for name, p in model.named_parameters()}
    theirs = {name: p.detach() for name, p in unpatched.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    expected = torch.func.grad(lambda p: torch.func.functional_call(unpatched, p, (x,)).square().sum())(theirs)
    for name in grads:
        assert_close(grads[name], expected[name], scale=magnitude(expected[name]))
    fastml.unpatch(model)
    assert _recycle.kept_bytes() == 0  # unpatch lets the blocks go
