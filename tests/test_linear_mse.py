"""fastml.functional.linear_mse: the fused linear + squared loss, on every backend.

Oracle: torch's own mse_loss(linear(...)) in float64 on upcast copies of the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, magnitude, rand, upcast

import fastml
from fastml.functional import DeviceError, DTypeError, ShapeError

REDUCTIONS = ("mean", "sum", "none")
# (leading dims, D, O): odd and prime sizes, a single row, an empty batch, leading batch dims.
SHAPES = [((1,), 1, 1), ((7,), 3, 1), ((37,), 13, 5), ((131,), 67, 17), ((0,), 5, 3), ((2, 3), 11, 2), ((), 4, 3)]
INTERPRETED_SHAPES = [((7,), 3, 1), ((37,), 13, 5), ((0,), 5, 3), ((2, 3), 11, 2)]


def oracle(x, w, b, y, reduction):
    return F.mse_loss(F.linear(x, w, b), y, reduction=reduction)


def make_problem(lead, d, o, dtype, device, generator, bias=True, requires_grad=(True, True, True, True)):
    x = rand(*lead, d, dtype=dtype, device=device, generator=generator, requires_grad=requires_grad[0])
    w = rand(o, d, dtype=dtype, device=device, generator=generator, requires_grad=requires_grad[1])
    b = rand(o, dtype=dtype, device=device, generator=generator, requires_grad=requires_grad[2]) if bias else None
    y = rand(*lead, o, dtype=dtype, device=device, generator=generator, requires_grad=requires_grad[3])
    return x, w, b, y


def check_against_oracle(x, w, b, y, reduction, generator):
    """Loss and every requested gradient of fastml vs the float64 oracle."""
    dtype = x.dtype
    loss = fastml.functional.linear_mse(x, w, b, y, reduction=reduction)
    ref_args = upcast(x, w, b, y)
    ref = oracle(*ref_args, reduction)
    assert loss.shape == ref.shape and loss.dtype == dtype and loss.device == x.device
    assert_close(loss, ref, dtype, scale=magnitude(ref))

    upstream = rand(*loss.shape, dtype=dtype, device=x.device, generator=generator)
    if not any(t is not None and t.requires_grad for t in (x, w, b, y)):
        return
    loss.backward(upstream)
    ref.backward(upstream.detach().to("cpu", torch.float64))
    for name, t, r in zip("xwby", (x, w, b, y), ref_args):
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.shape == t.shape and t.grad.dtype == dtype
        assert_close(t.grad, r.grad, dtype, scale=magnitude(r.grad))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64_reference(backend, dtype, shape, bias, reduction, rng):
    lead, d, o = shape
    if backend.interpreted and shape not in INTERPRETED_SHAPES:
        pytest.skip("kept small under the Triton interpreter")
    check_against_oracle(*make_problem(lead, d, o, dtype, backend.device, rng, bias=bias), reduction, rng)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision(backend, dtype, reduction, rng):
    """Half types run on Triton (float32 accumulation); other backends take the reference path."""
    check_against_oracle(*make_problem((29,), 19, 3, dtype, backend.device, rng), reduction, rng)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, reduction, rng):
    x, w, b, y = make_problem((6,), 5, 3, torch.float64, backend.device, rng)
    assert torch.autograd.gradcheck(lambda *a: fastml.functional.linear_mse(*a, reduction=reduction), (x, w, b, y),
                                    fast_mode=backend.interpreted)


@pytest.mark.parametrize("requires_grad", [(False, True, True, False), (True, False, False, False),
                                           (False, False, False, True), (False, True, False, False),
                                           (False, False, True, False), (False, False, False, False)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_only_requested_gradients(backend, requires_grad, reduction, rng):
    """Each gradient is computed when (and only when) its argument requires it."""
    x, w, b, y = make_problem((23,), 7, 3, torch.float32, backend.device, rng, requires_grad=requires_grad)
    check_against_oracle(x, w, b, y, reduction, rng)
    for t, wanted in zip((x, w, b, y), requires_grad):
        assert (t.grad is not None) == wanted


def test_non_contiguous_inputs(backend, rng):
    dev = backend.device
    x = rand(13, 24, device=dev, generator=rng)[:, ::2].requires_grad_()  # stride 2 along features
    w = rand(12, 5, device=dev, generator=rng).t().requires_grad_()  # (5, 12) transposed
    b = rand(10, device=dev, generator=rng)[::2].requires_grad_()
    y = rand(5, 13, device=dev, generator=rng).t().requires_grad_()
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous() or y.is_contiguous())
    for reduction in REDUCTIONS:
        for t in (x, w, b, y):
            t.grad = None
        check_against_oracle(x, w, b, y, reduction, rng)


def test_no_grad_and_inference_mode(backend, rng):
    x, w, b, y = make_problem((17,), 6, 2, torch.float32, backend.device, rng)
    expected = oracle(*upcast(x, w, b, y), "mean")
    with torch.no_grad():
        loss = fastml.functional.linear_mse(x, w, b, y)
    assert not loss.requires_grad
    assert_close(loss, expected)
    with torch.inference_mode():
        assert_close(fastml.functional.linear_mse(x, w, b, y), expected)


def test_empty_batch_mean_is_nan_with_zero_gradients(backend):
    dev = backend.device
    x = torch.empty(0, 4, device=dev, requires_grad=True)
    w = torch.randn(3, 4, device=dev, requires_grad=True)
    b = torch.randn(3, device=dev, requires_grad=True)
    y = torch.empty(0, 3, device=dev)
    loss = fastml.functional.linear_mse(x, w, b, y)
    assert math.isnan(loss.item())  # torch's mean over no elements
    loss.backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert x.grad.shape == (0, 4)
    assert fastml.functional.linear_mse(x, w, b, y, reduction="sum").item() == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_and_inf_propagate_like_torch(backend, reduction, rng):
    x, w, b, y = make_problem((9,), 5, 2, torch.float32, backend.device, rng)
    with torch.no_grad():
        x[2, 3] = float("nan")
        y[5, 1] = float("inf")
    got = fastml.functional.linear_mse(x, w, b, y, reduction=reduction).detach().cpu()
    want = oracle(*upcast(x, w, b, y), reduction).detach().float()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    loss = fastml.functional.linear_mse(x, w, b, y, reduction="sum")
    loss.backward()
    assert torch.isnan(w.grad).any()  # NaN in the input poisons the weight gradient, as in torch


def test_many_outputs_splits_work_without_materialising(backend, rng):
    """A wide layer: per-thread (O × D) gradient copies would pass 32 MB, so the C++ kernel splits
    the outputs between threads instead; every backend agrees with the oracle."""
    if backend.interpreted:
        pytest.skip("too large for the Triton interpreter")
    x, w, b, y = make_problem((9,), 2100, 2100, torch.float32, backend.device, rng)
    check_against_oracle(x, w, b, y, "mean", rng)


def test_large_batch_float32_accuracy(backend, rng):
    """Sums over tens of thousands of rows stay within float32 tolerance of float64."""
    if backend.interpreted:
        pytest.skip("too large for the Triton interpreter")
    x, w, b, y = make_problem((40_000,), 33, 2, torch.float32, backend.device, rng)
    check_against_oracle(x, w, b, y, "mean", rng)


@pytest.mark.parametrize("larger_than_l2", [True, False])
@pytest.mark.parametrize("outputs", [1, 3])
def test_the_cpp_kernels_way_is_chosen_out_of_cache_and_prefetch_moves_no_bits(cpp_backend, monkeypatch, rng,
                                                                               larger_than_l2, outputs):
    """How the C++ kernel reads x (row blocks, with or without a software prefetch of the next;
    for a lone output, one streaming pass, with or without a steady prefetch) is a measured choice
    where x is larger than the L2 (csrc/linear_mse.cpp says why), and untimed within it. A
    prefetch changes which loads the CPU asks for early, nothing of the arithmetic: the same bits."""
    from fastml import _tune
    from fastml.ops.linear_mse import cpp_impl

    x, w, b, y = (t.detach() for t in make_problem((301,), 67, outputs, torch.float32, cpp_backend.device, rng))
    monkeypatch.setattr(cpp_impl, "l2_bytes", lambda: x.numel() * x.element_size() - 1 if larger_than_l2
                        else x.numel() * x.element_size())
    with _tune.recording() as seen:
        chosen = cpp_impl.forward(x, w, b, y, "mean", True, True, True)
    assert [k[0] for k, _ in seen] == (["linear_mse way"] if larger_than_l2 else [])
    way = seen[0][1].choice if larger_than_l2 else "stream" if outputs == 1 else "reference"
    for got, want in zip(chosen, cpp_impl._forward(x, w, b, y, "mean", True, True, True, way)):
        assert torch.equal(got, want)
    pairs = [("reference", "prefetch")] + ([("stream", "stream prefetch")] if outputs == 1 else [])
    for plain, prefetching in pairs:
        for reduction in ("mean", "none"):
            outputs_plain = cpp_impl._forward(x, w, b, y, reduction, True, True, True, plain)
            outputs_prefetching = cpp_impl._forward(x, w, b, y, reduction, True, True, True, prefetching)
            for got, want in zip(outputs_prefetching, outputs_plain):
                assert (got is None) == (want is None) and (got is None or torch.equal(got, want))


@pytest.mark.parametrize("way", ["reference", "prefetch", "stream", "stream prefetch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n, d", [(0, 5), (4, 0), (1, 1), (3, 13), (7, 16), (37, 29), (129, 13), (261, 33), (301, 67),
                                  (1031, 256)], ids=str)
def test_each_way_of_the_cpp_kernel_matches_float64(cpp_backend, rng, way, dtype, n, d):
    """Every way of reading x, forced, against float64 on odd sizes: rows not a multiple of the
    four a group reads or of a gradient block's 64, rows shorter than a vector, vectors and a
    masked tail, no features at all; loss, residual and both gradients, with and without a bias,
    each reduction."""
    from fastml.ops.linear_mse import cpp_impl

    for bias in (True, False):
        x, w, b, y = (t if t is None else t.detach()
                      for t in make_problem((n,), d, 1, dtype, cpp_backend.device, rng, bias=bias))
        x64, w64, y64 = upcast(x, w, y)
        b64 = None if b is None else upcast(b)[0]
        residual = F.linear(x64, w64, b64) - y64
        for reduction, scale in (("mean", 1 / max(n, 1)), ("sum", 1.0), ("none", None)):
            loss, kept, grad_w, grad_b = cpp_impl._forward(x, w, b, y, reduction, True, bias, True, way)
            assert_close(kept, residual, dtype, scale=magnitude(residual))
            if reduction == "none":
                assert_close(loss, residual**2, dtype, scale=magnitude(residual**2))
                assert grad_w is None and grad_b is None
                continue
            want_loss = F.mse_loss(F.linear(x64, w64, b64), y64, reduction=reduction)  # mean of none: NaN
            assert_close(loss, want_loss, dtype, scale=magnitude(residual**2))
            want_w = 2 * scale * residual.t() @ x64
            assert_close(grad_w, want_w, dtype, scale=magnitude(want_w))
            assert (grad_b is None) == (not bias)
            if bias:
                want_b = 2 * scale * residual.sum(0)
                # The rounding of a sum follows its terms, not its result: 1031 float32 residuals of up
                # to 60 whose sum cancelled to 0.46 came out 1.6e-4 off, as torch's own float32 sum did.
                assert_close(grad_b, want_b, dtype, scale=magnitude(2 * scale * residual))


@pytest.mark.parametrize("way", ["reference", "prefetch", "stream", "stream prefetch"])
def test_each_way_of_the_cpp_kernel_propagates_nan_and_inf_like_torch(cpp_backend, rng, way):
    """A NaN in x (in a masked tail's column, a row of a four-row group and a lone last row) and an
    Inf in the target reach the residual, the loss and the gradients as torch's ops carry them."""
    from fastml.ops.linear_mse import cpp_impl

    x, w, b, y = (t.detach() for t in make_problem((9,), 21, 1, torch.float32, cpp_backend.device, rng))
    x[2, 19] = float("nan")
    x[8, 4] = float("nan")
    y[5, 0] = float("inf")
    x64, w64, b64, y64 = upcast(x, w, b, y)
    residual = F.linear(x64, w64, b64) - y64
    for reduction in ("none", "sum"):
        loss, kept, grad_w, grad_b = cpp_impl._forward(x, w, b, y, reduction, True, True, True, way)
        want_loss = F.mse_loss(F.linear(x64, w64, b64), y64, reduction=reduction)
        wants = [(loss, want_loss), (kept, residual)]
        if reduction == "sum":
            wants += [(grad_w, 2 * residual.t() @ x64), (grad_b, 2 * residual.sum(0))]
        for got, want in wants:
            assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.parametrize("bias_shape", [(1,), (), (7, 1)])
def test_bias_that_broadcasts_is_taken_as_linear_takes_it(backend, bias_shape, rng):
    """A bias that broadcasts to the prediction (F.linear takes it): torch's loss and gradients,
    on every backend (the kernels take an (O,) bias; the others run torch's ops)."""
    x, w, _, y = make_problem((7,), 5, 3, torch.float64, backend.device, rng)
    b = rand(*bias_shape, dtype=torch.float64, device=backend.device, generator=rng).requires_grad_()
    loss = fastml.functional.linear_mse(x, w, b, y)
    twins = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref = F.mse_loss(F.linear(*twins), y)
    assert_close(loss, ref, scale=magnitude(ref))
    loss.backward()
    ref.backward()
    for ours, theirs in zip((x, w, b), twins):
        assert_close(ours.grad, theirs.grad, scale=magnitude(theirs.grad))


class TestBadInput:
    def args(self, **over):
        a = dict(input=torch.randn(5, 3), weight=torch.randn(2, 3), bias=torch.randn(2), target=torch.randn(5, 2))
        a.update(over)
        return a

    def call(self, **over):
        return fastml.functional.linear_mse(**self.args(**over))

    def test_weight_of_wrong_rank(self):
        with pytest.raises(ShapeError, match="weight must be 2-D"):
            self.call(weight=torch.randn(3))
        with pytest.raises(ShapeError, match="weight must be 2-D"):
            self.call(weight=torch.randn(1, 2, 3))

    def test_feature_mismatch(self):
        with pytest.raises(ShapeError, match=r"input has 4 features.*in_features=3"):
            self.call(input=torch.randn(5, 4))

    def test_target_shape(self):
        with pytest.raises(ShapeError, match=r"target must have the prediction's shape \(5, 2\)"):
            self.call(target=torch.randn(5))
        with pytest.raises(ShapeError, match="target"):
            self.call(target=torch.randn(5, 1))

    def test_bias_shape(self):
        with pytest.raises(ShapeError, match="bias must have shape"):
            self.call(bias=torch.randn(3))
        with pytest.raises(ShapeError, match="bias must have shape"):
            self.call(bias=torch.randn(2, 2))  # (F.linear refuses it too: it does not broadcast)

    def test_dtype_mismatch_names_argument(self):
        with pytest.raises(DTypeError, match="target has dtype torch.float64"):
            self.call(target=torch.randn(5, 2, dtype=torch.float64))
        with pytest.raises(DTypeError, match="weight has dtype"):
            self.call(weight=torch.randn(2, 3, dtype=torch.float64))
        with pytest.raises(DTypeError, match="input must be a floating-point"):
            self.call(input=torch.ones(5, 3, dtype=torch.int64), weight=torch.ones(2, 3, dtype=torch.int64),
                      bias=None, target=torch.ones(5, 2, dtype=torch.int64))

    def test_device_mismatch_names_argument(self):
        with pytest.raises(DeviceError, match="bias is on meta"):
            self.call(bias=torch.randn(2, device="meta"))

    def test_errors_are_runtime_errors_too(self):
        """Code written against torch's RuntimeError still catches fastml's errors."""
        with pytest.raises(RuntimeError):
            self.call(input=torch.randn(5, 4))
        with pytest.raises(RuntimeError):
            self.call(target=torch.randn(5, 2, dtype=torch.float64))

    def test_bad_reduction(self):
        with pytest.raises(ValueError, match="'avg' is not a valid value for reduction"):
            self.call(reduction="avg")

    def test_not_tensors(self):
        with pytest.raises(TypeError, match="input must be a Tensor"):
            self.call(input=[[1.0, 2.0, 3.0]])
        with pytest.raises(TypeError, match="bias must be a Tensor or None"):
            self.call(bias=1.0)
        with pytest.raises(ShapeError, match="input must have at least 1 dimension"):
            self.call(input=torch.tensor(1.0))


def test_course_experiment_from_scratch(backend, rng):
    """The course's from-scratch loop on fastml.functional.linear_mse with its hand-written sgd:
    w = [2, -3.4], b = 4.2, 1000 examples, lr 0.03, batch 10, 3 epochs → loss near 5e-5."""
    if backend.interpreted:
        pytest.skip("300 steps through the Triton interpreter: covered by LinearRegression's test")
    true_w = torch.tensor([2.0, -3.4])
    X, y = fastml.data.synthetic_linear(true_w, 4.2, 1000, generator=rng)
    w = torch.normal(0, 0.01, size=(1, 2), generator=rng).requires_grad_()
    b = torch.zeros(1, requires_grad=True)
    for _ in range(3):
        for xb, yb in fastml.data.batches(X, y, batch_size=10, generator=rng):
            loss = fastml.functional.linear_mse(xb, w, b, yb, reduction="sum") / 2  # sum of (ŷ - y)² / 2
            loss.backward()
            with torch.no_grad():
                for p in (w, b):
                    p -= 0.03 * p.grad / 10
                    p.grad.zero_()
    with torch.no_grad():
        final = fastml.functional.linear_mse(X, w, b, y).item() / 2
    assert 2.5e-5 < final < 1e-4
    assert (w.detach().reshape(-1) - true_w).abs().max() < 1e-2
    assert abs(b.item() - 4.2) < 1e-2


@pytest.mark.interpreter_slow  # the second derivatives are torch ops on every backend: 5 s a case there
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward(backend, reduction, rng):
    """Second derivatives (create_graph=True), as torch's mse_loss(linear(...)) has them."""
    x, w, b, y = make_problem((5,), 4, 3, torch.float64, backend.device, rng)
    assert torch.autograd.gradgradcheck(lambda *a: fastml.functional.linear_mse(*a, reduction=reduction),
                                        (x, w, b, y))


def test_sparse_input_follows_torch(rng):
    dense = rand(6, 5, generator=rng) * (torch.rand(6, 5, generator=rng) > 0.5)
    w, b, y = rand(2, 5, generator=rng), rand(2, generator=rng), rand(6, 2, generator=rng)
    got = fastml.functional.linear_mse(dense.to_sparse(), w, b, y)
    torch.testing.assert_close(got, oracle(dense, w, b, y, "mean"))


def test_tensor_subclasses_get_the_strict_shape_check_too():
    """A tensor subclass (its own __torch_function__) runs torch's ops, which would broadcast a
    (N,) target against the (N, 1) prediction: the shape check comes first for it as well."""
    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    x, w, y = torch.randn(5, 3), torch.randn(1, 3), torch.randn(5)
    with pytest.raises(ShapeError, match=r"target must have the prediction's shape \(5, 1\)"):
        fastml.functional.linear_mse(x.as_subclass(Logged), w, None, y)
    expected = F.mse_loss(x @ w.T, y[:, None])
    ours = fastml.functional.linear_mse(x.as_subclass(Logged), w, None, y[:, None])
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), expected)
