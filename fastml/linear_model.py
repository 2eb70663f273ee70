"""Linear regression as the course trains it, behind scikit-learn's estimator interface.

>>> model = fastml.linear_model.LinearRegression(lr=0.03, batch_size=10, epochs=3).fit(X, y)
>>> model.coef_, model.intercept_, model.loss_history_
>>> model.predict(X_new), model.score(X, y)

``solver="sgd"`` is the course's minibatch SGD: weights initialised from N(0, 0.01²) and the bias
at zero, then per epoch a fresh random order and the whole minibatch loop in ONE compiled kernel
call (``fastml.ops.linear_mse.sgd_epoch``: C++ / numba on the CPU, Triton on the GPU), with the
course's update ``w -= lr * summed_gradient / batch_size``. ``solver="lstsq"`` is the closed form.
The default, ``solver="auto"``, is SGD where any of ``lr``, ``batch_size``, ``epochs`` is given,
and otherwise the closed form, as scikit-learn's ``LinearRegression`` fits (it takes that
class's parameters too: ``copy_X``, ``tol``, ``n_jobs``, ``positive``, and ``sample_weight``).

A closed-form fit of data that is not a torch tensor (numpy arrays, pandas frames, scipy's sparse
matrices), with no ``dtype`` asked for, is scikit-learn's own computation, where scikit-learn is
installed: no fastml kernel takes part in it, and the fit is then scikit-learn's in every respect
(feature names, ``rank_`` and ``singular_``, dtypes, errors and warnings). fastml computes the
closed form of tensors, on their device, and every SGD fit.

numpy arrays (or lists) in → numpy out; torch tensors in → tensors out, on the input's device,
where the work also runs.

Parameters are checked at ``fit``, as scikit-learn's estimators check them (its ``clone``,
``set_params`` and grid searches set them unchecked): a bad one raises ``InvalidArgumentError``
there. Bad data is refused with scikit-learn's messages (its ``check_estimator`` passes), also as
``InvalidArgumentError`` (a ValueError and a TypeError); predicting before ``fit`` raises
``NotFittedError``, where scikit-learn is installed also an instance of scikit-learn's.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from fastml import functional
from fastml._sklearn_twin import twin as _twin
from fastml.data import InvalidArgumentError, _randperm
from fastml.neighbors import UndefinedMetricWarning, _is_sparse
from fastml.ops import linear_mse as _linear_mse_op

__all__ = ["InvalidArgumentError", "LinearRegression", "NotFittedError"]

SOLVERS = ("auto", "sgd", "lstsq")
SGD_DEFAULTS = {"lr": 0.03, "batch_size": 10, "epochs": 3}  # the course's, where solver="sgd" leaves them None
_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64, "float32": torch.float32,
           "float64": torch.float64}
_NAME = "LinearRegression"


class NotFittedError(ValueError, AttributeError):
    """The estimator is used before ``fit`` (a ValueError and an AttributeError, as scikit-learn's).
    Where scikit-learn is installed, the error raised is also an instance of scikit-learn's class."""


def _sparse_error(name: str, tensor: bool) -> InvalidArgumentError:
    convert = "'.to_dense()' to convert to a dense tensor" if tensor else \
        "'.toarray()' to convert to a dense numpy array"
    return InvalidArgumentError(f"Sparse data was passed for {name}, but dense data is required. Use {convert}.")


def _as_tensor(name: str, value) -> tuple[torch.Tensor, bool]:
    """→ (tensor, was_a_tensor). numpy arrays and lists become CPU tensors, sharing memory where
    they can. As scikit-learn's check_array: Python objects are converted to float64 (those that
    are not numbers refused), strings, complex numbers and sparse matrices refused."""
    if isinstance(value, torch.Tensor):
        t, is_tensor = value.detach(), True
        if t.layout != torch.strided:
            raise _sparse_error(name, tensor=True)
    else:
        if _is_sparse(value):
            raise _sparse_error(name, tensor=False)
        try:
            array = np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise InvalidArgumentError(f"{name} must be a numpy array or a torch tensor of numbers ({exc})") from None
        if array.dtype.kind in "USV":
            raise InvalidArgumentError("dtype='numeric' is not compatible with arrays of bytes/strings."
                                       "Convert your data to numeric values explicitly instead.")
        if array.dtype == object:
            try:
                array = array.astype(np.float64)
            except (TypeError, ValueError) as exc:  # e.g. "float() argument must be a string or a real number"
                raise InvalidArgumentError(f"{name} holds objects that are not numbers: {exc}") from None
        if array.dtype.kind not in "biufc":
            raise InvalidArgumentError(f"{name} must hold real numbers, got a numpy array of dtype {array.dtype}")
        if not array.dtype.isnative:  # big-endian data, which scikit-learn takes and torch.from_numpy refuses
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.writeable:  # (a memmap, a pandas copy-on-write column): torch would warn
            array = array.copy()
        t, is_tensor = torch.from_numpy(np.ascontiguousarray(array)), False
    if t.is_complex():
        raise InvalidArgumentError(f"Complex data not supported: {name} has dtype {t.dtype}.")
    return t, is_tensor


def _check_X(X: torch.Tensor) -> None:
    """X must be 2-D with samples and features, in scikit-learn's words (its checks match them)."""
    if X.dim() > 2:
        raise InvalidArgumentError(f"Found array with dim {X.dim()}, while dim <= 2 is required by {_NAME}.")
    if X.dim() < 2:
        raise InvalidArgumentError(
            f"Expected 2D array, got {'scalar' if X.dim() == 0 else '1D'} array instead:\narray={X.cpu().numpy()}.\n"
            "Reshape your data either using array.reshape(-1, 1) if your data has a single feature or "
            "array.reshape(1, -1) if it contains a single sample.")
    for count, what in ((X.shape[0], "sample(s)"), (X.shape[1], "feature(s)")):
        if count == 0:
            raise InvalidArgumentError(f"Found array with 0 {what} (shape={tuple(X.shape)}) while a minimum of 1 is "
                                       f"required by {_NAME}.")


def _check_finite(name: str, t: torch.Tensor) -> None:
    """As scikit-learn's: "Input X contains NaN." or "... contains infinity or a value too large
    for dtype('float64')." (the dtype the estimator computes in)."""
    if not bool(torch.isfinite(t).all()):
        if bool(torch.isnan(t).any()):
            raise InvalidArgumentError(f"Input {name} contains NaN.")
        dtype = np.dtype(str(t.dtype).removeprefix("torch."))
        raise InvalidArgumentError(f"Input {name} contains infinity or a value too large for {dtype!r}.")


def _inconsistent(n_X: int, n_y: int) -> InvalidArgumentError:
    return InvalidArgumentError(f"Found input variables with inconsistent numbers of samples: [{n_X}, {n_y}]")


def _to_user(t: torch.Tensor, as_tensor: bool):
    return t if as_tensor else t.cpu().numpy()


def _sample_weights(sample_weight, n: int) -> torch.Tensor:
    """sample_weight as float64 CPU weights of the n samples: a number weighs every sample alike;
    otherwise one weight per sample. Finite, none negative, not all zero, in scikit-learn's words."""
    weights, _ = _as_tensor("sample_weight", sample_weight)
    weights = weights.to("cpu", torch.float64)
    if np.ndim(sample_weight) == 0:  # (_as_tensor gives a number's array one dimension)
        weights = weights.reshape(()).expand(n)
    elif weights.shape != (n,):
        raise InvalidArgumentError(f"sample_weight.shape == {tuple(weights.shape)}, expected ({n},)!")
    _check_finite("sample_weight", weights)
    if bool((weights < 0).any()):
        raise InvalidArgumentError("Negative values in data passed to `sample_weight`.")
    if n and not bool(weights.any()):
        raise InvalidArgumentError("Sample weights must contain at least one non-zero number.")
    return weights


def _sklearn_linear_regression() -> type | None:
    """scikit-learn's LinearRegression, from the module that defines it (code that swaps the
    public name for fastml's must not make fastml hand a fit to itself), or None where
    scikit-learn is not installed (it is optional: imported on the path that needs it only)."""
    try:
        from sklearn.linear_model import _base
    except ImportError:
        return None
    return getattr(_base, "LinearRegression", None)


class LinearRegression:
    """Least-squares linear regression, y ≈ X @ coef_.T + intercept_.

    Parameters
    ----------
    solver : "sgd" (the course's minibatch SGD), "lstsq" (closed form, float64), or "auto" (the
        default): "sgd" where any of lr, batch_size, epochs is given, else "lstsq".
    lr : SGD learning rate, > 0 (None: 0.03).
    batch_size : SGD minibatch size, a positive int (the last minibatch of an epoch is shorter;
        its update still divides by ``batch_size``, as the course's ``sgd``). None: 10.
    epochs : passes over the data, a non-negative int (None: 3).
    fit_intercept : learn a bias (True) or fit through the origin.
    shuffle : a fresh random order every epoch (True, as the course) or the data's own order.
    dtype : the dtype training and prediction run in: torch.float32 / torch.float64 (or the
        strings). None: float64 for float64 inputs, else float32.
    random_state : an int seed: every ``fit`` draws the same initial weights and orders (or a
        numpy RandomState, as scikit-learn's tools pass one, which gives the seed).
    generator : a torch.Generator to draw from (its state advances across fits); at most one of
        ``random_state`` and ``generator``. With neither, torch's global generator is used, so
        ``torch.manual_seed`` makes a fit reproducible, as in the course.
    copy_X, tol, n_jobs, positive : scikit-learn's LinearRegression's. fastml's own fits never
        write X (``copy_X=False`` lets scikit-learn's fit centre it in place, as its own does);
        singular values below ``tol`` times the largest count as zero in the closed form;
        ``positive=True`` (non-negative coefficients) is scikit-learn's fit and needs it.

    The parameters are stored as given and checked at ``fit`` (scikit-learn's convention).

    Attributes (after ``fit``; numpy for numpy input, tensors on the input's device for tensors)
    ----------
    coef_ : (n_features,) for 1-D y, (n_targets, n_features) for 2-D y.
    intercept_ : a float (0-dim tensor for tensor input) for 1-D y, (n_targets,) for 2-D y; zero
        when ``fit_intercept=False``.
    loss_history_ : list of floats: the course's training loss, mean over all examples of
        (ŷ − y)² / 2, after each epoch ("sgd"), or once for the solution ("lstsq").
    n_features_in_ : number of features seen by ``fit``.
    """

    def __init__(self, solver: str = "auto", lr: float | None = None, batch_size: int | None = None,
                 epochs: int | None = None, fit_intercept: bool = True, shuffle: bool = True, dtype=None,
                 random_state: int | None = None, generator: torch.Generator | None = None, *, copy_X: bool = True,
                 tol: float = 1e-6, n_jobs: int | None = None, positive: bool = False) -> None:
        self.solver, self.lr, self.batch_size, self.epochs = solver, lr, batch_size, epochs
        self.fit_intercept, self.shuffle, self.dtype = fit_intercept, shuffle, dtype
        self.random_state, self.generator = random_state, generator
        self.copy_X, self.tol, self.n_jobs, self.positive = copy_X, tol, n_jobs, positive

    # -- scikit-learn's parameter protocol (so sklearn.base.clone and grid searches work) --------

    _estimator_type = "regressor"

    def __sklearn_tags__(self):
        """What scikit-learn's tools (cross_val_score, Pipeline, GridSearchCV, check_estimator)
        ask of an estimator since scikit-learn 1.6: a regressor of X (sparse too, in the closed
        form), y of one or several targets. Built on demand: scikit-learn is optional here."""
        from sklearn.utils import InputTags, RegressorTags, Tags, TargetTags

        sparse = self._solver() == "lstsq"  # (scikit-learn's fit takes sparse X; the course's SGD does not)
        return Tags(estimator_type="regressor", input_tags=InputTags(sparse=sparse),
                    target_tags=TargetTags(required=True, multi_output=True), regressor_tags=RegressorTags())

    _PARAMS = ("solver", "lr", "batch_size", "epochs", "fit_intercept", "shuffle", "dtype", "random_state",
               "generator", "copy_X", "tol", "n_jobs", "positive")

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params) -> LinearRegression:
        """Sets parameters by name (unchecked until ``fit``, as scikit-learn's); an unknown name
        raises, as scikit-learn's BaseEstimator, before any is set."""
        for name in params:
            if name not in self._PARAMS:
                raise InvalidArgumentError(f"Invalid parameter {name!r} for estimator {_NAME}. "
                                           f"Valid parameters are: {list(self._PARAMS)!r}.")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = dict(zip(self._PARAMS, LinearRegression.__init__.__defaults__))
        defaults.update(LinearRegression.__init__.__kwdefaults__)
        changed = [f"{name}={getattr(self, name)!r}" for name in self._PARAMS
                   if getattr(self, name) is not defaults[name] and getattr(self, name) != defaults[name]]
        return f"LinearRegression({', '.join(changed)})"

    def _solver(self) -> str:
        """The solver a fit runs: "auto" resolved."""
        if self.solver != "auto":
            return self.solver
        return "sgd" if any(getattr(self, name) is not None for name in SGD_DEFAULTS) else "lstsq"

    def _sgd_setting(self, name: str):
        value = getattr(self, name)
        return SGD_DEFAULTS[name] if value is None else value

    def _validate_params(self) -> None:
        if not isinstance(self.solver, str) or self.solver not in SOLVERS:
            raise InvalidArgumentError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {self.solver!r}")
        lr = self._sgd_setting("lr")
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (lr > 0 and math.isfinite(lr)):
            raise InvalidArgumentError(f"lr must be a positive finite number, got {lr!r}")
        for name, minimum in (("batch_size", 1), ("epochs", 0)):
            value = self._sgd_setting(name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                kind = "a positive int" if minimum else "a non-negative int"
                raise InvalidArgumentError(f"{name} must be {kind}, got {value!r}")
        for name in ("fit_intercept", "shuffle", "copy_X", "positive"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InvalidArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}")
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
            raise InvalidArgumentError(f"tol must be a non-negative number, got {tol!r}")
        if self.n_jobs is not None and (isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, numbers.Integral)):
            raise InvalidArgumentError(f"n_jobs must be None or an int, got {self.n_jobs!r}")
        if self.positive and self._solver() == "sgd":
            raise InvalidArgumentError("positive=True needs the closed form: solver='lstsq' (or 'auto' without "
                                       "lr, batch_size and epochs)")
        if self.dtype is not None and (not isinstance(self.dtype, (torch.dtype, str)) or self.dtype not in _DTYPES):
            raise InvalidArgumentError(f"dtype must be None, torch.float32 or torch.float64, got {self.dtype!r}")
        rs = self.random_state
        if rs is not None and not isinstance(rs, np.random.RandomState) and (
                isinstance(rs, bool) or not isinstance(rs, numbers.Integral) or rs < 0):
            raise InvalidArgumentError(f"random_state must be None, a non-negative int or a numpy RandomState, "
                                       f"got {rs!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise InvalidArgumentError(f"generator must be a torch.Generator or None, "
                                       f"got {type(self.generator).__name__}")
        if rs is not None and self.generator is not None:
            raise InvalidArgumentError("give at most one of random_state and generator")

    # -- fitting ---------------------------------------------------------------------------------

    def fit(self, X, y, sample_weight=None) -> LinearRegression:
        """Fit on X (n_samples, n_features) and y (n_samples,) or (n_samples, n_targets), each
        sample weighted by ``sample_weight`` (n_samples,) or a number, in the closed form only.
        Returns self."""
        self._validate_params()
        solver = self._solver()
        self.__dict__.pop("_sklearn_fitted", None)
        for name in [name for name in vars(self) if name.endswith("_")]:
            delattr(self, name)  # what an earlier fit left (feature_names_in_, rank_, ...)
        if solver == "lstsq" and self.dtype is None and (self.positive or not isinstance(X, torch.Tensor)):
            theirs = _sklearn_linear_regression()
            if theirs is not None:
                return self._fit_by_sklearn(theirs, X, y, sample_weight)
        if self.positive:
            raise InvalidArgumentError("positive=True is scikit-learn's fit (a non-negative least squares): it needs "
                                       "scikit-learn installed, and no dtype asked for")
        if sample_weight is not None and solver == "sgd":
            raise InvalidArgumentError("sample_weight is taken by the closed form only: solver='lstsq' (or 'auto' "
                                       "without lr, batch_size and epochs)")
        if y is None:
            raise InvalidArgumentError(f"This {_NAME} estimator requires y to be passed, but the target y is None.")
        X, x_is_tensor = _as_tensor("X", X)
        _check_X(X)
        y, _ = _as_tensor("y", y)
        if y.dim() not in (1, 2):
            raise InvalidArgumentError(f"y must be 1-D (n_samples,) or 2-D (n_samples, n_targets), "
                                       f"got shape {tuple(y.shape)}")
        n, d = X.shape
        if y.shape[0] != n:
            raise _inconsistent(n, y.shape[0])
        if y.dim() == 2 and y.shape[1] == 0:
            raise InvalidArgumentError(f"y has 0 targets (shape {tuple(y.shape)})")
        dtype = _DTYPES[self.dtype] if self.dtype is not None else (
            torch.float64 if X.dtype == torch.float64 else torch.float32)
        X = X.to(dtype=dtype).contiguous()
        Y = y.to(device=X.device, dtype=dtype).reshape(n, -1).contiguous()
        _check_finite("X", X)
        _check_finite("y", Y)
        weights = None if sample_weight is None else _sample_weights(sample_weight, n)

        with torch.no_grad():
            if solver == "sgd":
                weight, bias, history = self._fit_sgd(X, Y)
            else:
                weight, bias, history = self._fit_lstsq(X, Y, weights)

        single = y.dim() == 1
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        self.coef_ = _to_user(weight[0] if single else weight, x_is_tensor)
        intercept = _to_user(bias[0] if single else bias, x_is_tensor)
        self.intercept_ = float(intercept) if single and not x_is_tensor else intercept
        self.loss_history_ = history
        self.n_features_in_ = d
        if "singular_" in self.__dict__:
            self.singular_ = _to_user(self.singular_, x_is_tensor)
        return self

    def _fit_by_sklearn(self, theirs: type, X, y, sample_weight) -> LinearRegression:
        """The closed-form fit by scikit-learn's LinearRegression (see the module docstring), its
        fitted attributes then this estimator's, with the course's loss of the solution. Tensors
        (``positive=True`` asks for scikit-learn's fit of them too) go to it as CPU arrays, and
        its arrays come back as tensors on X's device."""
        device = X.device if isinstance(X, torch.Tensor) else None
        X, y, sample_weight = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
                               for v in (X, y, sample_weight))
        estimator = theirs(fit_intercept=self.fit_intercept, copy_X=self.copy_X, tol=self.tol, n_jobs=self.n_jobs,
                           positive=self.positive)
        estimator.fit(X, y, sample_weight=sample_weight)
        for name, value in vars(estimator).items():
            if name.endswith("_") and not name.startswith("__"):
                as_tensor = device is not None and isinstance(value, (np.ndarray, np.floating)) and name != \
                    "feature_names_in_"
                setattr(self, name, torch.as_tensor(value, device=device) if as_tensor else value)
        residual = np.asarray(estimator.predict(X), dtype=np.float64) - np.asarray(y, dtype=np.float64)
        self.loss_history_ = [float(np.mean(np.square(residual))) / 2]
        self._sklearn_fitted = estimator
        return self

    def _generator(self) -> torch.Generator | None:
        if self.generator is not None:
            return self.generator
        rs = self.random_state
        if isinstance(rs, np.random.RandomState):
            return torch.Generator().manual_seed(int(rs.randint(np.iinfo(np.int32).max)))
        if rs is not None:
            return torch.Generator().manual_seed(int(rs))
        return None

    def _fit_sgd(self, X: torch.Tensor, Y: torch.Tensor):
        n, d = X.shape
        k = Y.shape[1]
        gen = self._generator()
        draw_device = gen.device if gen is not None else torch.device("cpu")
        # The course's initialisation: w ~ N(0, 0.01²), b = 0.
        weight = torch.normal(0.0, 0.01, (k, d), generator=gen, device=draw_device, dtype=X.dtype).to(X.device)
        bias = X.new_zeros(k) if self.fit_intercept else None
        history = []
        lr, batch_size = float(self._sgd_setting("lr")), int(self._sgd_setting("batch_size"))
        for _ in range(self._sgd_setting("epochs")):
            order = _randperm(n, X.device, gen) if self.shuffle else torch.arange(n, device=X.device)
            _linear_mse_op.sgd_epoch(X, Y, order, weight, bias, lr, batch_size)
            history.append(self._loss(X, Y, weight, bias))
        if history and not math.isfinite(history[-1]):
            warnings.warn(f"SGD diverged (training loss {history[-1]}): lower lr (now {lr}) or scale X",
                          RuntimeWarning, stacklevel=3)
        return weight, bias, history

    def _fit_lstsq(self, X: torch.Tensor, Y: torch.Tensor, weights: torch.Tensor | None):
        # float64 on the CPU with LAPACK's SVD driver (as numpy.linalg.lstsq): exact for
        # rank-deficient X too, where the GPU's only driver (QR) is not. Centering X and y finds
        # the intercept without a ones column (better conditioned when features have large means)
        # and gives scikit-learn's minimum-norm coefficients when X is rank-deficient.
        # Singular values below ``tol`` of the largest count as zero, as in scikit-learn's
        # (scipy's cond): LAPACK's default cutoff (machine epsilon) keeps nearly collinear
        # columns apart and returns huge coefficients of opposite signs. Sample weights as
        # scikit-learn's: weighted means, then each row scaled by its weight's square root.
        X64, Y64 = X.to("cpu", torch.float64), Y.to("cpu", torch.float64)
        if self.fit_intercept:
            if weights is None:
                x_mean, y_mean = X64.mean(0), Y64.mean(0)
            else:
                x_mean, y_mean = (weights @ X64) / weights.sum(), (weights @ Y64) / weights.sum()
            X64, Y64 = X64 - x_mean, Y64 - y_mean
        if weights is not None:
            root = weights.sqrt()[:, None]
            X64, Y64 = X64 * root, Y64 * root
        fitted = torch.linalg.lstsq(X64, Y64, rcond=float(self.tol), driver="gelsd")
        solution = fitted.solution  # (d, k)
        bias64 = y_mean - x_mean @ solution if self.fit_intercept else None
        self.rank_, self.singular_ = int(fitted.rank), fitted.singular_values.to(X.device)
        weight = solution.T.to(device=X.device, dtype=X.dtype).contiguous()
        bias = None if bias64 is None else bias64.to(device=X.device, dtype=X.dtype)
        return weight, bias, [self._loss(X, Y, weight, bias)]

    @staticmethod
    def _loss(X, Y, weight, bias) -> float:
        """The course's printed loss: mean over examples of (ŷ − y)² / 2."""
        return float(functional.linear_mse(X, weight, bias, Y, reduction="mean")) / 2

    # -- using the fit ---------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise _twin(NotFittedError)(f"This {_NAME} instance is not fitted yet. Call 'fit' with appropriate "
                                        "arguments before using this estimator.")

    def predict(self, X):
        """X (n_samples, n_features) → (n_samples,) or (n_samples, n_targets), as y in ``fit``:
        numpy for numpy input, a tensor on X's device for tensor input."""
        self._check_fitted()
        theirs = self.__dict__.get("_sklearn_fitted")
        if theirs is not None and not isinstance(X, torch.Tensor):
            return theirs.predict(X)
        X, x_is_tensor = _as_tensor("X", X)
        _check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise InvalidArgumentError(f"X has {X.shape[1]} features, but {_NAME} is expecting "
                                       f"{self.n_features_in_} features as input.")
        coef = torch.as_tensor(self.coef_)
        dtype = coef.dtype if coef.dtype in (torch.float32, torch.float64) else torch.float32
        X = X.to(dtype)
        _check_finite("X", X)
        weight = coef.to(device=X.device, dtype=dtype)
        bias = torch.as_tensor(self.intercept_, dtype=dtype).to(device=X.device)
        single = weight.dim() == 1
        with torch.no_grad():
            out = functional.linear(X, weight.reshape(-1, X.shape[1]), bias.reshape(-1))
        return _to_user(out.reshape(-1) if single else out, x_is_tensor)

    def score(self, X, y, sample_weight=None) -> float:
        """R² of ``predict(X)`` against y, as scikit-learn's ``r2_score`` (averaged uniformly over
        targets; a constant target scores 1.0 when predicted exactly, else 0.0), each sample
        weighted by ``sample_weight``."""
        theirs = self.__dict__.get("_sklearn_fitted")
        if theirs is not None and not isinstance(X, torch.Tensor):
            return theirs.score(X, y, sample_weight=sample_weight)
        pred, _ = _as_tensor("predict(X)", self.predict(X))
        y, _ = _as_tensor("y", y)
        if y.shape[0] != pred.shape[0]:
            raise _inconsistent(pred.shape[0], y.shape[0])
        _check_finite("y", y)  # (scikit-learn's r2_score refuses NaN and inf alike)
        y = y.to(device=pred.device, dtype=torch.float64).reshape(y.shape[0], -1)
        pred = pred.to(torch.float64).reshape(pred.shape[0], -1)
        if y.shape != pred.shape:
            raise InvalidArgumentError(f"y has {y.shape[1]} targets but the model predicts {pred.shape[1]}")
        if y.shape[0] < 2:
            warnings.warn(_twin(UndefinedMetricWarning)("R^2 score is not well-defined with less than two samples."),
                          stacklevel=2)
            return float("nan")
        w = y.new_ones(y.shape[0]) if sample_weight is None else \
            _sample_weights(sample_weight, y.shape[0]).to(y.device)
        w = w[:, None]
        ss_res = (w * (y - pred).square()).sum(0)
        ss_tot = (w * (y - (w * y).sum(0) / w.sum()).square()).sum(0)
        r2 = torch.where(ss_tot != 0, 1 - ss_res / torch.where(ss_tot != 0, ss_tot, 1.0),
                         (ss_res == 0).to(torch.float64))
        return float(r2.mean())
