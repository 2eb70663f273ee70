"""fastml.neighbors against scikit-learn's KNeighborsClassifier / KNeighborsRegressor.

Where the k-th and (k+1)-th nearest training points of a query are at exactly the same
distance, which of them is kept is a tie-break: fastml keeps the lower index, scikit-learn
whatever its heap or tree leaves. Predictions, probabilities and neighbours must be identical
for every query without such a boundary tie; distances identical for all.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import fastml
from fastml.neighbors import KNeighborsClassifier, KNeighborsRegressor, NotFittedError

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is the twin these tests compare with")
from sklearn import datasets  # noqa: E402
from sklearn import neighbors as sk_neighbors  # noqa: E402


def _split(loader):
    X, y = loader(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    n = len(X) * 2 // 3
    return X[:n], y[:n], X[n:]


DATASETS = {"iris": _split(datasets.load_iris), "digits": _split(datasets.load_digits)}


def _untied(fm, X_test, k):
    """Queries whose k-th and (k+1)-th nearest training points are at clearly different
    distances: iris's decimals make ties that rounding turns either way, in scikit-learn's
    arithmetic and in fastml's, so "equal" here is within 1e-9 (digits' integers tie exactly)."""
    if k >= fm.n_samples_fit_:
        return np.ones(len(X_test), dtype=bool)
    d, _ = fm.kneighbors(X_test, n_neighbors=k + 1)
    return d[:, k] - d[:, k - 1] > 1e-9 * np.maximum(1.0, d[:, k])


# (interpreter_slow: these check the estimator against scikit-learn's, which the other backends
# do; the Triton kernel's own checks are test_knn's, 9 and 6 s of the default run's 10 minutes)
@pytest.mark.interpreter_slow
@pytest.mark.parametrize("name", list(DATASETS))
def test_classifier_identical_to_sklearn(backend, name):
    # a spread of k; the interpreter: one k and one p (test_knn checks its kernel at every k and p)
    ks = (15,) if backend.interpreted else (1, 2, 3, 5, 8, 11, 15) if backend.name == "cpp" else (1, 4, 15)
    classifier_identical_to_sklearn(backend, name, ks, (2,) if backend.interpreted else (1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATASETS))
def test_classifier_identical_to_sklearn_at_every_k(backend, name):
    classifier_identical_to_sklearn(backend, name, (15,) if backend.interpreted else range(1, 16), (1, 2))


def classifier_identical_to_sklearn(backend, name, ks, ps):
    if backend.interpreted and name == "digits":
        pytest.skip("digits through the Triton interpreter takes minutes: iris covers the kernel")
    X_train, y_train, X_test = DATASETS[name]
    # the weighting is Python over the kernel's neighbours: one of them under the interpreter
    weightings = ("distance",) if backend.interpreted else ("uniform", "distance")
    for k, weights, p in itertools.product(ks, weightings, ps):
        sk = sk_neighbors.KNeighborsClassifier(k, weights=weights, p=p).fit(X_train, y_train)
        fm = KNeighborsClassifier(k, weights=weights, p=p).fit(X_train, y_train)
        untied = _untied(fm, X_test, k)
        assert untied.mean() > 0.25, "the comparison must cover a good share of the queries"
        np.testing.assert_array_equal(fm.predict(X_test)[untied], sk.predict(X_test)[untied])
        np.testing.assert_allclose(fm.predict_proba(X_test)[untied], sk.predict_proba(X_test)[untied],
                                   rtol=1e-12, atol=1e-12)
        d_fm, i_fm = fm.kneighbors(X_test)
        d_sk, i_sk = sk.kneighbors(X_test)
        np.testing.assert_allclose(d_fm, d_sk, rtol=1e-12, atol=1e-12)
        for row in np.where(untied)[0]:  # same neighbours; the same order where distances differ
            assert set(i_fm[row]) == set(i_sk[row])
            gap = np.diff(d_fm[row]) > 1e-9 * np.maximum(1.0, d_fm[row][1:])
            distinct = np.r_[True, gap] & np.r_[gap, True]
            np.testing.assert_array_equal(i_fm[row][distinct], i_sk[row][distinct])
        assert fm.score(X_test, sk.predict(X_test)) >= untied.mean()


@pytest.mark.interpreter_slow
@pytest.mark.parametrize("p", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_regressor_identical_to_sklearn(backend, p):
    rng = np.random.default_rng(1)
    X, X_test = rng.normal(size=(120, 5)), rng.normal(size=(33, 5))
    y = np.c_[X @ rng.normal(size=5), np.sin(X[:, 0])]
    ks = (4,) if backend.interpreted else (1, 4, 15)  # the interpreter: seconds per fit
    targets = (y,) if backend.interpreted else (y[:, 0], y)  # the interpreter: both outputs in one fit
    weightings = ("distance",) if backend.interpreted else ("uniform", "distance")  # as in the classifier's test
    for k, weights, target in itertools.product(ks, weightings, targets):
        sk = sk_neighbors.KNeighborsRegressor(k, weights=weights, p=p).fit(X, target)
        fm = KNeighborsRegressor(k, weights=weights, p=p).fit(X, target)
        np.testing.assert_allclose(fm.predict(X_test), sk.predict(X_test), rtol=1e-12, atol=1e-12)
        assert fm.score(X_test, sk.predict(X_test)) == pytest.approx(1.0)
        assert fm.score(X, target) == pytest.approx(sk.score(X, target), abs=1e-12)


@pytest.mark.parametrize("metric, p", [("euclidean", 2), ("manhattan", 2), ("chebyshev", 2), ("minkowski", 1),
                                       ("minkowski", 3)])
def test_metrics_as_sklearn(metric, p):
    rng = np.random.default_rng(2)
    X, X_test, y = rng.normal(size=(80, 3)), rng.normal(size=(20, 3)), rng.integers(0, 3, 80)
    sk = sk_neighbors.KNeighborsClassifier(5, metric=metric, p=p).fit(X, y)
    fm = KNeighborsClassifier(5, metric=metric, p=p).fit(X, y)
    np.testing.assert_allclose(fm.kneighbors(X_test)[0], sk.kneighbors(X_test)[0], rtol=1e-12)
    np.testing.assert_array_equal(fm.kneighbors(X_test)[1], sk.kneighbors(X_test)[1])
    np.testing.assert_array_equal(fm.predict(X_test), sk.predict(X_test))


def test_exact_matches_under_distance_weights_as_sklearn():
    X = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    y = np.array([0, 1, 1, 2, 2])
    queries = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    for cls, sk_cls in ((KNeighborsClassifier, sk_neighbors.KNeighborsClassifier),
                        (KNeighborsRegressor, sk_neighbors.KNeighborsRegressor)):
        fm, sk = cls(3, weights="distance").fit(X, y), sk_cls(3, weights="distance").fit(X, y)
        np.testing.assert_allclose(fm.predict(queries), sk.predict(queries))
        if cls is KNeighborsClassifier:
            np.testing.assert_allclose(fm.predict_proba(queries), sk.predict_proba(queries))


def test_callable_weights_and_any_labels():
    rng = np.random.default_rng(3)
    X, X_test = rng.normal(size=(40, 2)), rng.normal(size=(10, 2))
    y = np.array(["wolf", "dog", "fox"])[rng.integers(0, 3, 40)]
    weight = lambda d: np.exp(-d)  # noqa: E731
    fm = KNeighborsClassifier(4, weights=weight).fit(X, y)
    sk = sk_neighbors.KNeighborsClassifier(4, weights=weight).fit(X, y)
    np.testing.assert_array_equal(fm.classes_, sk.classes_)
    np.testing.assert_array_equal(fm.predict(X_test), sk.predict(X_test))
    np.testing.assert_allclose(fm.predict_proba(X_test), sk.predict_proba(X_test))


def test_kneighbors_without_X_leaves_each_point_out_as_sklearn():
    X = np.array([[0.0], [1.0], [1.0], [3.0], [6.0]])
    fm = KNeighborsClassifier(2).fit(X, [0, 1, 1, 0, 1])
    sk = sk_neighbors.KNeighborsClassifier(2).fit(X, [0, 1, 1, 0, 1])
    for a, b in zip(fm.kneighbors(), sk.kneighbors()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fm.kneighbors(return_distance=False, n_neighbors=3),
                                  sk.kneighbors(return_distance=False, n_neighbors=3))


def test_tensors_in_tensors_out_on_the_same_device(backend, rng):
    X = torch.randn(30, 3, generator=rng).to(backend.device)
    y = torch.randint(0, 3, (30,), generator=rng).to(backend.device)
    with fastml.use_backend(backend.name):
        clf = KNeighborsClassifier(3).fit(X, y)
        pred, proba = clf.predict(X[:5]), clf.predict_proba(X[:5])
        distances, indices = clf.kneighbors(X[:5])
    for t in (pred, proba, distances, indices):
        assert isinstance(t, torch.Tensor) and t.device == X.device
    assert torch.equal(indices[:, 0].cpu(), torch.arange(5))
    assert isinstance(clf.predict(X[:5].cpu().numpy()), np.ndarray)
    reg = KNeighborsRegressor(2).fit(X, y.to(X.dtype))
    assert isinstance(reg.predict(X[:4]), torch.Tensor)


def test_float32_and_integer_inputs():
    X = datasets.load_digits().data
    y = datasets.load_digits().target
    as_uint8 = KNeighborsClassifier(1).fit(X[:1400].astype(np.uint8), y[:1400]).score(X[1400:], y[1400:])
    as_float = KNeighborsClassifier(1).fit(X[:1400], y[:1400]).score(X[1400:], y[1400:])
    assert as_uint8 == as_float > 0.95


@pytest.mark.parametrize("x_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("y_dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_results_have_sklearns_dtypes_and_targets_keep_their_precision(x_dtype, y_dtype, weights):
    """numpy in, numpy out in scikit-learn's dtypes: float64 distances and probabilities whatever
    X's dtype; a regressor's mean in y's own floating dtype (float64 for integers, or under
    distance weights). Targets are never rounded to X's dtype: float64 targets 1e8 + i, which
    float32 cannot tell apart, come back as they are."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((40, 3)).astype(x_dtype)
    targets = (1e8 + np.arange(40)).astype(y_dtype) if y_dtype != np.float32 else rng.standard_normal(40).astype(y_dtype)
    queries = X[:6] + np.float32(0.01)
    for ours, theirs in ((KNeighborsRegressor, sk_neighbors.KNeighborsRegressor),
                         (KNeighborsClassifier, sk_neighbors.KNeighborsClassifier)):
        y = targets if ours is KNeighborsRegressor else np.arange(40) % 3
        mine, expected = ours(3, weights=weights).fit(X, y), theirs(3, weights=weights).fit(X, y)
        assert mine.kneighbors(queries)[0].dtype == expected.kneighbors(queries)[0].dtype
        assert mine.predict(queries).dtype == expected.predict(queries).dtype, ours.__name__
        if ours is KNeighborsClassifier:
            assert mine.predict_proba(queries).dtype == expected.predict_proba(queries).dtype
        else:
            np.testing.assert_allclose(mine.predict(queries), expected.predict(queries), rtol=1e-6)
            if y_dtype != np.float32:  # the targets apart by 1 at 1e8: averaged in float64, as there
                assert np.array_equal(mine.predict(X[:6]), expected.predict(X[:6]))


