"""fastml.linear_model.LinearRegression: the course's experiment on every backend, the closed
form against numpy, scikit-learn's interface (shapes, kinds, R², errors)."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch

import fastml
from fastml.data import synthetic_linear
from fastml.linear_model import InvalidArgumentError, LinearRegression, NotFittedError

TRUE_W, TRUE_B = [2.0, -3.4], 4.2


def seed_from(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (), generator=rng))


def course_data(rng, device="cpu", dtype=torch.float32, n=1000):
    X, y = synthetic_linear(torch.tensor(TRUE_W, dtype=dtype), TRUE_B, n, noise_std=0.01, generator=rng)
    return X.to(device), y.to(device)


def problem(rng, n=60, d=4, k=None, noise=0.1, dtype=torch.float64):
    """Random X (n, d), y (n,) or (n, k) from a random linear model plus noise, as numpy."""
    X = torch.randn(n, d, generator=rng, dtype=dtype)
    W = torch.randn(k or 1, d, generator=rng, dtype=dtype)
    b = torch.randn(k or 1, generator=rng, dtype=dtype)
    Y = X @ W.T + b + noise * torch.randn(n, k or 1, generator=rng, dtype=dtype)
    return X.numpy(), (Y[:, 0] if k is None else Y).numpy()


def sgd_oracle(X, Y, lr, batch_size, epochs, fit_intercept, seed):
    """The course's loop with autograd, in float64, drawing the initial weights and every epoch's
    order from a generator seeded as ``LinearRegression(random_state=seed)`` draws them."""
    gen = torch.Generator().manual_seed(seed)
    n, d = X.shape
    w = torch.normal(0.0, 0.01, (Y.shape[1], d), generator=gen, dtype=X.dtype).double().requires_grad_()
    b = torch.zeros(Y.shape[1], dtype=torch.float64, requires_grad=fit_intercept)
    X, Y = X.double(), Y.double()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            pred = X[idx] @ w.T + (b if fit_intercept else 0)
            ((pred - Y[idx]) ** 2 / 2).sum().backward()
            with torch.no_grad():
                for p in (w, b) if fit_intercept else (w,):
                    p -= lr * p.grad / batch_size
                    p.grad.zero_()
    return w.detach(), b.detach()


# -- the course's experiment, on every backend --------------------------------------------------

# Its Triton cases (seconds each on the interpreter) repeat what the kernels' own tests run: long there.
@pytest.mark.interpreter_long()
def test_course_experiment(backend, rng):
    X, y = course_data(rng, backend.device)
    model = LinearRegression(solver="sgd", lr=0.03, batch_size=10, epochs=3, generator=rng)
    assert model.fit(X, y) is model
    history = model.loss_history_
    assert isinstance(history, list) and len(history) == 3 and all(isinstance(v, float) for v in history)
    assert 2.5e-5 <= history[-1] <= 1e-4, history
    assert history[0] > history[-1]
    assert isinstance(model.coef_, torch.Tensor) and model.coef_.device == X.device
    assert model.coef_.shape == (1, 2) and model.intercept_.shape == (1,)  # y is (n, 1)
    w_err = (model.coef_[0].cpu() - torch.tensor(TRUE_W)).abs().max().item()
    b_err = abs(model.intercept_.item() - TRUE_B)
    assert w_err < 1e-2 and b_err < 1e-2, (w_err, b_err)
    # the recorded loss is the course's: mean of (ŷ − y)² / 2 over the data
    with torch.no_grad():
        course_loss = ((model.predict(X) - y) ** 2 / 2).mean().item()
    assert history[-1] == pytest.approx(course_loss, rel=1e-3)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_is_the_courses_update(backend, dtype, fit_intercept, rng):
    """Odd sizes, several targets and a short last minibatch (37 = 7·5 + 2, still divided by 5):
    every backend's epoch kernel follows the course's loop step for step."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype} kernel")
    X = torch.randn(37, 3, generator=rng, dtype=dtype)
    Y = torch.randn(37, 2, generator=rng, dtype=dtype)
    seed = seed_from(rng)
    model = LinearRegression(lr=0.05, batch_size=5, epochs=2, fit_intercept=fit_intercept, random_state=seed)
    model.fit(X.to(backend.device), Y.to(backend.device))
    w, b = sgd_oracle(X, Y, 0.05, 5, 2, fit_intercept, seed)
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(model.coef_.cpu().double(), w, **tol)
    torch.testing.assert_close(model.intercept_.cpu().double(), b, **tol)
    assert model.coef_.dtype == dtype and model.coef_.device.type == backend.device.type


