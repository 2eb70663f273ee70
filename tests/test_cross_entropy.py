"""fastml.functional.cross_entropy (behind fastml.nn.CrossEntropyLoss), on every backend.

Oracle: torch's own cross_entropy in float64 on upcast copies of the same inputs, over class
index and class probability targets, weights, ignore_index, label smoothing and every reduction.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (GROUPED_CLASSES, FunctionRecorder, assert_close, assert_device_side_assert, backward_and_compare,
                      loss_options, magnitude, rand, sgd_loss_curve, upcast)

import fastml

REDUCTIONS = ("mean", "sum", "none")
# input shapes: (N, C) with odd and prime sizes, one class, an empty batch, spatial (N, C, d1, d2),
# unbatched (C,); a C of 1000 spans many vectors and a partial one.
SHAPES = [(13, 7), (5, 1), (0, 4), (3, 5, 4, 2), (7,), (6, 1000)]
INTERPRETED_SHAPES = [(13, 7), (0, 4), (3, 5, 2), (7,)]
OPTIONS = [dict(), dict(weight=True), dict(label_smoothing=0.3), dict(weight=True, label_smoothing=0.15)]


def make_target(kind, shape, generator, device, dtype, ignore_index=-100):
    """Class indices (the input's shape without C; a few rows ignored) or probabilities."""
    classes = shape[1] if len(shape) > 1 else shape[0]
    if kind == "probs":
        return rand(*shape, dtype=torch.float64, generator=generator).softmax(1 if len(shape) > 1 else 0).to(
            device=device, dtype=dtype)
    index_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = torch.randint(0, classes, index_shape, generator=generator)
    if target.dim() and target.numel() > 2:
        target.view(-1)[1::3] = ignore_index
    return target.to(device)


def check(logits, target, generator, weight=None, **kwargs):
    """Loss and gradients (logits and, for probabilities that require one, target) against
    torch's cross_entropy in float64."""
    dtype = logits.dtype
    out = fastml.functional.cross_entropy(logits, target, weight=weight, **kwargs)
    ref_logits, ref_target, ref_weight = upcast(logits, target if target.is_floating_point() else None, weight)
    ref_target = target.cpu() if ref_target is None else ref_target
    ref = F.cross_entropy(ref_logits, ref_target, weight=ref_weight, **kwargs)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == logits.device
    assert_close(out, ref, dtype, scale=magnitude(ref))
    backward_and_compare(out, ref, (("logits", logits, ref_logits), ("target", target, ref_target)), generator)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch(backend, dtype, shape, kind, reduction, rng):
    if backend.interpreted and shape not in INTERPRETED_SHAPES:
        pytest.skip("the Triton interpreter takes the small shapes")
    dev = backend.device
    classes = shape[1] if len(shape) > 1 else shape[0]
    for opts in OPTIONS:
        logits = rand(*shape, dtype=dtype, device=dev, generator=rng, requires_grad=True, scale=3.0)
        target = make_target(kind, shape, rng, dev, dtype)
        check(logits, target, rng, reduction=reduction, **loss_options(opts, classes, dtype, dev, rng))


def grouped_rows_case(rows, classes, kind, dtype, device, generator, ignore_index=-100, non_finite=False):
    """Logits and targets of ``rows`` rows (23: five groups of four and three rows alone) where
    only group 2 holds an ignored row and, with ``non_finite``, group 3 a NaN logit and group 4
    a +inf and a -inf one (their losses NaN, inf or finite: reduced, the loss would be NaN)."""
    logits = rand(rows, classes, dtype=dtype, generator=generator, scale=3.0)
    if non_finite:
        logits[13, -1] = float("nan")
        logits[17, 0] = float("inf")
        logits[18, -1] = float("-inf")
    if kind == "probs":
        target = rand(rows, classes, dtype=torch.float64, generator=generator).softmax(1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,), generator=generator)
        target[9] = ignore_index
    return logits.to(device).requires_grad_(), target.to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("classes", GROUPED_CLASSES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_taken_in_groups(backend, dtype, classes, kind, reduction, rng):
    if backend.interpreted and dtype == torch.float64:
        pytest.skip("the Triton interpreter takes the float32 cases")
    for opts in OPTIONS:
        logits, target = grouped_rows_case(23, classes, kind, dtype, backend.device, rng,
                                           non_finite=reduction == "none")
        check(logits, target, rng, reduction=reduction, **loss_options(opts, classes, dtype, backend.device, rng))


@pytest.mark.parametrize("classes", GROUPED_CLASSES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_rows_result_does_not_depend_on_its_group(cpp_backend, dtype, classes, rng):
    """Each row's loss and gradient to the bit, whether the C++ kernel takes it with three
    others (8 rows: two groups) or alone (one row a call), for every kind of coefficient: a row of
    exactly one vector of classes moved by an ulp with the path until both rounded alike."""
    logits = rand(8, classes, dtype=dtype, generator=rng, scale=3.0)
    weight = (torch.rand(classes, generator=rng, dtype=torch.float64) + 0.1).to(dtype)
    index = torch.randint(0, classes, (8,), generator=rng)
    probs = rand(8, classes, dtype=torch.float64, generator=rng).softmax(1).to(dtype)
    for target, opts in ((index, {}), (index, dict(weight=weight, label_smoothing=0.2)), (probs, dict(weight=weight)),
                         (probs, dict(label_smoothing=0.1))):
        def rows(z, t):
            z = z.detach().clone().requires_grad_()
            loss = fastml.functional.cross_entropy(z, t, reduction="none", **opts)
            loss.backward(torch.ones_like(loss))
            return loss.detach(), z.grad
        together = rows(logits, target)
        alone = [rows(logits[i:i + 1], target[i:i + 1]) for i in range(8)]
        assert torch.equal(together[0], torch.cat([a[0] for a in alone]))
        assert torch.equal(together[1], torch.cat([a[1] for a in alone]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_long_float64_sum_is_exact_to_rounding(cpp_backend, reduction, threads, rng):
    """The C++ kernel sums the row losses itself: over 10^5 float64 rows, within a few ulps of the
    exact sum (math.fsum of the reference's row losses), as torch's pairwise sum is. A running
    sum, the first version, drifted by ~8e-15 relative there."""
    import math
    logits = rand(100_000, 3, dtype=torch.float64, generator=rng, scale=3.0)
    target = torch.randint(0, 3, (100_000,), generator=rng)
    rows = F.cross_entropy(logits, target, reduction="none")
    exact = math.fsum(rows.tolist()) / (len(rows) if reduction == "mean" else 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fastml.functional.cross_entropy(logits, target, reduction=reduction).item()
    finally:
        torch.set_num_threads(previous)
    assert abs(got - exact) <= 4 * math.ulp(exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_half_precision(backend, dtype, kind, rng):
    logits = rand(9, 37, dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
    check(logits, make_target(kind, (9, 37), rng, backend.device, dtype), rng, label_smoothing=0.1)


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_extreme_logits_are_stable(backend, kind, rng):
    """Huge, tiny and -inf logits: a stable log-sum-exp gives torch's finite values (and its
    inf or NaN exactly where torch has one)."""
    logits = rand(6, 33, dtype=torch.float64, generator=rng) * 1e4
    logits[1] = rand(33, dtype=torch.float64, generator=rng) * 1e-30
    logits[2, 3::4] = float("-inf")
    logits[3] = logits[3] - 1e5
    logits = logits.to(backend.device).requires_grad_()
    target = make_target(kind, (6, 33), rng, backend.device, torch.float64)
    if kind == "index":
        target = torch.tensor([0, 1, 2, 3, 4, 5], device=backend.device)  # row 2's target logit finite
        check(logits, target, rng, reduction="none")
        check(logits.detach().clone().requires_grad_(), target, rng, label_smoothing=0.2, reduction="none")
    else:
        target[2] = 1.0 / 33  # every class weighted: the -inf logits make the loss inf
        check(logits, target, rng, reduction="none")


def test_custom_ignore_index_and_all_ignored(backend, rng):
    logits = rand(8, 5, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    target = torch.tensor([0, 2, 2, 4, 2, 1, 3, 2], device=backend.device)
    check(logits, target, rng, ignore_index=2)
    check(logits.detach().clone().requires_grad_(), target, rng, ignore_index=2, label_smoothing=0.2,
          weight=torch.rand(5, dtype=torch.float64, device=backend.device, generator=None))
    every = torch.full((8,), 7, device=backend.device)
    z = logits.detach().clone().requires_grad_()
    out = fastml.functional.cross_entropy(z, every, ignore_index=7)
    assert torch.isnan(out)  # torch's 0 / 0
    out.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_ignored_rows_of_non_finite_log_sum_exp_get_torchs_nan_gradient(backend, reduction, label_smoothing, rng):
    """An ignored row's gradient is 0 times its softmax in torch: zeros, but NaN across the row
    where its log-sum-exp is not finite (a NaN logit, a +inf one, only -inf ones), which also
    reaches every weight of a linear layer before it. A -inf logit among finite ones is not."""
    nan, inf = float("nan"), float("inf")
    logits = rand(6, 5, dtype=torch.float64, generator=rng)
    logits[0, 1], logits[1, 3], logits[2] = nan, inf, -inf
    logits[3, 0] = -inf
    target = torch.tensor([-100, -100, -100, -100, 1, 4])
    ours = logits.clone().to(backend.device).requires_grad_()
    fastml.functional.cross_entropy(ours, target.to(backend.device), reduction=reduction,
                                    label_smoothing=label_smoothing).sum().backward()
    theirs = logits.clone().requires_grad_()
    F.cross_entropy(theirs, target, reduction=reduction, label_smoothing=label_smoothing).sum().backward()
    assert theirs.grad[:3].isnan().all() and not theirs.grad[3:].isnan().any()  # what torch does
    torch.testing.assert_close(ours.grad.cpu(), theirs.grad, equal_nan=True)

    x = rand(6, 4, dtype=torch.float64, generator=rng)
    x[0, 2] = nan  # an ignored row's input
    weight = rand(5, 4, dtype=torch.float64, generator=rng)
    grads = []
    for fn, dev in ((fastml.functional.linear_cross_entropy, backend.device), (None, "cpu")):
        xs, ws = x.clone().to(dev).requires_grad_(), weight.clone().to(dev).requires_grad_()
        loss = (fn(xs, ws, target.to(dev), reduction=reduction, label_smoothing=label_smoothing) if fn else
                F.cross_entropy(xs @ ws.T, target, reduction=reduction, label_smoothing=label_smoothing))
        loss.sum().backward()
        grads.append((xs.grad.cpu(), ws.grad.cpu()))
    assert grads[1][1].isnan().all()  # torch's: the NaN row reaches every weight
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, equal_nan=True)


def test_empty_batch(backend):
    z = torch.zeros(0, 4, device=backend.device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.int64, device=backend.device)
    assert torch.isnan(fastml.functional.cross_entropy(z, t))
    assert fastml.functional.cross_entropy(z, t, reduction="sum").item() == 0.0
    assert fastml.functional.cross_entropy(z, t, reduction="none").shape == (0,)
    fastml.functional.cross_entropy(z, t, reduction="sum").backward()
    assert z.grad.shape == (0, 4)


def test_non_contiguous_inputs(backend, rng):
    logits = rand(40, 11, dtype=torch.float64, device=backend.device, generator=rng)[::2].t().t().requires_grad_()
    spatial = rand(3, 4, 6, 5, dtype=torch.float64, device=backend.device, generator=rng).permute(0, 3, 1, 2)
    check(logits, make_target("index", (20, 11), rng, backend.device, torch.float64), rng)
    probs = rand(20, 22, dtype=torch.float64, device=backend.device, generator=rng).softmax(1)[:, ::2]
    check(logits.detach().clone().requires_grad_(), probs, rng, reduction="sum")
    check(spatial.requires_grad_(), make_target("index", (3, 5, 4, 6), rng, backend.device, torch.float64), rng)


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_gradcheck(backend, kind, rng):
    target = make_target(kind, (5, 4), rng, backend.device, torch.float64)
    weight = torch.rand(4, dtype=torch.float64, generator=rng).to(backend.device) + 0.5
    for reduction in REDUCTIONS:
        z = rand(5, 4, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
        fn = lambda z: fastml.functional.cross_entropy(z, target, weight=weight, reduction=reduction,  # noqa: E731
                                                       label_smoothing=0.1)
        assert torch.autograd.gradcheck(fn, (z,))
        if not backend.interpreted:
            assert torch.autograd.gradgradcheck(fn, (z,))


def test_probability_target_gradient(backend, rng):
    """A probability target that requires grad gets torch's gradient, -(1 - ε) w log softmax."""
    logits = rand(6, 5, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    probs = make_target("probs", (6, 5), rng, backend.device, torch.float64).requires_grad_()
    check(logits, probs, rng, label_smoothing=0.2, weight=torch.rand(5, dtype=torch.float64).to(backend.device))
    fn = lambda z, p: fastml.functional.cross_entropy(z, p, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits.detach().requires_grad_(), probs.detach().requires_grad_()))


def test_no_grad_and_inference_mode(backend, rng):
    logits = rand(7, 6, device=backend.device, generator=rng)
    target = make_target("index", (7, 6), rng, backend.device, torch.float32)
    expected = F.cross_entropy(logits, target)
    with torch.no_grad():
        assert_close(fastml.functional.cross_entropy(logits, target), expected.double(), torch.float32)
    with torch.inference_mode():
        assert_close(fastml.functional.cross_entropy(logits, target), expected.double(), torch.float32)


_DEVICE_ASSERT_SCRIPT = """
import sys, torch, fastml
with fastml.use_backend("triton"):
    logits = torch.randn(4, 5, device="cuda", requires_grad=True)
    fastml.functional.cross_entropy(logits, torch.tensor([0, int(sys.argv[1]), 2, 7], device="cuda"))
    torch.cuda.synchronize()
"""


@pytest.mark.parametrize("bad", [5, -1, -101])
def test_out_of_range_target_is_torchs_index_error(backend, bad, rng):
    if backend.name == "triton" and backend.device.type == "cuda":
        # On the GPU, torch's CUDA loss fails a device-side assertion, and so does fastml's (the
        # host never waits to check): in a child process, since it poisons the CUDA context.
        assert_device_side_assert(_DEVICE_ASSERT_SCRIPT, str(bad))
        return
    logits = rand(4, 5, device=backend.device, generator=rng, requires_grad=True)
    target = torch.tensor([0, bad, 2, 7], device=backend.device)  # the first bad one is reported
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        fastml.functional.cross_entropy(logits, target)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        fastml.functional.cross_entropy(logits.detach(), target, reduction="none")


@pytest.mark.parametrize("weighted", [False, True])
def test_device_target_total_is_the_reference_divisor(weighted, rng):
    """The triton backend's divisor on the GPU (kept there, checked by a device-side assertion)
    equals the reference's float: ignored rows left out, weights summed, 0 when all are ignored."""
    pytest.importorskip("triton")
    from fastml.ops.cross_entropy import reference, triton_impl

    weight = rand(7, dtype=torch.float32, generator=rng).abs() if weighted else None
    for target in (torch.tensor([0, 3, -100, 6, 3, 1]), torch.tensor([2, 2, 2]), torch.tensor([-100, -100]),
                   torch.tensor([4, 9, 4], dtype=torch.int64)):
        total = triton_impl.device_target_total(target, weight, 9 if 9 in target else -100, 7)
        assert total.dim() == 0 and total.dtype == torch.float64
        expected = reference.target_total(target, weight, 9 if 9 in target else -100, 7)
        assert float(total) == pytest.approx(expected, rel=1e-15, abs=0)


def test_a_divisor_kept_on_the_device_scales_like_a_float(rng):
    """rows() with a 0-dim tensor scale (the GPU's "mean") gives the float scale's results."""
    pytest.importorskip("triton")
    from fastml.ops.cross_entropy import triton_impl

    logits = rand(9, 37, generator=rng)
    target = torch.randint(0, 37, (9,), generator=rng)
    target[4] = -100
    results = []
    for scale in (0.125, torch.tensor(0.125, dtype=torch.float64)):
        row_loss, grad = torch.empty(9), torch.empty_like(logits)
        with fastml.use_backend("triton"):
            triton_impl.rows(logits, target, None, -100, 0.1, scale, row_loss, grad)
        results.append((row_loss, grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("call", [
    lambda z: (z, torch.zeros(3, dtype=torch.int64)),                        # batch mismatch
    lambda z: (z, torch.zeros(4, 6)),                                         # probability shape
    lambda z: (z, torch.zeros(4, dtype=torch.int32)),                         # target dtype
    lambda z: (z, torch.zeros(4, dtype=torch.int64), dict(weight=torch.ones(3))),
    lambda z: (z, torch.zeros(4, dtype=torch.int64), dict(label_smoothing=1.5)),
    lambda z: (z, torch.zeros(4, dtype=torch.int64), dict(reduction="avg")),
    lambda z: (z, torch.rand(4, 5), dict(ignore_index=1)),
    lambda z: (z, [0, 1, 2, 3]),
    lambda z: (z, torch.zeros(4, dtype=torch.int64), dict(weight=[1.0] * 5)),
], ids=["batch", "probs-shape", "int32", "weight-shape", "smoothing", "reduction", "ignore-probs", "list-target",
        "list-weight"])
def test_bad_arguments_raise_torchs_errors(call, rng):
    z = rand(4, 5, generator=rng, requires_grad=True)
    args = call(z)
    kwargs = args[2] if len(args) > 2 else {}
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(args[0], args[1], **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        fastml.functional.cross_entropy(args[0], args[1], **kwargs)
    assert str(ours.value) == str(theirs.value)
    if "weight" not in kwargs:  # the module too (its route has no signature for a target that is not a tensor)
        with pytest.raises(type(theirs.value)) as ours:
            fastml.nn.CrossEntropyLoss(**kwargs)(args[0], args[1])
        assert str(ours.value) == str(theirs.value)


def test_legacy_size_average_and_reduce(rng):
    z, t = rand(5, 3, generator=rng), torch.tensor([0, 1, 2, 1, 0])
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        with pytest.warns(UserWarning):
            ours = fastml.functional.cross_entropy(z, t, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            theirs = F.cross_entropy(z, t, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="none", ignore_index=1), dict(label_smoothing=0.2),
                                    dict(weight=torch.tensor([0.2, 1.0, 3.0]), reduction="sum")], ids=str)
def test_module_is_a_drop_in(backend, kwargs, rng):
    ours, theirs = fastml.nn.CrossEntropyLoss(**kwargs), torch.nn.CrossEntropyLoss(**kwargs)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert repr(ours) == repr(theirs) and ours.state_dict().keys() == theirs.state_dict().keys()
    z = rand(9, 3, device=backend.device, generator=rng, requires_grad=True)
    t = make_target("index", (9, 3), rng, backend.device, torch.float32, kwargs.get("ignore_index", -100))
    ours, theirs = ours.to(backend.device), theirs.to(backend.device, torch.float64)
    assert_close(ours(z, t), theirs(z.double(), t).detach(), torch.float32, scale=10)


def test_softmax_regression_and_mlp_train_like_torch(backend, rng):
    """The course's softmax regression (784 → 10) and a one-hidden-layer MLP, trained with
    fastml's loss and torch's, from the same start on the same batches: the same loss curve."""
    steps, batch = (3, 16) if backend.interpreted else (25, 64)
    x = rand(steps * batch, 784, generator=rng).to(backend.device)
    y = torch.randint(0, 10, (steps * batch,), generator=rng).to(backend.device)
    for hidden in (None, 64):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
        layers = [torch.nn.Linear(784, 10)] if hidden is None else [
            torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)]
        model = torch.nn.Sequential(torch.nn.Flatten(), *layers).to(backend.device)
        twin = copy.deepcopy(model)
        curves = [sgd_loss_curve(net.parameters(),
                                 lambda s: loss_fn(net(x[s * batch:(s + 1) * batch]), y[s * batch:(s + 1) * batch]),
                                 steps)
                  for net, loss_fn in ((model, fastml.nn.CrossEntropyLoss()), (twin, torch.nn.CrossEntropyLoss()))]
        torch.testing.assert_close(curves[0], curves[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["index", "probs", "weighted", "smoothed", "ignored", "spatial"])
def test_torch_twin_is_torchs_cross_entropy_bit_for_bit(case, reduction):
    """functional.torch_cross_entropy, the torch side of nn.CrossEntropyLoss's route: the same
    values and gradients (first and second order) as F.cross_entropy, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    shape = (3, 5, 2, 3) if case == "spatial" else (6, 5)
    logits = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    index_shape = (shape[0], *shape[2:])
    if case == "probs":
        target = torch.softmax(torch.randn(*shape, dtype=torch.float64, generator=gen), 1)
    else:
        target = torch.randint(0, 5, index_shape, generator=gen)
        if case == "ignored":
            target[0] = 2
    weight = torch.rand(5, dtype=torch.float64, generator=gen) if case == "weighted" else None
    options = dict(ignore_index=2 if case == "ignored" else -100, reduction=reduction,
                   label_smoothing=0.1 if case == "smoothed" else 0.0)
    twin = logits.detach().clone().requires_grad_()
    out = fastml.functional.torch_cross_entropy(logits, target, weight, **options)
    ref = F.cross_entropy(twin, target, weight, **options)
    assert torch.equal(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), logits, create_graph=True)
    (ref_grad,) = torch.autograd.grad(ref.sum(), twin, create_graph=True)
    assert torch.equal(grad, ref_grad)
    assert torch.equal(torch.autograd.grad((grad ** 2).sum(), logits)[0],
                       torch.autograd.grad((ref_grad ** 2).sum(), twin)[0])


def test_torch_twin_lets_function_modes_see_torchs_function():
    with FunctionRecorder() as mode:
        fastml.functional.torch_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), None, -100, "mean", 0.0)
    assert F.cross_entropy in mode.seen
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        fastml.functional.torch_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), None, -100, "avg", 0.0)