def test_tensor_results_keep_the_training_dtype_and_the_targets_theirs():
    X = torch.randn(30, 3)
    y = 1e8 + torch.arange(30, dtype=torch.float64)
    reg = KNeighborsRegressor(1).fit(X, y)
    assert reg.kneighbors(X[:4])[0].dtype == torch.float32
    assert reg.predict(X[:4]).dtype == torch.float64 and torch.equal(reg.predict(X[:4]), y[:4])
    clf = KNeighborsClassifier(3).fit(X, torch.arange(30) % 3)
    assert clf.predict_proba(X[:4]).dtype == torch.float32


@pytest.mark.parametrize("ours, theirs", [(KNeighborsRegressor, sk_neighbors.KNeighborsRegressor),
                                          (KNeighborsClassifier, sk_neighbors.KNeighborsClassifier)])
def test_score_of_too_few_or_mismatched_samples_as_sklearn(ours, theirs):
    """R² of one sample is NaN with scikit-learn's UndefinedMetricWarning; y and X of different
    lengths are refused with its error (numpy would broadcast one against the other)."""
    from sklearn.exceptions import UndefinedMetricWarning

    X, y = np.arange(6.0)[:, None], np.arange(6)
    mine, expected = ours(1).fit(X, y), theirs(1).fit(X, y)
    for queries, truth in ((X[:3], y[:1]), (X[:1], y[:3])):
        with pytest.raises(ValueError) as theirs_raised:
            expected.score(queries, truth)
        with pytest.raises(ValueError, match=re.escape(str(theirs_raised.value))):
            mine.score(queries, truth)
    if ours is KNeighborsRegressor:
        with pytest.warns(UndefinedMetricWarning, match="less than two samples"):
            assert np.isnan(mine.score(X[:1], y[:1]))
    else:
        assert mine.score(X[:1], y[:1]) == expected.score(X[:1], y[:1]) == 1.0