def test_course_experiment_numpy_1d_y_on_the_default_backend(rng):
    X, y = course_data(rng)
    model = LinearRegression(solver="sgd", random_state=seed_from(rng)).fit(X.numpy(), y.numpy()[:, 0])
    assert isinstance(model.coef_, np.ndarray) and model.coef_.shape == (2,)
    assert isinstance(model.intercept_, float)
    np.testing.assert_allclose(model.coef_, TRUE_W, atol=1e-2)
    assert model.intercept_ == pytest.approx(TRUE_B, abs=1e-2)
    assert 2.5e-5 <= model.loss_history_[-1] <= 1e-4


def test_sgd_two_targets_and_no_intercept(rng):
    X = torch.randn(1000, 3, generator=rng)
    W = torch.randn(2, 3, generator=rng)
    Y = X @ W.T + 0.01 * torch.randn(1000, 2, generator=rng)
    model = LinearRegression(fit_intercept=False, epochs=5, generator=rng).fit(X, Y)
    assert model.coef_.shape == (2, 3)
    assert torch.equal(model.intercept_, torch.zeros(2))
    torch.testing.assert_close(model.coef_, W, atol=1e-2, rtol=0)
    assert model.predict(X).shape == (1000, 2)


# -- the closed form ----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_lstsq_matches_numpy(fit_intercept, k, rng):
    X, y = problem(rng, n=53, d=5, k=k)
    model = LinearRegression(solver="lstsq", fit_intercept=fit_intercept).fit(X, y)
    A = np.hstack([X, np.ones((X.shape[0], 1))]) if fit_intercept else X
    solution = np.linalg.lstsq(A, y, rcond=None)[0]  # (d + 1,) or (d + 1, k)
    coef = solution[:X.shape[1]].T
    intercept = solution[X.shape[1]] if fit_intercept else np.zeros_like(solution[0])
    np.testing.assert_allclose(model.coef_, coef, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(model.intercept_, intercept, rtol=1e-9, atol=1e-11)
    assert model.coef_.dtype == np.float64
    residual = A @ solution - y
    assert model.loss_history_ == [pytest.approx(np.mean(residual ** 2) / 2, rel=1e-9)]


def test_lstsq_float32_tensor_course_data(rng):
    X, y = course_data(rng)
    model = LinearRegression(solver="lstsq").fit(X, y[:, 0])
    X64, y64 = X.double().numpy(), y[:, 0].double().numpy()
    solution = np.linalg.lstsq(np.hstack([X64, np.ones((1000, 1))]), y64, rcond=None)[0]
    assert model.coef_.dtype == torch.float32 and model.intercept_.dim() == 0
    np.testing.assert_allclose(model.coef_.numpy(), solution[:2], rtol=1e-6)
    assert model.intercept_.item() == pytest.approx(solution[2], rel=1e-6)


def test_lstsq_rank_deficient_matches_sklearn(rng):
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y = problem(rng, n=40, d=3)
    X = np.hstack([X, X[:, :1] * 2.0])  # a dependent column: many solutions, take the minimum-norm one
    ours = LinearRegression(solver="lstsq").fit(X, y)
    theirs = sklearn.LinearRegression().fit(X, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-7, atol=1e-9)
    assert ours.intercept_ == pytest.approx(theirs.intercept_, rel=1e-7)



@pytest.mark.parametrize("fit_intercept", [True, False])
def test_lstsq_nearly_collinear_columns_match_sklearn(fit_intercept, rng):
    """Columns apart by 1e-8: below scikit-learn's cutoff (singular values under 1e-6 of the
    largest count as zero) they are one column, and the coefficients share its weight, where
    LAPACK's own cutoff would give two huge ones of opposite signs."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    x = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng))).normal(size=(50, 1))
    X = np.hstack([x, x + 1e-8 * np.cos(np.arange(50.0))[:, None]])
    y = 3 * x[:, 0] + 0.1 * np.sin(np.arange(50.0))
    ours = LinearRegression(solver="lstsq", fit_intercept=fit_intercept).fit(X, y)
    theirs = sklearn.LinearRegression(fit_intercept=fit_intercept).fit(X, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-7)
    assert abs(ours.coef_).max() < 2.0  # (LAPACK's cutoff: about 1e6)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, rtol=1e-7, atol=1e-12)


# -- kinds, shapes, dtypes ----------------------------------------------------------------------

def test_numpy_in_numpy_out(rng):
    X, y = problem(rng, n=30, d=3)
    model = LinearRegression(solver="lstsq").fit(X, y)
    pred = model.predict(X)
    assert isinstance(pred, np.ndarray) and pred.shape == (30,) and pred.dtype == np.float64
    np.testing.assert_allclose(pred, X @ model.coef_ + model.intercept_, rtol=1e-10)
    # a tensor at predict time gets a tensor back
    pred_t = model.predict(torch.from_numpy(X))
    assert isinstance(pred_t, torch.Tensor) and pred_t.shape == (30,)
    np.testing.assert_allclose(pred_t.numpy(), pred, rtol=1e-10)


def test_lists_are_accepted_and_give_numpy(rng):
    X, y = problem(rng, n=12, d=2)
    model = LinearRegression(solver="lstsq").fit(X.tolist(), y.tolist())
    assert isinstance(model.coef_, np.ndarray) and isinstance(model.predict(X.tolist()), np.ndarray)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_in_tensor_out(backend, dtype, rng):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype} kernel")
    X = torch.randn(29, 3, generator=rng, dtype=dtype).to(backend.device)
    y = torch.randn(29, generator=rng, dtype=dtype).to(backend.device)
    model = LinearRegression(epochs=1, generator=rng).fit(X, y)
    assert model.coef_.shape == (3,) and model.intercept_.shape == ()
    pred = model.predict(X)
    assert isinstance(pred, torch.Tensor) and pred.shape == (29,)
    assert pred.dtype == dtype and pred.device == X.device
    expected = X.cpu().double() @ model.coef_.cpu().double() + model.intercept_.cpu().double()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(pred.cpu().double(), expected, **tol)


def test_y_shape_decides_coef_shape(rng):
    X, y = problem(rng, n=25, d=4)
    one_d = LinearRegression(solver="lstsq").fit(X, y)
    two_d = LinearRegression(solver="lstsq").fit(X, y[:, None])
    assert one_d.coef_.shape == (4,) and isinstance(one_d.intercept_, float)
    assert two_d.coef_.shape == (1, 4) and two_d.intercept_.shape == (1,)
    assert one_d.predict(X).shape == (25,) and two_d.predict(X).shape == (25, 1)
    np.testing.assert_allclose(two_d.coef_[0], one_d.coef_, rtol=1e-12)


def test_dtype_option_and_integer_inputs(rng):
    X = torch.randint(-5, 5, (40, 2), generator=rng)
    y = X @ torch.tensor([3, -1]) + 2
    model = LinearRegression(solver="lstsq").fit(X, y)
    assert model.coef_.dtype == torch.float32
    torch.testing.assert_close(model.coef_, torch.tensor([3.0, -1.0]), atol=1e-4, rtol=0)
    model64 = LinearRegression(solver="lstsq", dtype="float64").fit(X.float(), y)
    assert model64.coef_.dtype == torch.float64 and model64.predict(X).dtype == torch.float64


def test_inputs_that_require_grad_are_fine(rng):
    X = torch.randn(20, 2, generator=rng, requires_grad=True)
    y = torch.randn(20, generator=rng)
    pred = LinearRegression(epochs=2, generator=rng).fit(X, y).predict(X)
    assert not pred.requires_grad


def test_fit_intercept_false(rng):
    X, y = problem(rng, n=50, d=3)
    model = LinearRegression(solver="lstsq", fit_intercept=False).fit(X, y)
    assert model.intercept_ == 0.0
    np.testing.assert_allclose(model.predict(X), X @ model.coef_, rtol=1e-12)


def test_zero_epochs_keeps_the_initial_weights(rng):
    X, y = problem(rng, n=20, d=3)
    model = LinearRegression(epochs=0, generator=rng).fit(X, y)
    assert model.loss_history_ == []
    assert 0 < np.abs(model.coef_).max() < 0.06 and model.intercept_ == 0.0


# -- reproducibility ----------------------------------------------------------------------------

def test_random_state_reproduces_every_fit(rng):
    X, y = course_data(rng)
    seed = seed_from(rng)
    model = LinearRegression(solver="sgd", random_state=seed)
    first = model.fit(X, y).coef_.clone()
    assert torch.equal(model.fit(X, y).coef_, first)
    assert torch.equal(LinearRegression(solver="sgd", random_state=seed).fit(X, y).coef_, first)
    assert not torch.equal(LinearRegression(solver="sgd", random_state=seed + 1).fit(X, y).coef_, first)


def test_generator_reproduces_and_advances(rng):
    X, y = course_data(rng)
    seed = seed_from(rng)
    gen_a, gen_b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    a = LinearRegression(solver="sgd", generator=gen_a).fit(X, y).coef_
    b = LinearRegression(solver="sgd", generator=gen_b).fit(X, y).coef_
    assert torch.equal(a, b)
    assert not torch.equal(LinearRegression(solver="sgd", generator=gen_a).fit(X, y).coef_, a)  # gen_a moved on


def test_global_seed_reproduces_without_generator(rng):
    X, y = course_data(rng)
    seed = seed_from(rng)
    torch.manual_seed(seed)
    a = LinearRegression(solver="sgd").fit(X, y).coef_
    torch.manual_seed(seed)
    assert torch.equal(LinearRegression(solver="sgd").fit(X, y).coef_, a)


def test_shuffle_false_is_deterministic_given_the_init(rng):
    X, y = course_data(rng, n=100)
    seed = seed_from(rng)
    a = LinearRegression(solver="sgd", shuffle=False, random_state=seed).fit(X, y).coef_
    b = LinearRegression(solver="sgd", shuffle=False, random_state=seed).fit(X, y).coef_
    c = LinearRegression(shuffle=True, random_state=seed).fit(X, y).coef_
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- score --------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [None, 3])
def test_score_is_sklearns_r2(k, rng):
    metrics = pytest.importorskip("sklearn.metrics")
    X, y = problem(rng, n=80, d=4, k=k, noise=1.0)
    model = LinearRegression(epochs=2, generator=rng).fit(X, y)
    X_test, y_test = problem(rng, n=31, d=4, k=k, noise=1.0)  # another model: R² far from 1, maybe < 0
    for Xs, ys in ((X, y), (X_test, y_test)):
        expected = metrics.r2_score(ys, model.predict(Xs))
        assert model.score(Xs, ys) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert model.score(torch.from_numpy(Xs), torch.from_numpy(ys)) == pytest.approx(expected, rel=1e-6)


def test_score_of_a_constant_target_as_sklearn(rng):
    metrics = pytest.importorskip("sklearn.metrics")
    X, _ = problem(rng, n=20, d=2)
    y = np.full(20, 3.5)
    exact = LinearRegression(solver="lstsq").fit(X, y)
    assert exact.score(X, y) == metrics.r2_score(y, exact.predict(X)) == 1.0
    rough = LinearRegression(epochs=1, generator=rng).fit(X, y)
    assert rough.score(X, y) == metrics.r2_score(y, rough.predict(X)) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_score_refuses_a_non_finite_y_as_sklearn(bad, rng):
    X, y = problem(rng, n=20, d=2)
    model = LinearRegression(solver="lstsq").fit(X, y)
    with pytest.raises(ValueError, match="Input (y )?contains"):  # (scikit-learn's own fit says "Input contains")
        model.score(X, np.full(20, bad))
    with pytest.raises(ValueError, match="Input y contains"):
        model.score(torch.from_numpy(X), np.full(20, bad))


# -- scikit-learn's interface -------------------------------------------------------------------

def test_params_protocol_and_clone():
    base = pytest.importorskip("sklearn.base")
    model = LinearRegression(solver="lstsq", epochs=5)
    assert model.get_params()["epochs"] == 5 and model.set_params(lr=0.1) is model and model.lr == 0.1
    copy = base.clone(model)
    assert copy is not model and copy.get_params() == model.get_params()
    assert repr(model) == "LinearRegression(solver='lstsq', lr=0.1, epochs=5)"
    with pytest.raises(InvalidArgumentError, match="Invalid parameter 'alpha' for estimator LinearRegression"):
        model.set_params(epochs=7, alpha=1.0)
    assert model.epochs == 5  # an unknown name sets nothing


def test_sklearn_check_estimator_passes():
    """scikit-learn's own estimator checks, every one (those it skips skip for want of pandas or
    SCIPY_ARRAY_API in this environment, not for the estimator's tags)."""
    pytest.importorskip("sklearn")
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(LinearRegression(), on_fail=None)
    assert len(results) > 40, "check_estimator ran its checks"
    assert {r["status"] for r in results} <= {"passed", "skipped"}
    failures = [f"{r['check_name']}: {r['exception']!r}" for r in results if r["status"] == "failed"]
    assert not failures, "\n".join(failures)


def test_cross_val_score(rng):
    model_selection = pytest.importorskip("sklearn.model_selection")
    X, y = problem(rng, n=300, d=3, noise=0.01)
    model = LinearRegression(epochs=20, random_state=0)
    scores = model_selection.cross_val_score(model, X, y, cv=5)
    assert scores.shape == (5,) and (scores > 0.99).all(), scores
    # the same as fitting a fresh model on each fold by hand (a regressor's default cv: KFold)
    by_hand = [LinearRegression(epochs=20, random_state=0).fit(X[train], y[train]).score(X[test], y[test])
               for train, test in model_selection.KFold(5).split(X)]
    np.testing.assert_array_equal(scores, by_hand)
    assert not hasattr(model, "coef_")  # cross_val_score fits clones
    lstsq = model_selection.cross_val_score(LinearRegression(solver="lstsq"), X, y, cv=3)
    assert (lstsq > 0.99).all(), lstsq


def test_pipeline_with_standard_scaler(rng):
    pipeline = pytest.importorskip("sklearn.pipeline")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    X, y = problem(rng, n=200, d=3, noise=0.01)
    X = X * [1.0, 100.0, 0.01] + 50.0  # badly scaled: the scaler makes SGD's lr fit every feature
    pipe = pipeline.Pipeline([("scale", preprocessing.StandardScaler()),
                              ("lr", LinearRegression(epochs=20, random_state=0))])
    assert pipe.fit(X, y) is pipe
    pred = pipe.predict(X)
    assert isinstance(pred, np.ndarray) and pred.shape == (200,)
    assert pipe.score(X, y) > 0.99
    scaled = preprocessing.StandardScaler().fit_transform(X)
    np.testing.assert_allclose(pred, scaled @ pipe["lr"].coef_ + pipe["lr"].intercept_, rtol=1e-10)


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"solver": "adam"}, "solver"), ({"solver": None}, "solver"),
    ({"lr": 0}, "lr"), ({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": "0.1"}, "lr"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": -2}, "batch_size"), ({"batch_size": 2.5}, "batch_size"),
    ({"batch_size": True}, "batch_size"), ({"epochs": -1}, "epochs"), ({"epochs": 1.5}, "epochs"),
    ({"fit_intercept": "yes"}, "fit_intercept"), ({"dtype": torch.float16}, "dtype"),
    ({"random_state": -1}, "random_state"), ({"generator": 3}, "generator"),
    ({"random_state": 1, "generator": torch.Generator()}, "random_state and generator"),
])
def test_rejects_bad_parameters(kwargs, name):
    # scikit-learn's convention: __init__ and set_params store parameters unchecked (clone and grid
    # searches set them so); fit checks them and raises.
    model = LinearRegression(**kwargs)
    with pytest.raises(InvalidArgumentError, match=name):
        model.fit(np.ones((3, 1)), np.ones(3))
    model = LinearRegression().set_params(**kwargs)
    with pytest.raises(InvalidArgumentError, match=name):
        model.fit(np.ones((3, 1)), np.ones(3))
    model = LinearRegression()
    with pytest.raises(InvalidArgumentError, match=name):  # also when set as attributes
        for key, value in kwargs.items():
            setattr(model, key, value)
        model.fit(np.ones((3, 1)), np.ones(3))
    assert not hasattr(model, "coef_")


