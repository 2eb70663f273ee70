"""k-nearest-neighbour estimators with scikit-learn's interface, on fastml.functional.knn.

``KNeighborsClassifier`` and ``KNeighborsRegressor`` take scikit-learn's constructor arguments
and methods (``fit``, ``predict``, ``predict_proba``, ``kneighbors``, ``score``,
``get_params`` / ``set_params``). The neighbours come from fastml's fused distance + top-k
kernels: exact distances, ties broken by the lower training index, no query × training matrix.

Inputs are numpy arrays (or lists) or torch tensors, on the CPU or a GPU; results come back as the
query's kind, on its device. The training data keep their floating dtype (float32 or float64;
other dtypes become float64), and queries are computed in it. ``algorithm``, ``leaf_size`` and
``n_jobs`` are accepted for compatibility: the kernels' search is always brute force (a tree
algorithm still refuses sparse queries, as scikit-learn's trees do).

The kernels compute the Minkowski family (euclidean, manhattan, chebyshev, minkowski with p >= 1).
What they do not compute (another metric, a callable or "precomputed" one, metric_params, a
semimetric p < 1, training data given as a fitted scikit-learn neighbours object) ``fit`` hands
over to scikit-learn's estimator of the same name, where scikit-learn is installed: it then
answers, warns and raises as scikit-learn's own, fitted attributes included. Without
scikit-learn, or with a process_group, those settings raise.
scipy.sparse matrices and arrays (and sparse tensors) are taken too, densified: the kernels read
dense rows, so a sparse X costs n_samples × n_features values in memory. Bad input is refused
with scikit-learn's errors and messages (its ``check_estimator`` passes).

With ``process_group`` (a torch.distributed process group, e.g. ``torch.distributed.group.WORLD``
after ``init_process_group``), the training set is split across the group's ranks: each rank
``fit``s its own shard (of any size, an empty one as an (0, n_features) array, y of the other
shards' shape past the first dimension), and the estimator answers as one fitted on the
concatenation of the shards in rank order, ties included: training indices refer to that
concatenation, ``n_samples_fit_`` counts it, ``classes_`` is the union of the shards' labels.
``shard_sizes_`` and ``shard_offset_`` tell where each shard lies in it. Every rank must make the
same calls with the same queries and gets the same answers: each rank finds its shard's k best
for every query, the ranks exchange them (k distances, indices and targets per query and rank;
collectives on the training data's device, so gloo for CPU tensors, nccl for CUDA ones) and
merge them. A call that fails on one rank raises on all of them, so none waits in a collective.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
import warnings

import numpy as np
import torch
import torch.distributed as dist

from fastml import functional
from fastml._sklearn_twin import twin as _twin

__all__ = ["KNeighborsClassifier", "KNeighborsRegressor"]

# metric name → the p of a Minkowski distance (None: take the estimator's p).
_METRICS = {"euclidean": 2.0, "l2": 2.0, "manhattan": 1.0, "cityblock": 1.0, "l1": 1.0,
            "chebyshev": math.inf, "infinity": math.inf, "minkowski": None}


class NotFittedError(ValueError, AttributeError):
    """An estimator was used before ``fit`` (as scikit-learn's NotFittedError). Where
    scikit-learn is installed, the error raised is also an instance of scikit-learn's class."""


class DataConversionWarning(UserWarning):
    """Input was converted to the shape the estimator expects (as scikit-learn's
    DataConversionWarning). Where scikit-learn is installed, the warning issued is also an
    instance of scikit-learn's class."""


class UndefinedMetricWarning(UserWarning):
    """A score is not defined for the data given and NaN is returned (as scikit-learn's
    UndefinedMetricWarning). Where scikit-learn is installed, the warning issued is also an
    instance of scikit-learn's class."""


class InvalidParameterError(ValueError, TypeError):
    """A constructor argument outside what the estimator takes, found by ``fit`` (as
    scikit-learn's InvalidParameterError, which is both a ValueError and a TypeError). Where
    scikit-learn is installed, the error raised is also an instance of scikit-learn's class."""


# private attributes a fit by the kernels sets (besides the public ones, which end in "_")
_FITTED_PRIVATE = ("_fit_X", "_y", "_group", "_fit_method")


def _sklearn_neighbors():
    """scikit-learn's neighbors module, or None where scikit-learn is not installed (it is
    optional): imported on the path that needs it only, as it takes about a second."""
    try:
        from sklearn import neighbors
    except ImportError:
        return None
    return neighbors


def _is_sparse(data) -> bool:
    """Whether data is a scipy.sparse matrix or array, told by its class's module so that
    scipy (optional here) is not imported to ask."""
    return type(data).__module__.startswith("scipy.sparse")


def _numpy(name: str, data) -> np.ndarray:
    """Array-like data (a scipy.sparse matrix included) as a numpy array of numbers, as
    scikit-learn's check_array: Python objects are converted to float64 (a TypeError for those
    that are not numbers), strings and complex numbers refused."""
    if _is_sparse(data):
        # The kernels take dense rows, so a sparse matrix is densified (n_samples × n_features).
        data = data.toarray()
    array = np.asarray(data)
    if array.dtype.kind in "USV":
        raise ValueError("dtype='numeric' is not compatible with arrays of bytes/strings."
                         "Convert your data to numeric values explicitly instead.")
    if array.dtype.kind == "c":
        raise ValueError(f"Complex data not supported: {name} has dtype {array.dtype}.")
    if array.dtype == object:
        array = array.astype(np.float64)
    if not array.dtype.isnative:  # big-endian data, which scikit-learn takes and torch.from_numpy refuses
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _to_tensor(name: str, data, device=None, dtype=None) -> tuple[torch.Tensor, torch.device | None]:
    """(tensor, device of a torch input or None for numpy-like input)."""
    if isinstance(data, torch.Tensor):
        source = data.device
        t = data.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_complex():
            raise ValueError(f"Complex data not supported: {name} has dtype {t.dtype}.")
    else:
        source = None
        # A copy torch owns: a numpy-backed tensor's storage cannot be resized, which the
        # Triton interpreter does to its arguments.
        t = torch.from_numpy(np.array(_numpy(name, data), copy=True, order="C"))
    if dtype is not None:
        t = t.to(dtype)
    elif t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64)
    if device is not None:
        t = t.to(device)
    return t.contiguous(), source