@pytest.mark.parametrize("params", [dict(n_neighbors=0), dict(n_neighbors=2.0), dict(p=0), dict(p=-1),
                                    dict(weights="gaussian")])
def test_bad_parameters_raise_sklearns_invalid_parameter_error(params):
    """scikit-learn's parameter errors are InvalidParameterError, a ValueError and a TypeError:
    code catching either catches fastml's."""
    from sklearn.utils._param_validation import InvalidParameterError

    with pytest.raises(InvalidParameterError) as raised:
        KNeighborsClassifier(**params).fit(np.eye(3), [0, 1, 2])
    assert isinstance(raised.value, TypeError)
    with pytest.raises(InvalidParameterError):
        sk_neighbors.KNeighborsClassifier(**params).fit(np.eye(3), [0, 1, 2])


def test_params_api_and_clone():
    clf = KNeighborsClassifier(7, weights="distance", p=1)
    assert clf.get_params()["n_neighbors"] == 7 and clf.get_params()["p"] == 1
    copy = sklearn.base.clone(clf)
    assert copy.get_params() == clf.get_params() and copy is not clf
    assert clf.set_params(n_neighbors=3) is clf and clf.n_neighbors == 3
    with pytest.raises(ValueError, match="Invalid parameter"):
        clf.set_params(k=3)
    assert "n_neighbors=3" in repr(clf)