# scikit-learn's messages (its check_estimator matches several of them)
@pytest.mark.parametrize("X, y, match", [
    (np.ones(5), np.ones(5), "(?s)Expected 2D array, got 1D array.*Reshape your data"),
    (np.ones((2, 3, 4)), np.ones(2), r"Found array with dim 3, while dim <= 2 is required by LinearRegression"),
    (np.ones((0, 3)), np.ones(0), r"0 sample\(s\) \(shape=\(0, 3\)\) while a minimum of 1 is required"),
    (np.ones((4, 0)), np.ones(4), r"0 feature\(s\) \(shape=\(4, 0\)\) while a minimum of 1 is required"),
    (np.ones((5, 2)), np.ones(4), r"inconsistent numbers of samples: \[5, 4\]"),
    (np.ones((5, 2)), np.ones((5, 1, 1)), "y must be 1-D.*or 2-D"),
    (np.array([[1.0, np.nan], [2.0, 3.0]]), np.ones(2), "Input X contains NaN"),
    (np.ones((2, 2)), np.array([1.0, np.inf]),
     r"Input y contains infinity or a value too large for dtype\('float64'\)"),
    (np.array([["a", "b"]]), np.ones(1), "not compatible with arrays of bytes/strings"),
    (np.ones((2, 2)) * 1j, np.ones(2), "Complex data not supported: X"),
    (np.ones((2, 2)), np.ones(2) * 1j, "Complex data not supported: y"),
    (np.array([[1.0, {}], [2.0, 3.0]], dtype=object), np.ones(2), "argument must be a string.* number"),
    (np.ones((3, 2)), None, "requires y to be passed, but the target y is None"),
    (torch.ones(3, 2).to_sparse(), torch.ones(3), "Sparse data was passed for X, but dense data is required"),
])
def test_rejects_bad_data(X, y, match):
    """fastml's own checks (the course's SGD; a closed form of numpy data is scikit-learn's fit,
    with its own errors)."""
    with pytest.raises(InvalidArgumentError, match=match):
        LinearRegression(solver="sgd").fit(X, y)


