"""fastml.functional.linear_cross_entropy (behind fastml.nn.LinearCrossEntropyLoss), on every
backend, through both of the C++ backend's paths (the fused small-head kernel and the chunks).

Oracle: linear then torch's cross_entropy in float64 on upcast copies of the same inputs, and
torch's own linear_cross_entropy / LinearCrossEntropyLoss (torch >= 2.13) as the twin.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (GROUPED_CLASSES, assert_close, assert_device_side_assert, backward_and_compare, loss_options,
                      magnitude, rand, sgd_loss_curve, upcast)

import fastml
from fastml.ops.linear_cross_entropy import chunked, cpp_impl

REDUCTIONS = ("mean", "sum", "none")
# (leading dims, D, C): odd and prime sizes, one class, an empty batch, unbatched input, a head
# wide enough for several vectors and a partial one.
SHAPES = [((13,), 7, 5), ((5,), 3, 1), ((0,), 4, 3), ((), 6, 4), ((37,), 9, 130)]
INTERPRETED_SHAPES = [((13,), 7, 5), ((0,), 4, 3), ((), 6, 4)]
OPTIONS = [dict(), dict(weight=True, label_smoothing=0.2), dict(ignore_index=2)]
HAS_TWIN = hasattr(F, "linear_cross_entropy")


@pytest.fixture(params=["fused", "chunked"])
def path(request, monkeypatch):
    """The C++ backend's two paths; "chunked" also makes every backend's chunks a few rows."""
    if request.param == "chunked":
        monkeypatch.setattr(cpp_impl, "_FUSED_MAX_WEIGHT", 0)
        monkeypatch.setattr(chunked, "_MIN_CHUNK_ELEMENTS", 16)
    return request.param


def oracle(x, w, b, target, **kwargs):
    kwargs["ignore_index"] = -100 if kwargs.get("ignore_index") is None else kwargs["ignore_index"]
    return F.cross_entropy(F.linear(x, w, b), target, **kwargs)


def make_target(kind, lead, classes, generator, device, dtype, ignore_index=-100):
    if kind == "probs":
        return rand(*lead, classes, dtype=torch.float64, generator=generator).softmax(-1).to(device, dtype)
    target = torch.randint(0, classes, lead, generator=generator)
    if target.numel() > 2:
        target[1::3] = ignore_index
    return target.to(device)


def check(x, w, b, target, generator, **kwargs):
    """Loss and every requested gradient against the float64 oracle (and the twin's shape)."""
    dtype = x.dtype
    loss = fastml.functional.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs)
    rx, rw, rb = upcast(x, w, b)
    rt = target.cpu().double() if target.is_floating_point() else target.cpu()
    rkw = dict(kwargs, weight=None if kwargs.get("weight") is None else kwargs["weight"].cpu().double())
    ref = oracle(rx, rw, rb, rt, **rkw)
    assert loss.shape == ref.shape and loss.dtype == dtype and loss.device == x.device
    assert_close(loss, ref, dtype, scale=magnitude(ref))
    if HAS_TWIN:
        twin = F.linear_cross_entropy(rx, rw, rt, linear_bias=rb, **rkw)
        torch.testing.assert_close(ref, twin, equal_nan=True)
    if not any(t is not None and t.requires_grad for t in (x, w, b)):
        return
    backward_and_compare(loss, ref, zip("xwb", (x, w, b), (rx, rw, rb)), generator)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64_reference(backend, path, dtype, shape, kind, reduction, rng):
    if backend.interpreted and (shape not in INTERPRETED_SHAPES or dtype == torch.float64):
        pytest.skip("the Triton interpreter takes the small float32 shapes")
    lead, d, c = shape
    dev = backend.device
    for opts in OPTIONS:
        if kind == "probs" and "ignore_index" in opts:
            continue  # torch's error, tested below
        bias = "weight" not in opts  # with and without a bias
        x = rand(*lead, d, dtype=dtype, device=dev, generator=rng, requires_grad=True)
        w = rand(c, d, dtype=dtype, device=dev, generator=rng, requires_grad=True)
        b = rand(c, dtype=dtype, device=dev, generator=rng, requires_grad=True) if bias else None
        target = make_target(kind, lead, c, rng, dev, dtype, opts.get("ignore_index", -100))
        check(x, w, b, target, rng, reduction=reduction, **loss_options(opts, c, dtype, dev, rng))


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("classes", GROUPED_CLASSES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_taken_in_groups(backend, path, dtype, classes, kind, rng):
    """The fused kernel's rows four at a time (as test_cross_entropy.py's test_rows_taken_in_groups:
    one ignored row, in one group), the rows of a block past its last group one at a time. 70
    rows of 110 features: the fused kernel's blocks of 32 rows, on two threads (where the machine
    has two) from three classes up, and a masked tail in each row's dot products."""
    if backend.interpreted and dtype == torch.float64:
        pytest.skip("the Triton interpreter takes the float32 cases")
    dev = backend.device
    for reduction in REDUCTIONS:
        for opts in OPTIONS:
            if kind == "probs" and "ignore_index" in opts:
                continue
            ignore_index = opts.get("ignore_index", -100)
            x = rand(70, 110, dtype=dtype, device=dev, generator=rng, requires_grad=True)
            w = rand(classes, 110, dtype=dtype, device=dev, generator=rng, requires_grad=True, scale=0.3)
            b = rand(classes, dtype=dtype, device=dev, generator=rng, requires_grad=True)
            target = make_target(kind, (70,), classes, rng, dev, dtype, ignore_index)
            if kind == "index":  # one ignored row, row 41, and no other (classes other than ignore_index)
                others = torch.tensor([k for k in range(classes) if k != ignore_index])
                target = others[torch.randint(0, len(others), (70,), generator=rng)]
                target[41] = ignore_index
                target = target.to(dev)
            if reduction == "none":  # a NaN input in row 45 (every weight and bias gradient is then NaN:
                with torch.no_grad():  # the row losses and the other rows' input gradients are compared)
                    x[45, 2] = float("nan")
            check(x, w, b, target, rng, reduction=reduction, **loss_options(opts, classes, dtype, dev, rng))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(backend, dtype, rng):
    x = rand(9, 16, dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
    w = rand(37, 16, dtype=dtype, device=backend.device, generator=rng, requires_grad=True, scale=0.3)
    check(x, w, None, make_target("index", (9,), 37, rng, backend.device, dtype), rng)


@pytest.mark.parametrize("requires_grad", [(True, False, False), (False, True, True), (False, False, True)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_only_requested_gradients(backend, path, requires_grad, reduction, rng):
    x = rand(11, 6, device=backend.device, generator=rng, requires_grad=requires_grad[0])
    w = rand(9, 6, device=backend.device, generator=rng, requires_grad=requires_grad[1])
    b = rand(9, device=backend.device, generator=rng, requires_grad=requires_grad[2])
    check(x, w, b, make_target("index", (11,), 9, rng, backend.device, torch.float32), rng, reduction=reduction)
    assert all(t.grad is None for t, need in zip((x, w, b), requires_grad) if not need)


def test_non_contiguous_inputs(backend, path, rng):
    x = rand(12, 20, dtype=torch.float64, device=backend.device, generator=rng)[:, ::2].requires_grad_()
    w = rand(10, 7, dtype=torch.float64, device=backend.device, generator=rng).t().requires_grad_()
    b = rand(14, dtype=torch.float64, device=backend.device, generator=rng)[::2].requires_grad_()
    target = make_target("index", (24,), 7, rng, backend.device, torch.float64)[::2]
    check(x, w, b, target, rng)


def test_no_grad_and_inference_mode(backend, rng):
    x, w = rand(8, 5, device=backend.device, generator=rng), rand(4, 5, device=backend.device, generator=rng)
    target = make_target("index", (8,), 4, rng, backend.device, torch.float32)
    expected = oracle(x.double(), w.double(), None, target)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert_close(fastml.functional.linear_cross_entropy(x, w, target), expected, torch.float32)


def test_all_ignored_and_empty(backend, path):
    x = torch.randn(5, 3, device=backend.device, requires_grad=True)
    w = torch.randn(4, 3, device=backend.device, requires_grad=True)
    loss = fastml.functional.linear_cross_entropy(x, w, torch.full((5,), -100, device=backend.device))
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    empty = torch.zeros(0, 3, device=backend.device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.int64, device=backend.device)
    assert torch.isnan(fastml.functional.linear_cross_entropy(empty, w, target))
    fastml.functional.linear_cross_entropy(empty, w, target, reduction="sum").backward()
    assert empty.grad.shape == (0, 3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, path, reduction, rng):
    args = [rand(5, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True),
            rand(4, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True),
            rand(4, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)]
    weight = torch.rand(4, dtype=torch.float64, generator=rng).to(backend.device) + 0.5
    target = make_target("index", (5,), 4, rng, backend.device, torch.float64)

    def fn(x, w, b):
        return fastml.functional.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight,
                                                      reduction=reduction, label_smoothing=0.1)

    assert torch.autograd.gradcheck(fn, args)
    if not backend.interpreted:
        assert torch.autograd.gradgradcheck(fn, args)


_DEVICE_ASSERT_SCRIPT = """
import sys, torch, fastml
from fastml.ops.linear_cross_entropy import chunked
if sys.argv[2] == "chunked":
    chunked._MIN_CHUNK_ELEMENTS = 16
with fastml.use_backend("triton"):
    x = torch.randn(3, 5, device="cuda", requires_grad=True)
    w = torch.randn(4, 5, device="cuda")
    fastml.functional.linear_cross_entropy(x, w, torch.tensor([0, int(sys.argv[1]), 1], device="cuda"))
    torch.cuda.synchronize()
"""


@pytest.mark.parametrize("bad", [4, -1])
def test_out_of_range_target_is_torchs_index_error(backend, path, bad, rng):
    if backend.name == "triton" and backend.device.type == "cuda":
        # torch's CUDA loss fails a device-side assertion; so does fastml's (test_cross_entropy.py)
        assert_device_side_assert(_DEVICE_ASSERT_SCRIPT, str(bad), path)
        return
    x = rand(3, 5, device=backend.device, generator=rng, requires_grad=True)
    w = rand(4, 5, device=backend.device, generator=rng)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        fastml.functional.linear_cross_entropy(x, w, torch.tensor([0, bad, 1], device=backend.device))


def test_argument_checks_are_skipped_only_for_a_signature_that_passed_them(monkeypatch, rng):
    """A call whose signature (shapes, dtypes, devices, layouts, gradient states, the config's
    values and types) passed the checks before skips them; anything else is checked again."""
    from fastml import _route
    from fastml import functional as fm

    checked = []
    real = fm._linear_cross_entropy_args
    monkeypatch.setattr(fm, "_linear_cross_entropy_args", lambda *a: (checked.append(a[5:]), real(*a))[1])
    # the route settled on fastml's kernel, so that every call reaches the checks or their skip
    monkeypatch.setattr(_route, "settled_on_torch", lambda sig, input: False)
    monkeypatch.setattr(_route, "call_function", lambda op, args, config, torch_forward, fastml_forward, sig:
                        fastml_forward(*args))
    x, w = rand(6, 5, generator=rng), rand(3, 5, generator=rng)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = F.cross_entropy(F.linear(x, w), target, ignore_index=1)
    for _ in range(3):
        assert_close(fastml.functional.linear_cross_entropy(x, w, target, ignore_index=1), expected, torch.float32)
    assert len(checked) == 1
    with pytest.raises(TypeError, match="ignore_index"):  # the same value, of a type torch refuses
        fastml.functional.linear_cross_entropy(x, w, target, ignore_index=True)
    assert len(checked) == 2
    fastml.functional.linear_cross_entropy(x, w, target, weight=torch.ones(3))
    fastml.functional.linear_cross_entropy(x, w, target, weight=torch.ones(3))
    assert len(checked) == 3
    with pytest.raises(RuntimeError):  # a class weight of another dtype: checked, refused, torch's error
        fastml.functional.linear_cross_entropy(x, w, target, weight=torch.ones(3, dtype=torch.float64))
    assert len(checked) == 4


@pytest.mark.skipif(not HAS_TWIN, reason="torch < 2.13 has no linear_cross_entropy to compare errors with")
@pytest.mark.parametrize("call", [
    lambda x, w: (x.reshape(2, 2, 5), w, torch.zeros(2, 2, dtype=torch.int64), {}),
    lambda x, w: (x, w[:, :4], torch.zeros(4, dtype=torch.int64), {}),
    lambda x, w: (x, w, torch.zeros(4, dtype=torch.int64), dict(linear_bias=torch.zeros(5))),
    lambda x, w: (x, w, torch.rand(4, 3), dict(ignore_index=0)),
    lambda x, w: (x, w[0], torch.zeros(4, dtype=torch.int64), {}),
    lambda x, w: (x, w, torch.zeros(4, dtype=torch.int64), dict(reduction="avg")),
], ids=["input-rank", "in-features", "bias-shape", "ignore-probs", "weight-rank", "reduction"])
def test_bad_arguments_raise_torchs_errors(call, rng):
    x, w, target, kwargs = call(rand(4, 5, generator=rng), rand(3, 5, generator=rng))
    with pytest.raises(Exception) as theirs:
        F.linear_cross_entropy(x, w, target, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        fastml.functional.linear_cross_entropy(x, w, target, **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.skipif(not HAS_TWIN, reason="torch < 2.13 has no linear_cross_entropy options")
@pytest.mark.parametrize("kind, smoothing", [("index", 0.1), ("probs", 0.0)], ids=["smoothing", "probs"])
def test_options_torch_ignores_warn_as_torch(backend, kind, smoothing, rng):
    """Chunking options torch's function ignores (label smoothing, probability targets): its
    warning, and its results (fastml's kernels would take these calls silently)."""
    x, w = rand(6, 5, generator=rng, requires_grad=True), rand(3, 5, generator=rng, requires_grad=True)
    target = make_target(kind, (6,), 3, rng, "cpu", torch.float32)
    kwargs = dict(label_smoothing=smoothing, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2))
    with pytest.warns(UserWarning, match="``options`` ignored") as theirs:
        expected = F.linear_cross_entropy(x, w, target, **kwargs)
    with pytest.warns(UserWarning, match="``options`` ignored") as ours:
        got = fastml.functional.linear_cross_entropy(x, w, target, **kwargs)
    assert [str(m.message) for m in ours] == [str(m.message) for m in theirs]
    torch.testing.assert_close(got, expected)


def test_k_dimensional_loss_and_probability_target_gradient(rng):
    """What the kernels leave to torch: a (C, d1, D) weight, and a probability target that
    requires a gradient (both as the twin computes them)."""
    x = rand(4, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    w = rand(3, 2, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    target = torch.randint(0, 3, (4, 2), generator=rng)
    got = fastml.functional.linear_cross_entropy(x, w, target)
    ref = F.cross_entropy(F.linear(x, w.reshape(6, 5)).reshape(4, 3, 2), target)
    torch.testing.assert_close(got, ref)
    probs = rand(4, 3, dtype=torch.float64, generator=rng).softmax(1).requires_grad_()
    w2 = rand(3, 5, dtype=torch.float64, generator=rng)
    assert torch.autograd.gradcheck(lambda p: fastml.functional.linear_cross_entropy(x.detach(), w2, p), (probs,))


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=True, reduction="sum"), dict(bias=True, label_smoothing=0.1),
                                    dict(ignore_index=0, reduction="none"), dict(out_features=(2,), bias=True)],
                         ids=str)
def test_module_is_a_drop_in(backend, kwargs, rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ours = fastml.nn.LinearCrossEntropyLoss(6, 5, **kwargs).to(backend.device)
    target_shape = (7, *kwargs.get("out_features", ()))
    target = torch.randint(0, 5, target_shape, generator=rng).to(backend.device)
    x = rand(7, 6, device=backend.device, generator=rng)
    assert list(ours.state_dict()) == ["linear.weight"] + (["linear.bias"] if kwargs.get("bias") else [])
    if HAS_TWIN:
        twin = torch.nn.LinearCrossEntropyLoss(6, 5, **kwargs).to(backend.device)
        assert isinstance(ours, torch.nn.LinearCrossEntropyLoss) and repr(ours) == repr(twin)
        twin.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x, target), twin(x, target), rtol=1e-5, atol=1e-6)
    probs = ours.predict_proba(x)
    assert probs.shape == (7, 5, *kwargs.get("out_features", ()))
    logits = F.linear(x, ours.linear.weight, ours.linear.bias).reshape(probs.shape)
    torch.testing.assert_close(probs, logits.softmax(1))
    assert ours.predict_proba(x[0]).shape == (5, *kwargs.get("out_features", ()))


def test_softmax_regression_and_mlp_train_like_torch(backend, rng):
    """The course's softmax regression (784 → 10) and a one-hidden-layer MLP ending in
    fastml.nn.LinearCrossEntropyLoss, against nn.Linear + nn.CrossEntropyLoss from the same
    start on the same batches: the same loss curve."""
    steps, batch = (3, 16) if backend.interpreted else (25, 64)
    x = rand(steps * batch, 784, generator=rng).to(backend.device)
    y = torch.randint(0, 10, (steps * batch,), generator=rng).to(backend.device)
    for hidden in (None, 64):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
        body = torch.nn.Identity() if hidden is None else torch.nn.Sequential(torch.nn.Linear(784, hidden),
                                                                            torch.nn.ReLU())
        head = fastml.nn.LinearCrossEntropyLoss(784 if hidden is None else hidden, 10, bias=True)
        ours = torch.nn.ModuleList([body, head]).to(backend.device)
        theirs = copy.deepcopy(ours)
        def loss_at(net, fused, s):
            features, target = net[0](x[s * batch:(s + 1) * batch]), y[s * batch:(s + 1) * batch]
            return net[1](features, target) if fused else F.cross_entropy(net[1].linear(features), target)

        curves = [sgd_loss_curve(net.parameters(), lambda s: loss_at(net, fused, s), steps)
                  for net, fused in ((ours, True), (theirs, False))]
        torch.testing.assert_close(curves[0], curves[1], rtol=1e-4, atol=1e-5)


def test_before_torch_2_13_the_composite_matches_the_twin(rng, monkeypatch):
    """Without torch's linear_cross_entropy (torch < 2.13), what the kernels leave to torch runs
    fastml's own linear + cross_entropy, with the twin's results and errors."""
    x = rand(4, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    w = rand(3, 2, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    b = rand(3, 2, dtype=torch.float64, generator=rng, requires_grad=True)
    target = torch.randint(0, 3, (4, 2), generator=rng)
    twin = F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1) if HAS_TWIN else (
        F.cross_entropy(F.linear(x, w.reshape(6, 5), b.reshape(6)).reshape(4, 3, 2), target, label_smoothing=0.1))
    expected = torch.autograd.grad(twin, (x, w, b))
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    got = fastml.functional.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1)
    torch.testing.assert_close(got, twin)
    torch.testing.assert_close(torch.autograd.grad(got, (x, w, b)), expected)
    with pytest.raises(RuntimeError, match=r"expected linear_bias shape \(3, 2\), got \(6,\)"):
        fastml.functional.linear_cross_entropy(x, w, target, linear_bias=b.reshape(6))
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified when target contains probabilities"):
        fastml.functional.linear_cross_entropy(x, w, torch.rand(4, 3, 2, dtype=torch.float64), ignore_index=0)