@pytest.mark.parametrize("make, error, message", [
    (lambda: KNeighborsClassifier(6).fit(np.zeros((5, 2)), np.arange(5)).predict(np.zeros((1, 2))), ValueError,
     "Expected n_neighbors <= n_samples_fit"),
    (lambda: KNeighborsClassifier(1).fit(np.zeros((0, 2)), []), ValueError, "0 sample"),
    (lambda: KNeighborsClassifier(1).fit([[0.0, np.nan]], [1]), ValueError, "contains NaN"),
    (lambda: KNeighborsClassifier(1).fit([[0.0, 1.0]], [1]).predict([[0.0, np.nan]]), ValueError, "contains NaN"),
    (lambda: KNeighborsClassifier(1).fit([[0.0, 1.0]], [1]).predict([[0.0, 1.0, 2.0]]), ValueError,
     "X has 3 features, but KNeighborsClassifier is expecting 2 features"),
    (lambda: KNeighborsClassifier(1).predict([[0.0]]), NotFittedError, "not fitted yet"),
    (lambda: KNeighborsRegressor(1).kneighbors([[0.0]]), NotFittedError, "not fitted yet"),
    (lambda: KNeighborsClassifier(0).fit([[0.0]], [1]), ValueError, "n_neighbors must be a positive integer"),
    (lambda: KNeighborsClassifier(1, weights="gaussian").fit([[0.0]], [1]), ValueError, "weights must be"),
    (lambda: KNeighborsClassifier(1, metric="no_such_metric").fit([[0.0]], [1]), ValueError, "metric"),
    (lambda: KNeighborsClassifier(1).fit([[0.0], [1.0]], [1]), ValueError, "inconsistent numbers of samples"),
    (lambda: KNeighborsClassifier(1).fit([0.0, 1.0], [1, 0]), ValueError, "Expected 2D array, got 1D array"),
    (lambda: KNeighborsClassifier(1).fit([[0.0], [1.0]], None), ValueError,
     "KNeighborsClassifier estimator requires y to be passed, but the target y is None"),
    (lambda: KNeighborsClassifier(1).fit([[0.0], [1.0]], [0.5, 1.0]), ValueError, "Unknown label type: continuous"),
    (lambda: KNeighborsClassifier(1).fit([[0.0], [1.0]], [0, np.nan]), ValueError, "Input y contains NaN"),
    (lambda: KNeighborsRegressor(1).fit([[0.0], [1.0]], [0, np.inf]), ValueError,
     r"Input y contains infinity or a value too large for dtype\('float64'\)"),
    (lambda: KNeighborsRegressor(1).fit([[0.0], [1.0]], [[[0.0]], [[1.0]]]), ValueError, "Found array with dim 3"),
    (lambda: KNeighborsRegressor(1).fit([[1j], [1.0]], [0.0, 1.0]), ValueError, "Complex data not supported"),
    (lambda: KNeighborsClassifier(1).fit([[0.0], [1.0]], [1j, 1.0]), ValueError, "Complex data not supported"),
    (lambda: KNeighborsRegressor(1).fit([["a"], ["b"]], [0.0, 1.0]), ValueError, "not compatible with arrays of bytes"),
    (lambda: KNeighborsRegressor(1).fit(np.array([[{}], [1.0]], dtype=object), [0.0, 1.0]), TypeError,
     "argument must be a string or a real number"),
])
def test_bad_input(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_scikit_learn_model_selection_and_pipelines_take_them():
    """The estimators carry scikit-learn's tags, so its tools know a classifier from a regressor
    and use them as scikit-learn's own (the same folds give the same scores)."""
    from sklearn.base import is_classifier, is_regressor
    from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = datasets.load_iris(return_X_y=True)
    # iris is measured to 0.1 cm: jittered, no two neighbours tie (where scikit-learn's pick differs)
    X = X + np.random.default_rng(0).normal(scale=1e-3, size=X.shape)
    assert is_classifier(KNeighborsClassifier()) and is_regressor(KNeighborsRegressor())
    folds = KFold(4, shuffle=True, random_state=0)
    for ours, theirs, target in ((KNeighborsClassifier(7), sk_neighbors.KNeighborsClassifier(7), y),
                                 (KNeighborsRegressor(4), sk_neighbors.KNeighborsRegressor(4), X[:, 3])):
        np.testing.assert_allclose(cross_val_score(ours, X[:, :3], target, cv=folds),
                                   cross_val_score(theirs, X[:, :3], target, cv=folds), rtol=1e-12)
    search = GridSearchCV(KNeighborsClassifier(), {"n_neighbors": [1, 5, 9], "weights": ["uniform", "distance"]},
                          cv=folds).fit(X, y)
    expected = GridSearchCV(sk_neighbors.KNeighborsClassifier(), search.param_grid, cv=folds).fit(X, y)
    assert search.best_params_ == expected.best_params_ and search.best_score_ == expected.best_score_
    ours = make_pipeline(StandardScaler(), KNeighborsClassifier(3)).fit(X, y)
    theirs = make_pipeline(StandardScaler(), sk_neighbors.KNeighborsClassifier(3)).fit(X, y)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))


