"""k-nearest-neighbour estimators with scikit-learn's interface, on fastml.functional.knn.

``KNeighborsClassifier`` and ``KNeighborsRegressor`` take scikit-learn's constructor arguments
and methods (``fit``, ``predict``, ``predict_proba``, ``kneighbors``, ``score``,
``get_params`` / ``set_params``). The neighbours come from fastml's fused distance + top-k
kernels: exact distances, ties broken by the lower training index, no query × training matrix.

Inputs are numpy arrays (or lists) or torch tensors, on the CPU or a GPU; results come back as the
query's kind, on its device. The training data keep their floating dtype (float32 or float64;
other dtypes become float64), and queries are computed in it. ``algorithm``, ``leaf_size`` and
``n_jobs`` are accepted for compatibility: the search is always brute force on the kernels.
"""

from __future__ import annotations

import inspect
import math
import numbers

import numpy as np
import torch

from fastml import functional

__all__ = ["KNeighborsClassifier", "KNeighborsRegressor"]

# metric name → the p of a Minkowski distance (None: take the estimator's p).
_METRICS = {"euclidean": 2.0, "l2": 2.0, "manhattan": 1.0, "cityblock": 1.0, "l1": 1.0,
            "chebyshev": math.inf, "infinity": math.inf, "minkowski": None}


class NotFittedError(ValueError, AttributeError):
    """An estimator was used before ``fit`` (as scikit-learn's NotFittedError)."""


def _to_tensor(name: str, data, device=None, dtype=None) -> tuple[torch.Tensor, torch.device | None]:
    """(tensor, device of a torch input or None for numpy-like input)."""
    if isinstance(data, torch.Tensor):
        source = data.device
        t = data.detach()
    else:
        source = None
        array = np.asarray(data)
        if array.dtype == object:
            raise ValueError(f"{name} must be numeric, got an array of Python objects")
        # A copy torch owns: a numpy-backed tensor's storage cannot be resized, which the
        # Triton interpreter does to its arguments.
        t = torch.from_numpy(np.array(array, copy=True, order="C"))
    if dtype is not None:
        t = t.to(dtype)
    elif t.dtype not in (torch.float32, torch.float64):
        if t.is_complex():
            raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
        t = t.to(torch.float64)
    if device is not None:
        t = t.to(device)
    return t.contiguous(), source


def _check_finite(name: str, X: torch.Tensor) -> None:
    if X.numel() and not bool(torch.isfinite(X).all()):
        what = "NaN" if bool(torch.isnan(X).any()) else "infinity or a value too large"
        raise ValueError(f"Input {name} contains {what}.")


def _check_2d(name: str, X: torch.Tensor, estimator: str) -> None:
    if X.dim() != 2:
        raise ValueError(f"Expected a 2D array for {name}, got {X.dim()}D array of shape {tuple(X.shape)} instead: "
                         "reshape your data with X.reshape(-1, 1) for a single feature or X.reshape(1, -1) "
                         "for a single sample.")
    if X.shape[0] == 0:
        raise ValueError(f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
                         f"required by {estimator}.")
    if X.shape[1] == 0:
        raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
                         f"required by {estimator}.")


def _back(t: torch.Tensor, device: torch.device | None):
    """A result in the query's kind: a tensor on its device, or a numpy array."""
    return t.to(device) if device is not None else t.cpu().numpy()