def test_rejects_values_too_large_for_the_dtype_it_computes_in():
    X = np.array([[1e300, 1.0], [2.0, 3.0]])
    LinearRegression(solver="lstsq").fit(X, np.ones(2))  # float64 in: computed in float64
    with pytest.raises(InvalidArgumentError, match=r"Input X contains infinity or a value too large for "
                                                   r"dtype\('float32'\)"):
        LinearRegression(dtype="float32").fit(X, np.ones(2))


def test_rejects_scipy_sparse_X():
    sparse = pytest.importorskip("scipy.sparse")
    for X in (sparse.csr_matrix(np.eye(3)), sparse.csr_array(np.eye(3))):
        with pytest.raises(InvalidArgumentError, match="Sparse data was passed for X.*toarray"):
            LinearRegression(solver="sgd").fit(X, np.ones(3))


def test_object_arrays_of_numbers_are_floats(rng):
    X, y = problem(rng, n=20, d=2)
    ours = LinearRegression(solver="lstsq").fit(X.astype(object), y.astype(object))
    assert ours.coef_.dtype == np.float64
    np.testing.assert_allclose(ours.coef_, LinearRegression(solver="lstsq").fit(X, y).coef_, rtol=0, atol=0)
    np.testing.assert_allclose(ours.predict(X.astype(object)), ours.predict(X), rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [(np.nan, "Input X contains NaN"), (np.inf, "Input X contains infinity"),
                                        (-np.inf, "Input X contains infinity")])