def test_bad_input_raises_what_sklearn_raises():
    """Same error class and message as scikit-learn's twin on the same bad input (complex
    input excepted: scikit-learn prints the whole array after its words, fastml the dtype)."""
    X, y = np.random.default_rng(4).uniform(size=(20, 3)), np.arange(20) % 3
    bad = {"unfitted": lambda cls: cls().predict(X),
           "predict 1d": lambda cls: cls(3).fit(X, y).predict(X[0]),
           "y None": lambda cls: cls().fit(X, None),
           "y NaN": lambda cls: cls().fit(X, np.full(20, np.nan)),
           "y inf": lambda cls: cls().fit(X, np.full(20, np.inf)),
           "continuous y": lambda cls: cls().fit(X, X[:, 0]),
           "object y": lambda cls: cls().fit(X, y.astype(object)),
           "X 3d": lambda cls: cls().fit(X[:, :, None], y),
           "X strings": lambda cls: cls().fit(X.astype(str), y),
           "X inf": lambda cls: cls().fit(X * np.inf, y),
           "y too short": lambda cls: cls().fit(X, y[:5]),
           "y 3d": lambda cls: cls().fit(X, y[:, None, None]),
           "k = n without X": lambda cls: cls(20).fit(X, y).kneighbors(),
           "k > n": lambda cls: cls(21).fit(X, y).kneighbors(X)}
    for ours, theirs in ((KNeighborsClassifier, sk_neighbors.KNeighborsClassifier),
                         (KNeighborsRegressor, sk_neighbors.KNeighborsRegressor)):
        for name, call in bad.items():
            outcomes = []
            for cls in (ours, theirs):
                try:
                    call(cls)
                    outcomes.append(None)
                except Exception as exc:
                    outcomes.append(exc)
            if outcomes[1] is None:  # the regressor takes continuous and object targets
                assert outcomes[0] is None, (ours.__name__, name, outcomes[0])
                continue
            assert isinstance(outcomes[0], type(outcomes[1])), (ours.__name__, name, outcomes)
            # scikit-learn adds advice on NaN in X; the rest is word for word
            assert str(outcomes[1]).startswith(str(outcomes[0])), (ours.__name__, name, outcomes)


def test_not_fitted_error_is_sklearn_s_and_pickles():
    with pytest.raises(sklearn.exceptions.NotFittedError) as raised:
        KNeighborsClassifier().predict_proba([[0.0]])
    assert isinstance(raised.value, NotFittedError)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert type(copy) is type(raised.value) and copy.args == raised.value.args