def _check_finite(name: str, X: torch.Tensor | np.ndarray) -> None:
    """As scikit-learn's: "Input X contains NaN." or "... contains infinity or a value too large
    for dtype('float64')."."""
    lib = np if isinstance(X, np.ndarray) else torch
    if (X.size if lib is np else X.numel()) and not bool(lib.isfinite(X).all()):
        if bool(lib.isnan(X).any()):
            raise ValueError(f"Input {name} contains NaN.")
        dtype = X.dtype if lib is np else np.dtype(str(X.dtype).removeprefix("torch."))
        raise ValueError(f"Input {name} contains infinity or a value too large for {dtype!r}.")


def _over_2d(ndim: int, estimator: str) -> ValueError:
    return ValueError(f"Found array with dim {ndim}, while dim <= 2 is required by {estimator}.")


def _check_2d(name: str, X: torch.Tensor, estimator: str, min_samples: int = 1) -> None:
    """X must be 2-D with samples and features, in scikit-learn's words (its checks match them)."""
    if X.dim() > 2:
        raise _over_2d(X.dim(), estimator)
    if X.dim() < 2:
        raise ValueError(f"Expected 2D array, got {'scalar' if X.dim() == 0 else '1D'} array instead:\n"
                         f"array={X.cpu().numpy()}.\nReshape your data either using array.reshape(-1, 1) if "
                         "your data has a single feature or array.reshape(1, -1) if it contains a single sample.")
    if X.shape[0] < min_samples:
        raise ValueError(f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
                         f"required by {estimator}.")
    if X.shape[1] == 0:
        raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
                         f"required by {estimator}.")


def _back(t: torch.Tensor, device: torch.device | None):
    """A result in the query's kind: a tensor on its device, or a numpy array."""
    return t.to(device) if device is not None else t.cpu().numpy()


def _checked_group(group):
    """``group`` (a process_group parameter) if it can be used here, None for None."""
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group is set but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group(...) on every rank first (or leave "
                           "process_group=None for one process holding the whole reference set)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of process_group")
    return group