def test_predict_rejects_nan_and_inf(bad, match, rng):
    X, y = problem(rng, n=10, d=3)
    model = LinearRegression(solver="lstsq").fit(torch.from_numpy(X), torch.from_numpy(y))
    X[4, 1] = bad
    with pytest.raises(InvalidArgumentError, match=match):
        model.predict(X)
    with pytest.raises(InvalidArgumentError, match=match):
        model.predict(torch.from_numpy(X))


def test_predict_before_fit():
    model = LinearRegression()
    with pytest.raises(NotFittedError, match="not fitted yet. Call 'fit'"):
        model.predict(np.ones((3, 2)))
    with pytest.raises(AttributeError):  # NotFittedError is one, and coef_ does not exist yet
        model.score(np.ones((3, 2)), np.ones(3))
    assert not hasattr(model, "coef_")


def test_predict_with_the_wrong_number_of_features(rng):
    X, y = problem(rng, n=10, d=3)
    model = LinearRegression(solver="lstsq").fit(X, y)
    with pytest.raises(ValueError, match="X has 2 features, but LinearRegression is expecting 3 features as input."):
        model.predict(X[:, :2])
    with pytest.raises(ValueError, match="X has 2 features, but LinearRegression is expecting 3 features as input."):
        model.score(X[:, :2], y)
    with pytest.raises(ValueError, match="(?s)Expected 2D array, got 1D array.*Reshape your data"):
        model.predict(X[0])