class _KNeighborsBase:
    _estimator_type = None

    def __init__(self, n_neighbors=5, *, weights="uniform", algorithm="auto", leaf_size=30, p=2,
                 metric="minkowski", metric_params=None, n_jobs=None):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.algorithm = algorithm
        self.leaf_size = leaf_size
        self.p = p
        self.metric = metric
        self.metric_params = metric_params
        self.n_jobs = n_jobs

    # ------------------------------------------------------------ scikit-learn's parameter API

    @classmethod
    def _param_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                                 f"Valid parameters are: {valid!r}.")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{name}={value!r}" for name, value in self.get_params().items()
                   if not (value is defaults.get(name) or value == defaults.get(name))]
        return f"{type(self).__name__}({', '.join(changed)})"

    # ------------------------------------------------------------------------- checks

    def _norm(self) -> float:
        metric = self.metric
        if not isinstance(metric, str) or metric not in _METRICS:
            raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
        if _METRICS[metric] is not None:
            return _METRICS[metric]
        p = self.p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
            raise ValueError(f"p must be a positive number (p = 2: euclidean, 1: manhattan), got {p!r}")
        return float(p)

    def _check_params(self) -> None:
        k = self.n_neighbors
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0):
            raise ValueError(f"n_neighbors must be a positive integer, got {k!r}")
        if not (self.weights in ("uniform", "distance") or self.weights is None or callable(self.weights)):
            raise ValueError(f"weights must be 'uniform', 'distance' or a callable, got {self.weights!r}")
        self._norm()

    def _check_fitted(self) -> None:
        if not hasattr(self, "_fit_X"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                                 "appropriate arguments before using this estimator.")

    def _fit_data(self, X) -> None:
        self._check_params()
        X, _ = _to_tensor("X", X)
        _check_2d("X", X, type(self).__name__)
        _check_finite("X", X)
        self._fit_X = X
        self.n_features_in_ = X.shape[1]
        self.n_samples_fit_ = X.shape[0]
        self.effective_metric_ = "minkowski" if self.metric == "minkowski" else self.metric
        self.effective_metric_params_ = dict(self.metric_params or {})

    def _queries(self, X) -> tuple[torch.Tensor, torch.device | None]:
        Xq, device = _to_tensor("X", X, device=self._fit_X.device, dtype=self._fit_X.dtype)
        _check_2d("X", Xq, type(self).__name__)
        if Xq.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {Xq.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")
        _check_finite("X", Xq)
        return Xq, device

    # ------------------------------------------------------------------------ neighbours

    def _neighbours(self, X, n_neighbors):
        """(distances, indices, device of a torch query or None): as ``kneighbors``, in tensors."""
        self._check_fitted()
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
            raise ValueError(f"Expected n_neighbors > 0. Got {k!r}")
        k = int(k)
        self_query = X is None
        if self_query:
            Xq, device = self._fit_X, None
            k_search = k + 1  # each training point finds itself too, which is then left out
        else:
            Xq, device = self._queries(X)
            k_search = k
        if k_search > self.n_samples_fit_:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k_search}, "
                             f"n_samples_fit = {self.n_samples_fit_}, n_samples = {Xq.shape[0]}")
        distances, indices = functional.knn(Xq, self._fit_X, k_search, self._norm())
        if self_query:
            # As scikit-learn: drop the point itself; where duplicates hide it, drop the first.
            rows = torch.arange(Xq.shape[0], device=indices.device)
            keep = indices != rows[:, None]
            keep[keep.all(dim=1), 0] = False
            distances = distances[keep].reshape(-1, k)
            indices = indices[keep].reshape(-1, k)
        return distances, indices, device

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """The n_neighbors (default: the estimator's) nearest training points of each row of X
        (default: of each training point, leaving the point itself out): (distances, indices),
        both (n_queries, n_neighbors), ascending; or only the indices."""
        distances, indices, device = self._neighbours(X, n_neighbors)
        if return_distance:
            return _back(distances, device), _back(indices, device)
        return _back(indices, device)

    def _weights(self, distances: torch.Tensor, device) -> torch.Tensor | None:
        """Per-neighbour weights (None: uniform). Under "distance", 1 / distance, except that a
        query at distance 0 from some training points gives those weight 1 and the rest 0 (as
        scikit-learn)."""
        if self.weights in ("uniform", None):
            return None
        if self.weights == "distance":
            inverse = 1.0 / distances
            exact = torch.isinf(inverse)
            rows = exact.any(dim=1)
            inverse[rows] = exact[rows].to(inverse.dtype)
            return inverse
        given = self.weights(_back(distances, device))
        weights, _ = _to_tensor("weights", given, device=distances.device, dtype=distances.dtype)
        if weights.shape != distances.shape:
            raise ValueError(f"the weights callable must return an array of the distances' shape "
                             f"{tuple(distances.shape)}, got {tuple(weights.shape)}")
        return weights