def test_column_vector_y_warns_as_sklearn():
    X = np.random.default_rng(5).uniform(size=(30, 3))
    y = np.arange(30) % 3
    with pytest.warns(sklearn.exceptions.DataConversionWarning, match="A column-vector y was passed") as caught:
        clf = KNeighborsClassifier(3).fit(X, y[:, None])
    assert caught[0].filename == __file__  # it points at the caller's fit
    np.testing.assert_array_equal(clf.predict(X), KNeighborsClassifier(3).fit(X, y).predict(X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KNeighborsRegressor(3).fit(X, y[:, None])  # (n_samples, 1) is one output, as scikit-learn


def test_sparse_input_is_densified():
    sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(6)
    X, y = rng.uniform(size=(60, 4)), rng.integers(0, 3, 60)
    X[X < 0.6] = 0
    dense = KNeighborsClassifier(3).fit(X, y)
    # Rows of zeros tie, which scikit-learn breaks its own way: its distances, fastml's neighbours.
    distances = sk_neighbors.KNeighborsClassifier(3).fit(X, y).kneighbors(X)[0]
    for fmt in ("csr", "csc", "coo", "lil", "dok", "bsr", "dia"):
        for container in (sparse.csr_matrix, sparse.csr_array):
            Xs = container(X).asformat(fmt)
            fm = KNeighborsClassifier(3).fit(Xs, y)
            np.testing.assert_array_equal(fm.predict_proba(Xs), dense.predict_proba(X))
            np.testing.assert_array_equal(fm.kneighbors(Xs)[1], dense.kneighbors(X)[1])
            np.testing.assert_allclose(fm.kneighbors(Xs)[0], distances, rtol=1e-12)
    reg = KNeighborsRegressor(2).fit(torch.from_numpy(X).to_sparse(), torch.from_numpy(y * 1.0))
    np.testing.assert_array_equal(reg.predict(X), KNeighborsRegressor(2).fit(X, y * 1.0).predict(X))


def test_import_fastml_imports_neither_sklearn_nor_scipy():
    """Both are optional, and scikit-learn takes about a second to import: fastml.neighbors asks
    for them only where it needs them (tags, a NotFittedError, a warning)."""
    code = "import sys, fastml.neighbors; print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastml.__file__)))  # this fastml, however it was found
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"


def test_sklearn_check_estimator_passes():
    """scikit-learn's own estimator checks, every one, on both estimators."""
    from sklearn.utils.estimator_checks import check_estimator

    failures = []
    for estimator in (KNeighborsClassifier(), KNeighborsRegressor()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = check_estimator(estimator, on_fail=None)
        assert len(results) > 40, "check_estimator ran its checks"
        failures += [f"{type(estimator).__name__} {r['check_name']}: {r['exception']!r}"
                     for r in results if r["status"] == "failed"]
    assert not failures, "\n".join(failures)


def _multi_output_data(seed):
    """Jittered uniform points (no distance ties) and three outputs, one of them words (so y is
    strings, as numpy makes it)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(size=(60, 4)) + rng.normal(scale=1e-6, size=(60, 4))
    y = rng.integers(0, 3, (60, 3)).astype(str)
    y[:, 1] = np.array(["wolf", "dog", "fox", "owl"])[rng.integers(0, 4, 60)]
    return X[:45], y[:45], X[45:], y[45:]


@pytest.mark.parametrize("weights", ["uniform", "distance", None, lambda d: 1 / (1 + d)])
def test_multi_output_classifier_identical_to_sklearn(weights):
    X, y, X_test, y_test = _multi_output_data(7)
    for labels in (y, y[:, ::-1], (y == "1").astype(int)):  # words first, last; a multilabel indicator
        fm = KNeighborsClassifier(4, weights=weights).fit(X, labels)
        sk = sk_neighbors.KNeighborsClassifier(4, weights=weights).fit(X, labels)
        assert fm.outputs_2d_ and isinstance(fm.classes_, list) and len(fm.classes_) == 3
        for a, b in zip(fm.classes_, sk.classes_):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        predicted = fm.predict(X_test)
        assert predicted.shape == (15, 3) and predicted.dtype == sk.predict(X_test).dtype
        np.testing.assert_array_equal(predicted, sk.predict(X_test))
        np.testing.assert_array_equal(fm.predict(None), sk.predict(None))
        probas, sk_probas = fm.predict_proba(X_test), sk.predict_proba(X_test)
        assert isinstance(probas, list) and len(probas) == 3
        for a, b in zip(probas, sk_probas):
            np.testing.assert_allclose(a, b, rtol=1e-12)
    truth = (y_test == "1").astype(int)
    assert fm.score(X_test, truth) == sk.score(X_test, truth)  # subset accuracy
    assert fm.score(X_test, truth, sample_weight=np.arange(15)) == sk.score(X_test, truth, sample_weight=np.arange(15))
    # accuracy_score takes no multiclass multi-output y; neither does fastml.
    fm, sk = KNeighborsClassifier(4).fit(X, y), sk_neighbors.KNeighborsClassifier(4).fit(X, y)
    with pytest.raises(ValueError, match="multiclass-multioutput is not supported"):
        sk.score(X_test, y_test)
    with pytest.raises(ValueError, match="multiclass-multioutput is not supported"):
        fm.score(X_test, y_test)


def test_multi_output_classifier_takes_and_gives_tensors():
    X, _, X_test, _ = _multi_output_data(8)
    y = np.random.default_rng(8).integers(0, 4, (45, 2))
    fm = KNeighborsClassifier(3, weights="distance").fit(torch.from_numpy(X), torch.from_numpy(y))
    sk = sk_neighbors.KNeighborsClassifier(3, weights="distance").fit(X, y)
    predicted = fm.predict(torch.from_numpy(X_test))
    assert isinstance(predicted, torch.Tensor) and predicted.shape == (15, 2)
    np.testing.assert_array_equal(predicted.numpy(), sk.predict(X_test))
    probas = fm.predict_proba(torch.from_numpy(X_test))
    assert all(isinstance(p, torch.Tensor) for p in probas)
    for a, b in zip(probas, sk.predict_proba(X_test)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12)
    with pytest.raises(ValueError, match="Unknown label type: continuous-multioutput"):
        KNeighborsClassifier().fit(X, np.random.default_rng(8).uniform(size=(45, 2)))


@pytest.mark.parametrize("weights", [None, "uniform", "distance", lambda d: d**-2])
def test_kneighbors_classifier_multioutput_as_sklearn_s_test(weights):
    """The logic of scikit-learn's test_KNeighborsClassifier_multioutput: each output fitted on
    its own gives the multi-output fit's predictions and probabilities."""
    rng = np.random.RandomState(0)
    X, y = rng.rand(50, 5), rng.randint(0, 3, (50, 3))
    X_train, X_test, y_train = X[:37], X[37:], y[:37]
    single = [KNeighborsClassifier(weights=weights).fit(X_train, y_train[:, o]) for o in range(3)]
    y_pred_so = np.vstack([knn.predict(X_test) for knn in single]).T
    knn_mo = KNeighborsClassifier(weights=weights).fit(X_train, y_train)
    y_pred_mo = knn_mo.predict(X_test)
    assert y_pred_mo.shape == y_pred_so.shape == (13, 3)
    np.testing.assert_array_equal(y_pred_mo, y_pred_so)
    probas = knn_mo.predict_proba(X_test)
    assert len(probas) == 3
    for proba_mo, knn in zip(probas, single):
        np.testing.assert_array_equal(proba_mo, knn.predict_proba(X_test))


def test_multi_output_tags_as_sklearn():
    from sklearn.utils import get_tags

    for fm, sk in ((KNeighborsClassifier(), sk_neighbors.KNeighborsClassifier()),
                   (KNeighborsRegressor(), sk_neighbors.KNeighborsRegressor())):
        assert get_tags(fm).target_tags.multi_output == get_tags(sk).target_tags.multi_output is True
    assert get_tags(KNeighborsClassifier()).classifier_tags.multi_label is True


def test_neighbours_all_of_zero_weight_are_refused_as_sklearn():
    X, y = np.random.default_rng(0).random((12, 2)), np.arange(12) % 3
    zero = lambda d: np.zeros_like(d) if isinstance(d, np.ndarray) else torch.zeros_like(d)  # noqa: E731
    for method in ("predict", "predict_proba"):
        with pytest.raises(ValueError, match="All neighbors of some sample is getting zero weights"):
            getattr(sk_neighbors.KNeighborsClassifier(3, weights=zero).fit(X, y), method)(X[:2])
        with pytest.raises(ValueError, match="All neighbors of some sample is getting zero weights"):
            getattr(KNeighborsClassifier(3, weights=zero).fit(X, y), method)(X[:2])


# --- what the kernels do not compute: scikit-learn's estimator answers, as its own would -------

@pytest.mark.parametrize("Estimator", [KNeighborsClassifier, KNeighborsRegressor])
@pytest.mark.parametrize("params", [dict(metric="cosine"), dict(metric="haversine", algorithm="ball_tree"),
                                    dict(metric="minkowski", p=3, metric_params={"w": np.arange(1.0, 3.0)}),
                                    dict(metric=lambda a, b: float(np.abs(a - b).sum()), weights="distance")],
                         ids=["cosine", "haversine", "metric_params", "callable"])
def test_metrics_beyond_the_kernels_answer_as_sklearn(Estimator, params):
    rng = np.random.default_rng(0)
    X, query = rng.random((40, 2)), rng.random((7, 2))
    y = rng.integers(0, 3, 40) if Estimator is KNeighborsClassifier else rng.random(40)
    ours = Estimator(4, **params).fit(X, y)
    twin = getattr(sk_neighbors, Estimator.__name__)(4, **params).fit(X, y)
    np.testing.assert_array_equal(ours.predict(query), twin.predict(query))
    for a, b in zip(ours.kneighbors(query), twin.kneighbors(query)):
        np.testing.assert_array_equal(a, b)
    assert ours.effective_metric_ == twin.effective_metric_ and ours._fit_method == twin._fit_method
    ours.set_params(n_neighbors=2)  # after fit, as scikit-learn's: the next query uses it
    assert ours.kneighbors(query)[0].shape == (7, 2)
    assert repr(ours) == repr(Estimator(2, **params))


def test_a_refit_within_the_kernels_leaves_sklearns_fit_behind():
    X, y = np.random.default_rng(1).random((20, 3)), np.arange(20) % 2
    model = KNeighborsClassifier(3, metric="cosine").fit(X, y)
    model.set_params(metric="euclidean").fit(X, y)
    assert "_sklearn_fitted" not in vars(model) and model._fit_method == "brute"
    twin = sk_neighbors.KNeighborsClassifier(3).fit(X, y)
    np.testing.assert_array_equal(model.kneighbors(X[:5])[1], twin.kneighbors(X[:5])[1])


def test_precomputed_distances_and_cross_validation():
    from sklearn.metrics import pairwise_distances
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(2)
    X, y = rng.random((30, 2)), rng.integers(0, 3, 30)
    D = pairwise_distances(X)
    for Estimator in (KNeighborsClassifier, KNeighborsRegressor):
        # cross-validation splits a precomputed matrix on both axes (the estimator's pairwise tag)
        np.testing.assert_array_equal(cross_val_score(Estimator(), X, y),
                                      cross_val_score(Estimator(metric="precomputed"), D, y))


@pytest.mark.parametrize("Estimator", [KNeighborsClassifier, KNeighborsRegressor])
def test_a_semimetric_warns_as_sklearn(Estimator):
    X, y = np.random.default_rng(3).random((10, 2)), np.ones(10)
    with pytest.warns(UserWarning, match="for 0 < p < 1, Minkowski metrics are not distance metrics"):
        model = Estimator(p=0.5).fit(X, y)
    assert model._fit_method == "brute"
    with pytest.raises(ValueError, match="does not support 0 < p < 1 for the Minkowski metric"):
        Estimator(p=0.5, algorithm="kd_tree").fit(X, y)


@pytest.mark.parametrize("algorithm", ["kd_tree", "ball_tree"])
def test_a_tree_algorithm_refuses_sparse_queries_as_sklearn(algorithm):
    from scipy import sparse

    X, y = np.random.default_rng(4).random((5, 5)), np.array([0, 1, 0, 1, 0])
    model = KNeighborsClassifier(1, algorithm=algorithm).fit(X, y)
    with pytest.raises(ValueError, match=f"{algorithm} does not work with sparse matrices"):
        model.predict(sparse.csr_matrix(X))
    KNeighborsClassifier(1).fit(X, y).predict(sparse.csr_matrix(X))  # brute force takes them (densified)


@pytest.mark.parametrize("mode", ["connectivity", "distance"])
@pytest.mark.parametrize("X_given", [True, False], ids=["queries", "training_points"])
def test_kneighbors_graph_is_sklearns(mode, X_given):
    rng = np.random.default_rng(5)
    X, y, query = rng.random((25, 3)), rng.integers(0, 2, 25), rng.random((6, 3))
    ours = KNeighborsClassifier(3).fit(X, y).kneighbors_graph(query if X_given else None, mode=mode)
    twin = sk_neighbors.KNeighborsClassifier(3).fit(X, y).kneighbors_graph(query if X_given else None, mode=mode)
    assert ours.format == "csr" and ours.shape == twin.shape and ours.dtype == twin.dtype
    np.testing.assert_allclose(ours.toarray(), twin.toarray(), rtol=1e-12)
    with pytest.raises(ValueError, match="Unsupported mode"):
        KNeighborsClassifier(3).fit(X, y).kneighbors_graph(query, mode="weights")


def test_big_endian_arrays_as_scikit_learn_takes_them():
    """numpy data in the other byte order (read from a file written elsewhere): scikit-learn takes
    it; torch.from_numpy refuses it, so the estimators convert it first."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(40, 3))
    y = np.arange(40) % 3
    Xb, yb = X.astype(">f8"), y.astype(">i8")
    ours = KNeighborsClassifier(n_neighbors=4).fit(Xb, yb)
    theirs = sk_neighbors.KNeighborsClassifier(n_neighbors=4).fit(Xb, yb)
    np.testing.assert_array_equal(ours.predict(Xb), theirs.predict(Xb))
    distances, indices = ours.kneighbors(Xb)
    expected_distances, expected_indices = theirs.kneighbors(Xb)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(indices, expected_indices)