def test_divergence_warns(rng):
    X, y = problem(rng, n=50, d=3, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="lower lr"):
        model = LinearRegression(lr=1e6, epochs=3, generator=rng).fit(X * 100, y)
    assert not math.isfinite(model.loss_history_[-1])


def test_error_classes():
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    assert issubclass(InvalidArgumentError, ValueError)


def test_not_fitted_error_is_also_sklearns():
    exceptions = pytest.importorskip("sklearn.exceptions")
    with pytest.raises(exceptions.NotFittedError) as info:
        LinearRegression().predict(np.ones((3, 2)))
    error = info.value
    assert isinstance(error, NotFittedError) and isinstance(error, AttributeError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.args == error.args


def test_public_surface():
    assert fastml.linear_model.LinearRegression is LinearRegression


def test_big_endian_arrays_fit_as_native_ones():
    """numpy data in the other byte order (which torch.from_numpy refuses) gives the same model as
    the same values in the native order, as scikit-learn's estimators take either."""
    rng = np.random.default_rng(12)
    X, y = rng.normal(size=(50, 3)), rng.normal(size=50)
    native = LinearRegression(random_state=0).fit(X, y)
    swapped = LinearRegression(random_state=0).fit(X.astype(">f8"), y.astype(">f8"))
    np.testing.assert_array_equal(swapped.coef_, native.coef_)
    np.testing.assert_array_equal(swapped.predict(X.astype(">f8")), native.predict(X))


# -- scikit-learn's LinearRegression, as a drop-in -----------------------------------------------

def test_default_is_the_least_squares_fit_and_sgd_where_its_settings_are_given(rng):
    """solver="auto": the closed form, as scikit-learn's LinearRegression() fits (3 epochs of SGD
    answered R² = 0.66 on exact data); SGD where lr, batch_size or epochs is given."""
    X, y = problem(rng, n=100, d=3)
    exact = X @ np.array([1.5, -2.0, 0.5]) + 3.0
    for data in ((X, exact), (torch.from_numpy(X), torch.from_numpy(exact))):
        model = LinearRegression().fit(*data)
        np.testing.assert_allclose(np.asarray(model.coef_), [1.5, -2.0, 0.5], rtol=0, atol=1e-12)
        assert model.score(*data) == pytest.approx(1.0, abs=1e-12)
    for setting in ("lr", "batch_size", "epochs"):
        model = LinearRegression(**{setting: 1 if setting == "epochs" else 0.03 if setting == "lr" else 10})
        assert model._solver() == "sgd" and len(model.fit(X, y).loss_history_) == (1 if setting == "epochs" else 3)
    assert LinearRegression()._solver() == "lstsq" and LinearRegression(random_state=0)._solver() == "lstsq"


def test_takes_sklearns_parameters_and_they_clone(rng):
    base = pytest.importorskip("sklearn.base")
    model = LinearRegression(copy_X=False, tol=1e-8, n_jobs=2, positive=False)
    params = model.get_params()
    assert {k: params[k] for k in ("copy_X", "tol", "n_jobs", "positive")} == dict(copy_X=False, tol=1e-8, n_jobs=2,
                                                                                  positive=False)
    assert base.clone(model).get_params() == params
    assert repr(model) == "LinearRegression(copy_X=False, tol=1e-08, n_jobs=2)"
    for name, value in (("tol", -1.0), ("copy_X", "yes"), ("n_jobs", 1.5), ("positive", None)):
        with pytest.raises(InvalidArgumentError, match=name):
            LinearRegression(**{name: value}).fit(*problem(rng, n=10, d=2))


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("targets", [None, 2])
def test_sample_weight_and_rank_as_sklearn_on_tensors(rng, fit_intercept, targets):
    """The closed form of tensors (fastml's) against scikit-learn's of the same numpy data:
    weighted coefficients, rank_, singular_, and the weighted score."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y = problem(rng, n=30, d=4)
    X[:, 3] = X[:, 0] + X[:, 1]  # rank 3
    if targets:
        y = np.stack([y, 2 * y - 1], axis=1)
    w = rng_uniform(rng, 30) * 3
    ours = LinearRegression(fit_intercept=fit_intercept).fit(torch.from_numpy(X), torch.from_numpy(y), sample_weight=w)
    theirs = sklearn.LinearRegression(fit_intercept=fit_intercept).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(ours.coef_.numpy(), theirs.coef_, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(ours.intercept_), theirs.intercept_, rtol=1e-9, atol=1e-11)
    assert ours.rank_ == theirs.rank_ == 3
    np.testing.assert_allclose(ours.singular_.numpy(), theirs.singular_, rtol=1e-9, atol=1e-11)
    assert ours.score(torch.from_numpy(X), y, sample_weight=w) == pytest.approx(theirs.score(X, y, sample_weight=w),
                                                                               rel=1e-12)
    scalar = LinearRegression(fit_intercept=fit_intercept).fit(torch.from_numpy(X), torch.from_numpy(y), sample_weight=2.0)
    np.testing.assert_allclose(scalar.coef_.numpy(), sklearn.LinearRegression(fit_intercept=fit_intercept).fit(X, y).coef_,
                               rtol=1e-9, atol=1e-11)


def rng_uniform(rng, n):
    return torch.rand(n, generator=rng, dtype=torch.float64).numpy()


def test_what_only_the_closed_form_takes_is_refused_by_sgd(rng):
    X, y = problem(rng, n=10, d=2)
    with pytest.raises(InvalidArgumentError, match="sample_weight is taken by the closed form only"):
        LinearRegression(solver="sgd").fit(X, y, sample_weight=np.ones(10))
    with pytest.raises(InvalidArgumentError, match="positive=True needs the closed form"):
        LinearRegression(epochs=2, positive=True).fit(X, y)
    with pytest.raises(InvalidArgumentError, match="positive=True is scikit-learn's fit"):
        LinearRegression(positive=True, dtype="float32").fit(torch.from_numpy(X), torch.from_numpy(y))
    with pytest.raises(InvalidArgumentError, match=r"sample_weight.shape == \(3,\), expected \(10,\)!"):
        LinearRegression().fit(torch.from_numpy(X), torch.from_numpy(y), sample_weight=np.ones(3))


def test_a_closed_form_of_numpy_data_is_sklearns_fit(rng):
    """positive=True, sparse X and a numpy RandomState (as RANSAC sets one) as scikit-learn's own."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    sparse = pytest.importorskip("scipy.sparse")
    X, y = problem(rng, n=40, d=3)
    for kwargs, data in ((dict(positive=True), X), ({}, sparse.csr_matrix(X))):
        ours, theirs = LinearRegression(**kwargs).fit(data, y), sklearn.LinearRegression(**kwargs).fit(data, y)
        np.testing.assert_array_equal(ours.coef_, theirs.coef_)
        np.testing.assert_array_equal(ours.predict(data), theirs.predict(data))
        assert len(ours.loss_history_) == 1
    ransac = sklearn.RANSACRegressor(LinearRegression(), min_samples=5, random_state=0).fit(X, y)
    reference = sklearn.RANSACRegressor(sklearn.LinearRegression(), min_samples=5, random_state=0).fit(X, y)
    np.testing.assert_allclose(ransac.estimator_.coef_, reference.estimator_.coef_, rtol=1e-12)
    sgd = LinearRegression(solver="sgd", random_state=np.random.RandomState(3))
    assert sgd.fit(X, y).coef_.shape == (3,)


def test_read_only_data_and_a_one_sample_score_warn_as_sklearn(rng):
    X, y = problem(rng, n=20, d=2)
    X.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = LinearRegression(solver="sgd").fit(X, y)
    exceptions = pytest.importorskip("sklearn.exceptions")
    with pytest.warns(exceptions.UndefinedMetricWarning, match="not well-defined with less than two samples"):
        model.score(X[:1], y[:1])


@pytest.mark.parametrize("weights, message", [
    (lambda n: np.r_[-1.0, np.ones(n - 1)], "Negative values in data passed to `sample_weight`"),
    (lambda n: np.zeros(n), "Sample weights must contain at least one non-zero number"),
    (lambda n: 0.0, "Sample weights must contain at least one non-zero number"),
    (lambda n: -1.0, "Negative values"),
    (lambda n: float("nan"), "Input sample_weight contains NaN"),
])
def test_bad_sample_weights_are_refused_as_sklearn_on_tensors(weights, message, rng):
    """Weights a least-squares fit cannot take: scikit-learn's ValueErrors (they reached LAPACK,
    which failed an internal assertion)."""
    X, y = problem(rng, n=20, d=3)
    with pytest.raises(InvalidArgumentError, match=message):
        LinearRegression().fit(torch.from_numpy(X), torch.from_numpy(y), sample_weight=weights(20))
    model = LinearRegression().fit(torch.from_numpy(X), torch.from_numpy(y))
    with pytest.raises(InvalidArgumentError, match=message):
        model.score(torch.from_numpy(X), y, sample_weight=weights(20))


def test_positive_fits_tensors_as_sklearn(rng):
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y = problem(rng, n=30, d=3)
    ours = LinearRegression(positive=True).fit(torch.from_numpy(X), torch.from_numpy(y))
    theirs = sklearn.LinearRegression(positive=True).fit(X, y)
    assert isinstance(ours.coef_, torch.Tensor) and isinstance(ours.intercept_, torch.Tensor)
    np.testing.assert_array_equal(ours.coef_.numpy(), theirs.coef_)
    # (a tensor's prediction is fastml's linear, which sums in its own order: within an ulp)
    np.testing.assert_allclose(ours.predict(torch.from_numpy(X)).numpy(), theirs.predict(X), rtol=1e-14, atol=1e-15)


def test_a_refit_keeps_nothing_of_the_last_fit(rng):
    """Each fit starts afresh: attributes only another path sets (rank_ and singular_ of the
    closed form, scikit-learn's fit's own) do not outlive it."""
    pytest.importorskip("sklearn")
    X, y = problem(rng, n=20, d=3)
    model = LinearRegression().fit(X, y)
    assert hasattr(model, "rank_") and hasattr(model, "_sklearn_fitted")
    model.set_params(solver="sgd").fit(torch.from_numpy(X), torch.from_numpy(y))
    assert not hasattr(model, "rank_") and not hasattr(model, "singular_") and not hasattr(model, "_sklearn_fitted")