class KNeighborsClassifier(_KNeighborsBase):
    """Classifier voting among the k nearest training points (scikit-learn's interface).

    >>> clf = fastml.neighbors.KNeighborsClassifier(n_neighbors=3).fit(X, y)
    >>> clf.predict(X_new), clf.predict_proba(X_new), clf.kneighbors(X_new)
    """

    _estimator_type = "classifier"

    def fit(self, X, y):
        """Remembers the training points X (n_samples, n_features) and their labels y
        (n_samples,), of any values; returns self."""
        self._fit_data(X)
        labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels.ravel()
        if labels.ndim != 1:
            raise ValueError(f"y must be 1-D (one label per sample), got shape {labels.shape}")
        if labels.shape[0] != self.n_samples_fit_:
            raise ValueError(f"Found input variables with inconsistent numbers of samples: "
                             f"[{self.n_samples_fit_}, {labels.shape[0]}]")
        self.classes_, codes = np.unique(labels, return_inverse=True)
        self.outputs_2d_ = False
        self._y = torch.from_numpy(codes.astype(np.int64)).to(self._fit_X.device)
        return self

    def _proba(self, X):
        distances, indices, device = self._neighbours(X, None)
        weights = self._weights(distances, device)
        labels = self._y[indices]
        votes = torch.ones_like(distances) if weights is None else weights
        proba = torch.zeros((indices.shape[0], len(self.classes_)), dtype=distances.dtype, device=distances.device)
        proba.scatter_add_(1, labels, votes)
        total = proba.sum(dim=1, keepdim=True)
        total[total == 0] = 1.0
        return proba / total, device

    def predict_proba(self, X):
        """Class probabilities (n_queries, n_classes), classes in the order of ``classes_``."""
        proba, device = self._proba(X)
        return _back(proba, device)

    def predict(self, X):
        """The most probable class of each query (ties: the first in ``classes_``)."""
        proba, device = self._proba(X)
        winners = proba.argmax(dim=1).cpu().numpy()
        labels = self.classes_[winners]
        if device is not None and labels.dtype != object and labels.dtype.kind in "biuf":
            return torch.from_numpy(labels).to(device)
        return labels

    def score(self, X, y, sample_weight=None) -> float:
        """Mean accuracy of ``predict(X)`` against y (weighted by sample_weight)."""
        predicted = self.predict(X)
        predicted = predicted.cpu().numpy() if isinstance(predicted, torch.Tensor) else predicted
        truth = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        return float(np.average(predicted == truth.ravel(), weights=sample_weight))


class KNeighborsRegressor(_KNeighborsBase):
    """Regressor averaging the targets of the k nearest training points (scikit-learn's
    interface); y may have several columns."""

    _estimator_type = "regressor"

    def fit(self, X, y):
        """Remembers the training points X (n_samples, n_features) and targets y (n_samples,) or
        (n_samples, n_outputs); returns self."""
        self._fit_data(X)
        targets, _ = _to_tensor("y", y, device=self._fit_X.device)
        if targets.dim() not in (1, 2) or targets.shape[0] != self.n_samples_fit_:
            raise ValueError(f"y must be (n_samples,) or (n_samples, n_outputs) with n_samples = "
                             f"{self.n_samples_fit_}, got shape {tuple(targets.shape)}")
        self._y = targets.to(self._fit_X.dtype)
        return self

    def predict(self, X):
        """The (weighted) mean target of each query's neighbours: (n_queries,) or
        (n_queries, n_outputs), as y."""
        distances, indices, device = self._neighbours(X, None)
        weights = self._weights(distances, device)
        targets = self._y[indices]  # (n_queries, k) or (n_queries, k, n_outputs)
        if weights is None:
            prediction = targets.mean(dim=1)
        else:
            w = weights if targets.dim() == 2 else weights[..., None]
            prediction = (targets * w).sum(dim=1) / w.sum(dim=1)
        return _back(prediction, device)

    def score(self, X, y, sample_weight=None) -> float:
        """R² of ``predict(X)`` against y, averaged uniformly over outputs."""
        predicted = self.predict(X)
        predicted = predicted.cpu().numpy() if isinstance(predicted, torch.Tensor) else np.asarray(predicted)
        truth = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, dtype=float)
        truth, predicted = truth.reshape(len(truth), -1), predicted.reshape(len(predicted), -1)
        w = np.ones(len(truth)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        mean = np.average(truth, axis=0, weights=w)
        residual = (w[:, None] * (truth - predicted) ** 2).sum(axis=0)
        total = (w[:, None] * (truth - mean) ** 2).sum(axis=0)
        scores = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), np.where(residual > 0, 0.0, 1.0))
        return float(scores.mean())