def _all_gather_object(group, obj) -> list:
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _all_gather(group, t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (of one shape on all ranks), in rank order."""
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, t.contiguous(), group=group)
    return gathered


def _agree(group, error: Exception | None, what: str, call: tuple[int, ...]) -> torch.Tensor:
    """Every rank's ``call`` (integers, as many on every rank) as a (world size, len(call))
    tensor, after raising on every rank of ``group`` if any rank met an error (its own error on
    that rank): no rank may go on to a collective that the others never join, which would hang
    until the group's timeout."""
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([error is not None, *call], dtype=torch.int64, device=device)
    gathered = torch.stack(_all_gather(group, mine)).cpu()
    if error is not None:
        raise error
    failed = gathered[:, 0].nonzero().flatten().tolist()
    if failed:
        raise RuntimeError(f"{what} failed on rank {failed[0]} of the process group (see that rank's error)")
    return gathered[:, 1:]


class _KNeighborsBase:
    _estimator_type = None
    _SAME_TARGETS = ""  # what every rank's y must have alike, as _describe's "outputs" says it

    def __init__(self, n_neighbors=5, *, weights="uniform", algorithm="auto", leaf_size=30, p=2,
                 metric="minkowski", metric_params=None, n_jobs=None, process_group=None):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.algorithm = algorithm
        self.leaf_size = leaf_size
        self.p = p
        self.metric = metric
        self.metric_params = metric_params
        self.n_jobs = n_jobs
        self.process_group = process_group

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

    def __sklearn_tags__(self):
        """scikit-learn (>= 1.6) reads what an estimator is and takes from these tags:
        ``is_classifier``, ``cross_val_score``, ``GridSearchCV`` and ``Pipeline`` ask for them.
        Built here, on demand, because scikit-learn is optional (and slow to import)."""
        from sklearn.utils import ClassifierTags, InputTags, RegressorTags, Tags, TargetTags

        classifier = self._estimator_type == "classifier"
        # Both take y of shape (n_samples, n_outputs) (the classifier one label per output, so a
        # multilabel indicator y too, as scikit-learn's, whose tags say multi_label).
        # Sparse X is taken (densified), as scikit-learn's KNeighbors* take it. A precomputed
        # metric takes X as distances between samples: pairwise, which tells cross-validation
        # to split both of its axes.
        return Tags(estimator_type=self._estimator_type,
                    input_tags=InputTags(sparse=True, pairwise=self.metric == "precomputed"),
                    target_tags=TargetTags(required=True, multi_output=True),
                    classifier_tags=ClassifierTags(multi_label=True) if classifier else None,
                    regressor_tags=None if classifier else RegressorTags())

    def __sklearn_clone__(self):
        """scikit-learn's ``clone``: an unfitted estimator with deep copies of the parameters,
        except process_group, which the copy shares (a handle on the ranks' communicator cannot
        be copied, and the copy is meant to run on the same ranks)."""
        params = {name: value if name == "process_group" else copy.deepcopy(value)
                  for name, value in self.get_params().items()}
        return type(self)(**params)

    # ------------------------------------------------------------------------- checks

    def _norm(self) -> float:
        metric = self.metric
        if not isinstance(metric, str) or metric not in _METRICS:
            raise _twin(InvalidParameterError)(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
        if _METRICS[metric] is not None:
            return _METRICS[metric]
        p = self.p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
            raise _twin(InvalidParameterError)(f"p must be a positive number (p = 2: euclidean, 1: manhattan), "
                                               f"got {p!r}")
        return float(p)

    def _check_params(self) -> None:
        k = self.n_neighbors
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0):
            raise _twin(InvalidParameterError)(f"n_neighbors must be a positive integer, got {k!r}")
        if not (self.weights in ("uniform", "distance") or self.weights is None or callable(self.weights)):
            raise _twin(InvalidParameterError)(f"weights must be 'uniform', 'distance' or a callable, got "
                                               f"{self.weights!r}")
        self._norm()

    def _check_fitted(self) -> None:
        if not hasattr(self, "_fit_X"):
            raise _twin(NotFittedError)(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' "
                                        "with appropriate arguments before using this estimator.")

    def _queries(self, X) -> tuple[torch.Tensor, torch.device | None]:
        if _is_sparse(X) and self.algorithm in ("kd_tree", "ball_tree"):  # scikit-learn's trees refuse them
            raise ValueError(f"{self.algorithm} does not work with sparse matrices. Densify the data, or set "
                             "algorithm='brute'")
        Xq, device = _to_tensor("X", X, device=self._fit_X.device, dtype=self._fit_X.dtype)
        _check_2d("X", Xq, type(self).__name__)
        if Xq.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {Xq.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")
        _check_finite("X", Xq)
        return Xq, device

    # ------------------------------------------- what scikit-learn's estimator computes instead

    def _beyond_the_kernels(self, X) -> str | None:
        """Why this fit is one fastml's kernels do not compute but scikit-learn's estimator does
        (None: the kernels compute it): a metric outside the Minkowski family (a name, a callable,
        a DistanceMetric, "precomputed"), metric_params, a Minkowski semimetric (0 < p < 1),
        training data given as a fitted scikit-learn neighbours object or tree, or sparse data
        for a tree algorithm (which scikit-learn refuses). Then fit hands the estimator over to
        scikit-learn's twin (where it is installed), which raises, warns and answers as it does."""
        metric = self.metric
        if not isinstance(metric, str) or metric not in _METRICS:
            return f"metric {metric!r}"
        if self.metric_params:
            return "metric_params"
        p = self.p
        if (metric == "minkowski" and isinstance(p, numbers.Real) and not isinstance(p, bool)
                and 0 < p < 1):
            return f"a Minkowski semimetric (p = {p!r})"
        if type(X).__module__.startswith("sklearn."):
            return f"training data given as {type(X).__name__}"
        if _is_sparse(X) and self.algorithm in ("kd_tree", "ball_tree"):
            return f"sparse data for algorithm {self.algorithm!r}"
        return None

    def _fit_by_sklearn(self, X, y):
        estimator = getattr(_sklearn_neighbors(), type(self).__name__)(**self._sklearn_params())
        estimator.fit(X, y)
        for name in [name for name in vars(self) if name.endswith("_") or name in _FITTED_PRIVATE]:
            delattr(self, name)  # what an earlier fit by the kernels left
        for name, value in vars(estimator).items():
            if (name.endswith("_") and not name.startswith("__")) or name == "_fit_method":
                setattr(self, name, value)
        self._sklearn_fitted = estimator
        return self

    def _sklearn_params(self) -> dict:
        return {name: value for name, value in self.get_params().items() if name != "process_group"}

    def _sklearn_estimator(self):
        """The scikit-learn estimator that fit handed this one over to, with this one's current
        parameters (set_params after fit acts on it as on scikit-learn's own), or None."""
        estimator = self.__dict__.get("_sklearn_fitted")
        if estimator is not None:
            estimator.set_params(**self._sklearn_params())
        return estimator

    # ------------------------------------------------------------------------------ fit

    def fit(self, X, y):
        """Remembers the training points X (n_samples, n_features) and their targets y
        (n_samples, ...); returns self. With a process_group: this rank's shard of them, of any
        size (0 included, as an (0, n_features) array), every rank calling fit."""
        reason = self._beyond_the_kernels(X)
        if reason is not None and self.process_group is None and _sklearn_neighbors() is not None:
            return self._fit_by_sklearn(X, y)
        self.__dict__.pop("_sklearn_fitted", None)
        if reason is not None and self.process_group is not None:
            raise ValueError(f"{reason}: scikit-learn's estimator would compute it, but not across the ranks of a "
                             "process_group")
        self._fit_method = "brute"
        group = _checked_group(self.process_group)
        if group is None:
            X, y = self._checked_shard(X, y, min_samples=1)
            self._set_fit(X, y, [self._describe(X, y)], 0, None)
            return self
        error = None
        try:
            X, y = self._checked_shard(X, y, min_samples=0)
            shard = self._describe(X, y)
        except Exception as exc:  # raised below, once every rank knows: none must wait for the others
            error, shard = exc, f"{type(exc).__name__}: {exc}"
        shards = _all_gather_object(group, shard)
        if error is not None:
            raise error
        for rank, shard in enumerate(shards):
            if isinstance(shard, str):
                raise RuntimeError(f"fit failed on rank {rank} of the process group: {shard}")
        self._set_fit(X, y, shards, dist.get_rank(group), group)
        return self

    def _checked_shard(self, X, y, min_samples: int):
        """(X as a tensor, y as the estimator keeps it), both checked; X of at least min_samples rows."""
        raise NotImplementedError

    def _checked_X(self, X, y, min_samples: int) -> torch.Tensor:
        """X as a tensor, checked (after the parameters, and that there is a y, as scikit-learn)."""
        self._check_params()
        if y is None:
            raise ValueError(f"This {type(self).__name__} estimator requires y to be passed, but the target y is None.")
        X, _ = _to_tensor("X", X)
        _check_2d("X", X, type(self).__name__, min_samples)
        _check_finite("X", X)
        return X

    def _describe(self, X, y) -> dict:
        """What the other ranks need to know of this rank's shard."""
        return {"n_samples": X.shape[0], "n_features": X.shape[1], "dtype": X.dtype}

    def _set_fit(self, X, y, shards: list[dict], rank: int, group) -> None:
        """Takes this rank's checked shard, knowing every rank's (in rank order; one without a
        group). The checks here see the same shards on every rank, so all raise alike."""
        name = type(self).__name__
        self._check_targets(shards)
        sizes = [shard["n_samples"] for shard in shards]
        for r, shard in enumerate(shards):
            if shard["n_features"] != shards[0]["n_features"]:
                raise ValueError(f"X has {shard['n_features']} features on rank {r} of the process group but "
                                 f"{shards[0]['n_features']} on rank 0")
        if sum(sizes) == 0:
            raise ValueError(f"Found array with 0 sample(s) (shape={(0, X.shape[1])}) while a minimum of 1 is "
                             f"required by {name}.")
        dtypes = {shard["dtype"] for shard in shards if shard["n_samples"]}
        if len(dtypes) > 1:
            raise ValueError(f"X must have one dtype on every rank of the process group, got "
                             f"{[shard['dtype'] for shard in shards]} (rank order)")
        self._fit_X = X.to(dtypes.pop())  # an empty shard takes the others' dtype
        self._group = group
        self.shard_sizes_ = sizes
        self.shard_offset_ = sum(sizes[:rank])
        self.n_features_in_ = X.shape[1]
        self.n_samples_fit_ = sum(sizes)
        self.effective_metric_ = "minkowski" if self.metric == "minkowski" else self.metric
        self.effective_metric_params_ = dict(self.metric_params or {})
        self._set_targets(y, shards)

    def _check_targets(self, shards: list[dict]) -> None:
        """Whether the ranks' targets can make one training set: the same "outputs" (raises if not)."""
        outputs = [shard["outputs"] for shard in shards]
        if len(set(outputs)) > 1:
            raise ValueError(f"y must have {self._SAME_TARGETS} on every rank of the process group, got {outputs} "
                             "(rank order)")

    def _set_targets(self, y, shards: list[dict]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------ neighbours

    def _neighbours(self, X, n_neighbors, with_targets: bool = False):
        """(distances, indices, targets or None, device of a torch query or None): as
        ``kneighbors``, in tensors, plus the neighbours' targets (n_queries, k, ...) if asked.
        A numpy query's distances are float64 whatever the training data's dtype, as
        scikit-learn's are, and so is all that is computed from them (weights, probabilities,
        distance-weighted means); a torch query's stay in the training data's dtype."""
        self._check_fitted()
        if self._group is None:
            distances, indices, targets, device = self._neighbours_here(X, n_neighbors, with_targets)
        else:
            distances, indices, targets, device = self._neighbours_across_ranks(X, n_neighbors, with_targets)
        if device is None:
            distances = distances.to(torch.float64)
        return distances, indices, targets, device

    def _neighbours_across_ranks(self, X, n_neighbors, with_targets):
        """_neighbours where the training set is split across the ranks of a process group."""
        group = self._group
        _checked_group(group)
        error, call = None, (0, 0, 0)
        try:  # the same call on every rank: a bad one fails everywhere, unless the ranks' calls differ
            k, Xq, device, self_query = self._search(X, n_neighbors)
            call = (self_query, Xq.shape[0] if not self_query else self.n_samples_fit_, k)
        except Exception as exc:
            error = exc
        calls = _agree(group, error, "kneighbors", call)
        if not bool((calls == calls[0]).all()):
            raise ValueError(f"every rank of the process group must ask for the neighbours of the same queries: "
                             f"got (without X, n_queries, n_neighbors) = {calls.tolist()} in rank order")
        if self_query:
            Xq = self._all_shards()
        distances, indices, targets = self._merged_neighbours(Xq, k + self_query, with_targets)
        if self_query:
            distances, indices, targets = self._leave_self_out(distances, indices, targets, k)
        return distances, indices, targets, device

    def _search(self, X, n_neighbors):
        """(k, queries, device of a torch query or None, whether the queries are the training
        points), checked: an X of None asks for every training point's neighbours but itself."""
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
            raise ValueError(f"Expected n_neighbors > 0. Got {k!r}")
        k = int(k)
        self_query = X is None
        if self_query:
            Xq, device, n_queries = self._fit_X, None, self.n_samples_fit_
        else:
            Xq, device = self._queries(X)
            n_queries = Xq.shape[0]
        k_search = k + self_query  # each training point finds itself too, which is then left out
        if k_search > self.n_samples_fit_:  # (scikit-learn's words: "<" where the points leave themselves out)
            raise ValueError(f"Expected n_neighbors {'<' if self_query else '<='} n_samples_fit, but n_neighbors = "
                             f"{k}, n_samples_fit = {self.n_samples_fit_}, n_samples = {n_queries}")
        return k, Xq, device, self_query

    def _neighbours_here(self, X, n_neighbors, with_targets):
        """_neighbours for one process holding the whole reference set."""
        k, Xq, device, self_query = self._search(X, n_neighbors)
        distances, indices = functional.knn(Xq, self._fit_X, k + self_query, self._norm())
        targets = self._y[indices] if with_targets else None
        if self_query:
            distances, indices, targets = self._leave_self_out(distances, indices, targets, k)
        return distances, indices, targets, device

    @staticmethod
    def _leave_self_out(distances, indices, targets, k):
        """As scikit-learn: each training point's k + 1 neighbours without the point itself; where
        duplicates hide it, without the first."""
        rows = torch.arange(indices.shape[0], device=indices.device)
        keep = indices != rows[:, None]
        keep[keep.all(dim=1), 0] = False
        distances = distances[keep].reshape(-1, k)
        indices = indices[keep].reshape(-1, k)
        if targets is not None:
            targets = targets[keep].reshape(-1, k, *targets.shape[2:])
        return distances, indices, targets

    def _all_shards(self) -> torch.Tensor:
        """Every rank's training points, concatenated in rank order (the queries of a distributed
        kneighbors without X)."""
        largest = max(self.shard_sizes_)
        padded = self._fit_X.new_zeros((largest, self.n_features_in_))
        padded[:self._fit_X.shape[0]] = self._fit_X
        shards = _all_gather(self._group, padded)
        return torch.cat([shard[:size] for shard, size in zip(shards, self.shard_sizes_)])

    def _merged_neighbours(self, Xq, k, with_targets):
        """The k nearest training points of every rank's shard to the queries Xq (the same on
        every rank): this shard's k best, exchanged and merged. (distances, global indices,
        targets or None)."""
        group, n_queries = self._group, Xq.shape[0]
        local_k = min(k, self._fit_X.shape[0])
        # A shard with fewer than k points pads its list: distance inf and an index past every
        # training point, so a pad comes after any real neighbour, one at distance inf included.
        distances = Xq.new_full((n_queries, k), math.inf)
        indices = torch.full((n_queries, k), self.n_samples_fit_, dtype=torch.int64, device=Xq.device)
        targets = self._y.new_zeros((n_queries, k, *self._y.shape[1:])) if with_targets else None
        if local_k:
            d, j = functional.knn(Xq, self._fit_X, local_k, self._norm())
            distances[:, :local_k] = d
            indices[:, :local_k] = j + self.shard_offset_
            if with_targets:
                targets[:, :local_k] = self._y[j]
        distances = torch.cat(_all_gather(group, distances), dim=1)
        indices = torch.cat(_all_gather(group, indices), dim=1)
        # One process's order: (distance, index) ascending, NaN last. Sorted by index first, a
        # stable sort by distance keeps the index order among equal distances.
        by_index = torch.argsort(indices, dim=1)
        by_distance = torch.sort(distances.gather(1, by_index), dim=1, stable=True).indices[:, :k]
        order = by_index.gather(1, by_distance)
        distances, indices = distances.gather(1, order), indices.gather(1, order)
        if with_targets:
            targets = torch.cat(_all_gather(group, targets), dim=1)
            targets = targets[torch.arange(n_queries, device=Xq.device)[:, None], order]
        return distances, indices, targets

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """The n_neighbors (default: the estimator's) nearest training points of each row of X
        (default: of each training point, leaving the point itself out): (distances, indices),
        both (n_queries, n_neighbors), ascending; or only the indices.

        With a process_group, every rank passes the same X and gets the same answer, indices
        into the concatenation of the shards; without X, the queries are all the ranks' training
        points (gathered on every rank), in that order."""
        estimator = self._sklearn_estimator()
        if estimator is not None:
            return estimator.kneighbors(X, n_neighbors, return_distance)
        distances, indices, _, device = self._neighbours(X, n_neighbors)
        if return_distance:
            return _back(distances, device), _back(indices, device)
        return _back(indices, device)

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """The k-neighbours graph as scikit-learn's: a scipy.sparse CSR matrix (n_queries,
        n_samples_fit_) with, in each query's row, 1 ("connectivity") or the distance
        ("distance") at each of its neighbours' columns. Without X, each training point's
        neighbours other than itself."""
        estimator = self._sklearn_estimator()
        if estimator is not None:
            return estimator.kneighbors_graph(X, n_neighbors, mode)
        if mode not in ("connectivity", "distance"):
            raise ValueError(f'Unsupported mode, must be one of "connectivity", or "distance" but got "{mode}" '
                             "instead")
        from scipy import sparse

        distances, indices, _, _ = self._neighbours(X, n_neighbors)
        n_queries, k = indices.shape
        values = (np.ones(n_queries * k) if mode == "connectivity"
                  else distances.detach().cpu().numpy().astype(np.float64, copy=False).ravel())
        return sparse.csr_matrix((values, indices.cpu().numpy().ravel(), np.arange(0, n_queries * k + 1, k)),
                                 shape=(n_queries, self.n_samples_fit_))

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


def _label_kind(labels: np.ndarray) -> str | None:
    """None for 1-D labels a classifier takes; else their kind in scikit-learn's type_of_target,
    which its classifiers refuse: "continuous" (floats that are not all integers), "unknown"
    (Python objects other than strings)."""
    if labels.dtype.kind == "f" and bool((labels != np.trunc(labels)).any()):
        return "continuous"
    if labels.dtype == object and labels.size and not isinstance(labels.flat[0], str):
        return "unknown"
    return None


class KNeighborsClassifier(_KNeighborsBase):
    """Classifier voting among the k nearest training points (scikit-learn's interface).

    >>> clf = fastml.neighbors.KNeighborsClassifier(n_neighbors=3).fit(X, y)
    >>> clf.predict(X_new), clf.predict_proba(X_new), clf.kneighbors(X_new)

    y may have several columns (multi-output, as scikit-learn's): each output is voted on apart,
    ``classes_`` is then a list of each output's classes, ``predict`` gives (n_queries, n_outputs)
    and ``predict_proba`` a list of each output's (n_queries, n_classes_k) probabilities.

    With a process_group, each rank fits its shard (X_rank, y_rank); ``classes_`` is the union
    of every shard's labels (per output), sorted, on every rank.
    """

    _estimator_type = "classifier"
    _SAME_TARGETS = "the same number of outputs"

    def fit(self, X, y):
        """Remembers the training points X (n_samples, n_features) and their labels y
        (n_samples,) or (n_samples, n_outputs), of any values; returns self. With a process_group: this rank's shard of
        them, every rank calling fit."""
        return super().fit(X, y)

    def _checked_shard(self, X, y, min_samples):
        """(X, (the shard's classes, sorted, and each label's position among them)); with several
        outputs, (a list of each output's classes, codes of shape (n_samples, n_outputs))."""
        X = self._checked_X(X, y, min_samples)
        if isinstance(y, torch.Tensor):
            labels = y.detach().cpu().numpy()
        else:
            labels = np.asarray(y.toarray() if _is_sparse(y) else y)
        if labels.dtype.kind == "c":
            raise ValueError(f"Complex data not supported: y has dtype {labels.dtype}.")
        column = labels.ndim == 2 and labels.shape[1] == 1
        if labels.ndim > 2:
            raise _over_2d(labels.ndim, type(self).__name__)
        if labels.ndim == 0:
            raise ValueError(f"y must be (n_samples,) or (n_samples, n_outputs), got shape {labels.shape}")
        if labels.shape[0] != X.shape[0]:
            raise ValueError(f"Found input variables with inconsistent numbers of samples: "
                             f"[{X.shape[0]}, {labels.shape[0]}]")
        if labels.dtype.kind == "f":
            _check_finite("y", labels)
        if column:
            # fit's caller is 4 frames up: here, _KNeighborsBase.fit, KNeighborsClassifier.fit.
            warnings.warn("A column-vector y was passed when a 1d array was expected. Please change the shape of y "
                          "to (n_samples,), for example using ravel().", _twin(DataConversionWarning), stacklevel=4)
            labels = labels.ravel()
        kind = _label_kind(labels)
        if kind is not None:
            if kind == "continuous" and labels.ndim == 2:
                kind = "continuous-multioutput"  # scikit-learn's type_of_target's name for it
            raise ValueError(f"Unknown label type: {kind}. Maybe you are trying to fit a classifier, which expects "
                             "discrete classes on a regression target with continuous values.")
        if labels.ndim == 1:
            return X, np.unique(labels, return_inverse=True)
        classes, codes = [], np.empty(labels.shape, dtype=np.int64)
        for output in range(labels.shape[1]):
            output_classes, codes[:, output] = np.unique(labels[:, output], return_inverse=True)
            classes.append(output_classes)
        return X, (classes, codes)

    def _describe(self, X, labels) -> dict:
        classes = labels[0]
        outputs = len(classes) if isinstance(classes, list) else "1-D"  # one output, y 1-D
        return {**super()._describe(X, labels), "classes": classes, "outputs": outputs}

    def _set_targets(self, labels, shards) -> None:
        classes, codes = labels
        multi = isinstance(classes, list)
        if len(shards) > 1:
            # Each output's classes are the union of the shards' (sorted), the codes remapped into it.
            # An empty shard's labels (numpy's default dtype for []) take no part in the union's dtype.
            filled = [shard["classes"] if multi else [shard["classes"]] for shard in shards if shard["n_samples"]]
            mine = classes if multi else [classes]
            union = [np.unique(np.concatenate([shard[output] for shard in filled])) for output in range(len(mine))]
            if len(codes):
                codes = codes.reshape(len(codes), -1).copy()
                for output, output_classes in enumerate(mine):
                    codes[:, output] = np.searchsorted(union[output], output_classes)[codes[:, output]]
                codes = codes if multi else codes.ravel()
            classes = union if multi else union[0]
        self.classes_ = classes
        self.outputs_2d_ = multi
        self._y = torch.from_numpy(np.asarray(codes, dtype=np.int64)).to(self._fit_X.device)

    def _outputs(self) -> list[np.ndarray]:
        """Each output's classes (one output: [classes_])."""
        return self.classes_ if self.outputs_2d_ else [self.classes_]

    def _proba(self, X):
        """(a list of each output's class probabilities (n_queries, n_classes_k), device)."""
        distances, indices, labels, device = self._neighbours(X, None, with_targets=True)
        weights = self._weights(distances, device)
        if weights is not None and bool((weights == 0).all(dim=1).any()):
            # scikit-learn refuses rather than returning a row of zero probabilities
            raise ValueError("All neighbors of some sample is getting zero weights. Please modify 'weights' to avoid "
                             "this case if you are using a user-defined function.")
        votes = torch.ones_like(distances) if weights is None else weights
        labels = labels if self.outputs_2d_ else labels[..., None]  # (n_queries, k, n_outputs)
        probas = []
        for output, classes in enumerate(self._outputs()):
            proba = torch.zeros((indices.shape[0], len(classes)), dtype=distances.dtype, device=distances.device)
            proba.scatter_add_(1, labels[..., output].contiguous(), votes)
            total = proba.sum(dim=1, keepdim=True)
            total[total == 0] = 1.0
            probas.append(proba / total)
        return probas, device

    def predict_proba(self, X):
        """Class probabilities (n_queries, n_classes), classes in the order of ``classes_``; with
        several outputs, a list of each output's."""
        estimator = self._sklearn_estimator()
        if estimator is not None:
            return estimator.predict_proba(X)
        probas, device = self._proba(X)
        probas = [_back(proba, device) for proba in probas]
        return probas if self.outputs_2d_ else probas[0]

    def predict(self, X):
        """The most probable class of each query (ties: the first in ``classes_``): (n_queries,),
        or (n_queries, n_outputs) with several outputs."""
        estimator = self._sklearn_estimator()
        if estimator is not None:
            return estimator.predict(X)
        probas, device = self._proba(X)
        columns = [classes[proba.argmax(dim=1).cpu().numpy()] for classes, proba in zip(self._outputs(), probas)]
        if not self.outputs_2d_:
            labels = columns[0]
        elif self.weights == "uniform":
            # scikit-learn stacks the outputs' labels here (numpy promotes their dtypes) ...
            labels = np.stack(columns, axis=1)
        else:
            # ... and here fills an array of the first output's dtype: its results, whatever they are.
            labels = np.empty((len(columns[0]), len(columns)), dtype=columns[0].dtype)
            for output, column in enumerate(columns):
                labels[:, output] = column
        if device is not None and labels.dtype != object and labels.dtype.kind in "biuf":
            return torch.from_numpy(labels).to(device)
        return labels

    def score(self, X, y, sample_weight=None) -> float:
        """Mean accuracy of ``predict(X)`` against y (weighted by sample_weight); with several
        outputs, subset accuracy (every output right), which scikit-learn's accuracy_score takes
        for multilabel indicators (0/1 outputs) only: other multi-output y raise as there."""
        estimator = self._sklearn_estimator()
        if estimator is not None:
            return estimator.score(X, y, sample_weight)
        predicted, truth = _scored(self.predict(X), y)
        if truth.ndim == 2 and truth.shape[1] == 1:
            truth = truth.ravel()
        if truth.ndim == 1 and predicted.ndim == 1:
            return float(np.average(predicted == truth, weights=sample_weight))
        kinds = [_score_kind(truth), _score_kind(predicted)]
        if len(set(kinds)) > 1:
            raise ValueError(f"Classification metrics can't handle a mix of {kinds[0]} and {kinds[1]} targets")
        if kinds[0] != "multilabel-indicator":
            raise ValueError(f"{kinds[0]} is not supported")
        return float(np.average((predicted == truth).all(axis=1), weights=sample_weight))


def _scored(predicted, y) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, true values) as numpy arrays, of as many samples (a ValueError, as
    scikit-learn's metrics raise, where they are not: numpy would broadcast one against the other)."""
    predicted = predicted.cpu().numpy() if isinstance(predicted, torch.Tensor) else np.asarray(predicted)
    truth = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if truth.ndim == 0:
        raise _twin(InvalidParameterError)(f"y must be an array-like of the true values, got {y!r}")
    if len(truth) != len(predicted):
        raise ValueError(f"Found input variables with inconsistent numbers of samples: "
                         f"[{len(truth)}, {len(predicted)}]")
    return predicted, truth


def _score_kind(labels: np.ndarray) -> str:
    """scikit-learn's type_of_target as its accuracy_score tells multi-output labels apart: 2-D
    labels with at most two distinct integer values are a multilabel indicator."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        values = np.unique(labels)
        integral = labels.dtype.kind in "biu" or (labels.dtype.kind == "f" and bool((values == np.trunc(values)).all()))
        return "multilabel-indicator" if len(values) < 3 and integral else "multiclass-multioutput"
    return "binary" if len(np.unique(labels)) <= 2 else "multiclass"


class KNeighborsRegressor(_KNeighborsBase):
    """Regressor averaging the targets of the k nearest training points (scikit-learn's
    interface); y may have several columns."""

    _estimator_type = "regressor"
    _SAME_TARGETS = "the same shape past its first dimension"

    def fit(self, X, y):
        """Remembers the training points X (n_samples, n_features) and targets y (n_samples,) or
        (n_samples, n_outputs); returns self. With a process_group: this rank's shard of them,
        every rank calling fit, with y of the same number of dimensions and outputs on every
        rank."""
        return super().fit(X, y)

    def _checked_shard(self, X, y, min_samples):
        X = self._checked_X(X, y, min_samples)
        targets, _ = _to_tensor("y", y, device=X.device)
        if targets.dim() > 2:
            raise _over_2d(targets.dim(), type(self).__name__)
        if targets.dim() < 1:
            raise ValueError(f"y must be (n_samples,) or (n_samples, n_outputs) with n_samples = "
                             f"{X.shape[0]}, got shape {tuple(targets.shape)}")
        if targets.shape[0] != X.shape[0]:
            raise ValueError(f"Found input variables with inconsistent numbers of samples: "
                             f"[{X.shape[0]}, {targets.shape[0]}]")
        _check_finite("y", targets)
        return X, targets

    def _describe(self, X, targets) -> dict:
        return {**super()._describe(X, targets), "outputs": tuple(targets.shape[1:]), "target_dtype": targets.dtype}

    def _set_targets(self, targets, shards) -> None:
        # The targets keep their own precision (float32 or float64; integers become float64), not
        # X's: scikit-learn averages float64 targets in float64 whatever X is. Across ranks, the
        # shards' dtypes promoted (an empty shard's, numpy's default for [], takes no part).
        dtypes = [shard["target_dtype"] for shard in shards if shard["n_samples"]] or [targets.dtype]
        self._y = targets.to(functools.reduce(torch.promote_types, dtypes))

    def predict(self, X):
        """The (weighted) mean target of each query's neighbours: (n_queries,) or
        (n_queries, n_outputs), as y; in y's floating dtype (float64 for integer y), or with
        distance weights in the promotion of it and the distances' (so float64 for numpy
        queries), as scikit-learn."""
        estimator = self._sklearn_estimator()
        if estimator is not None:
            return estimator.predict(X)
        distances, _, targets, device = self._neighbours(X, None, with_targets=True)
        weights = self._weights(distances, device)  # targets: (n_queries, k) or (n_queries, k, n_outputs)
        if weights is None:
            prediction = targets.mean(dim=1)
        else:
            w = weights if targets.dim() == 2 else weights[..., None]
            prediction = (targets * w).sum(dim=1) / w.sum(dim=1)
        return _back(prediction, device)

    def score(self, X, y, sample_weight=None) -> float:
        """R² of ``predict(X)`` against y, averaged uniformly over outputs; NaN, with an
        UndefinedMetricWarning, for fewer than two queries (as scikit-learn's r2_score)."""
        estimator = self._sklearn_estimator()
        if estimator is not None:
            return estimator.score(X, y, sample_weight)
        predicted, truth = _scored(self.predict(X), y)
        if len(predicted) < 2:
            warnings.warn("R^2 score is not well-defined with less than two samples.",
                          _twin(UndefinedMetricWarning), stacklevel=2)
            return float("nan")
        truth = truth.astype(float, copy=False)
        truth, predicted = truth.reshape(len(truth), -1), predicted.reshape(len(predicted), -1)
        w = np.ones(len(truth)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        mean = np.average(truth, axis=0, weights=w)
        residual = (w[:, None] * (truth - predicted) ** 2).sum(axis=0)
        total = (w[:, None] * (truth - mean) ** 2).sum(axis=0)
        scores = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), np.where(residual > 0, 0.0, 1.0))
        return float(scores.mean())
