"""fastml under torch.distributed, on two gloo processes on the CPU.

DistributedDataParallel: models of fastml.nn modules, trained by fastml.optim on two ranks each
given half of every batch, end with the parameters of one process trained on the whole batches
(the losses take means, so the average of the two half-batch gradients is the whole batch's),
and the two replicas stay the same bits even where the ranks' measured choices disagree.

KNeighborsClassifier / KNeighborsRegressor with a process_group: each rank fits a shard of the
training set, and every answer (distances, indices, labels, probabilities, scores, errors) is
that of one process fitted on the shards' concatenation, ties included.

Spawning is slow (each process imports torch and fastml), so one spawn serves all the DDP cases
and one all the neighbour cases. Each rank pickles its results to a file and the tests compare
them here: a rank that raises fails the spawn with its traceback, and one that stops early
leaves no file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import os
import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TOLERANCES
from torch.nn.parallel import DistributedDataParallel

import fastml
from fastml import _tune, nn, optim
from fastml.neighbors import KNeighborsClassifier, KNeighborsRegressor

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is needed")

WORLD_SIZE = 2


def _rank_main(rank: int, directory: str, worker: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # two ranks on a small machine: no oversubscription
    store = dist.FileStore(os.path.join(directory, "store"), WORLD_SIZE)
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = worker(rank, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(directory, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_on_two_ranks(directory, worker: Callable, *args) -> list:
    """worker(rank, *args) on each rank of a two-process gloo group: its results in rank order."""
    mp.spawn(_rank_main, args=(str(directory), worker, args), nprocs=WORLD_SIZE, join=True)
    results = []
    for rank in range(WORLD_SIZE):
        with open(os.path.join(directory, f"rank{rank}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results


def _seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed: {seed}")
    return seed


# --------------------------------------------------------------------- DistributedDataParallel

BATCH, STEPS = 8, 4


@dataclasses.dataclass
class Case:
    module: torch.nn.Module
    loss: Callable  # loss(module, x, y): the batch's mean loss
    optimizer: Callable  # optimizer(parameters)
    batches: list
    step: str  # "step(zero_grad=True)", "step, zero_grad" or "sgd_" (the course's step, no optimizer)
    ddp: dict  # DistributedDataParallel's options
    accumulate: bool  # each batch as two halves, backward after each; under DDP, the first in no_sync()


def _ddp_case(name: str, dtype: torch.dtype, seed: int) -> Case:
    """A model, its data and its optimizer: the same for the same arguments, in any process."""
    torch.manual_seed(seed)  # the initial parameters
    g = torch.Generator().manual_seed(seed)

    def data(*shape):
        return torch.randn((STEPS, BATCH, *shape), generator=g, dtype=torch.float64).to(dtype)

    def labels(classes, *shape):
        return torch.randint(0, classes, (STEPS, BATCH, *shape), generator=g)

    cross_entropy = nn.CrossEntropyLoss(label_smoothing=0.1)
    if name == "mlp":
        module = torch.nn.Sequential(nn.Linear(6, 16), torch.nn.Tanh(), nn.Linear(16, 4))
        loss, x, y = (lambda m, x, y: cross_entropy(m(x), y)), data(6), labels(4)
    elif name == "lenet":
        module = torch.nn.Sequential(nn.ConvReLUPool2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3), torch.nn.ReLU(),
                                     nn.MaxPool2d(2), torch.nn.Flatten(), nn.Linear(24, 5))
        loss, x, y = (lambda m, x, y: cross_entropy(m(x), y)), data(1, 12, 12), labels(5)
    elif name == "regression":
        module = torch.nn.Sequential(nn.Linear(5, 8), torch.nn.Tanh(), nn.Linear(8, 3))
        mse = nn.MSELoss()
        loss, x, y = (lambda m, x, y: mse(m(x), y)), data(5), data(3)
    elif name == "linear_mse":  # the loss module is the model: DDP wraps it whole
        module = nn.LinearMSELoss(5, 2)
        loss, x, y = (lambda m, x, y: m(x, y)), data(5), data(2)
    elif name == "course_regression":  # summed loss, then sgd_ divides by the rank's batch size
        module = nn.LinearMSELoss(5, 2, reduction="sum")
        loss, x, y = (lambda m, x, y: m(x, y)), data(5), data(2)
    elif name == "linear_cross_entropy":  # out_features: the kernel gets views of the parameters
        module = nn.LinearCrossEntropyLoss(7, 4, out_features=(3,), bias=True)
        loss, x, y = (lambda m, x, y: m(x, y)), data(7), labels(4, 3)
    module = module.to(dtype)
    if name == "lenet":  # the convolutions' parameters and gradients not contiguous
        module = module.to(memory_format=torch.channels_last)
    kind, step, ddp, accumulate = DDP_OPTIMIZERS[name]
    if dtype != torch.float64 and kind != "sgd_":
        # Adam divides by the gradients' running size: where a gradient is near zero, the
        # roundings in which the two ways sum it differ by are magnified to a whole step, more
        # than float32's tolerance. SGD compares in float32; Adam in float64.
        kind = "sgd"
    optimizer = {
        "sgd": lambda params: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "adam": lambda params: optim.Adam(params, lr=1e-2, amsgrad=True),
        "adamw": lambda params: optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
        "sgd_": None,
    }[kind]
    return Case(module, loss, optimizer, list(zip(x, y)), step, ddp, accumulate)


ZERO_IN_STEP, ZERO_AFTER = "step(zero_grad=True)", "step, zero_grad"
BUCKET_VIEW = {"gradient_as_bucket_view": True}  # the gradients are views into DDP's buckets
# name: (optimizer in float64, how a step goes, DDP's options, accumulate)
DDP_OPTIMIZERS = {
    "mlp": ("sgd", ZERO_AFTER, {"static_graph": True}, False),
    "lenet": ("adam", ZERO_IN_STEP, BUCKET_VIEW, False),
    "regression": ("sgd", ZERO_IN_STEP, BUCKET_VIEW, True),
    "linear_mse": ("sgd", ZERO_IN_STEP, {}, False),
    "course_regression": ("sgd_", "sgd_", BUCKET_VIEW, False),
    "linear_cross_entropy": ("adamw", ZERO_AFTER, BUCKET_VIEW, False),
}
DDP_RUNS = list(itertools.product(DDP_OPTIMIZERS, (torch.float64, torch.float32)))


def _train(case: Case, model: torch.nn.Module, rows: slice) -> dict[str, torch.Tensor]:
    """Trains ``model`` (case.module, or a DDP around it) on the rows of every batch: the
    parameters at the end."""
    opt = None if case.step == "sgd_" else case.optimizer(model.parameters())
    for x, y in case.batches:
        x, y = x[rows], y[rows]
        if case.accumulate:
            half = len(x) // 2
            with model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext():
                (case.loss(model, x[:half], y[:half]) / 2).backward()
            (case.loss(model, x[half:], y[half:]) / 2).backward()
        else:
            case.loss(model, x, y).backward()
        if case.step == "sgd_":  # DDP averages the two ranks' sums: the whole batch's sum / 2
            optim.sgd_(model.parameters(), lr=0.05, batch_size=len(x))
        elif case.step == ZERO_IN_STEP:
            opt.step(zero_grad=True)
        else:
            opt.step()
            opt.zero_grad()
    return {name: p.detach().clone() for name, p in case.module.named_parameters()}


def _ranks_time_apart(rank: int, directory: str) -> None:
    """Makes this rank's measured choices the opposite of the other's: rank 0's timings favour
    torch's implementation of every op, rank 1's fastml's kernels (each rank keeps its decisions
    in a cache of its own). Timed on a loaded machine, ranks can disagree this way on any op: a
    CI run's ranks chose different AdamW steps, whose last bits differ, and the replicas drifted.
    What a rank chooses may change its gradients' rounding, which DDP's all-reduce averages
    away, but never the update of its replica."""
    os.environ["FASTML_CACHE_DIR"] = os.path.join(directory, f"decisions-rank{rank}")

    def measure(names, run, device, rounds=None):
        return {name: 1.0 if (name == "reference") == (rank == 1) else 0.5 for name in names}

    _tune.clear_tuning()
    _tune.measure = measure


def _ddp_worker(rank: int, seed: int, directory: str) -> dict:
    _ranks_time_apart(rank, directory)
    results = {}
    half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    for name, dtype in DDP_RUNS:
        case = _ddp_case(name, dtype, seed)
        model = DistributedDataParallel(case.module, **case.ddp)
        results[name, dtype] = _train(case, model, half)
    return results


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    seed = _seed()
    directory = tmp_path_factory.mktemp("ddp")
    return seed, run_on_two_ranks(directory, _ddp_worker, seed, str(directory))


@pytest.mark.parametrize("name, dtype", DDP_RUNS)
@pytest.mark.long  # two gloo processes: seconds each
def test_ddp_trains_as_one_process_on_the_whole_batch(ddp_runs, name, dtype):
    seed, ranks = ddp_runs
    case = _ddp_case(name, dtype, seed)
    initial = {key: p.detach().clone() for key, p in case.module.named_parameters()}
    expected = _train(case, case.module, slice(None))
    rtol, atol = TOLERANCES[dtype]
    for rank, results in enumerate(ranks):
        got = results[name, dtype]
        assert got.keys() == expected.keys()
        for key, value in got.items():
            assert value.dtype == dtype
            assert not torch.equal(expected[key], initial[key]), f"{key} did not train"
            torch.testing.assert_close(value, expected[key], rtol=rtol, atol=atol,
                                       msg=lambda m: f"rank {rank}, {key}: {m}")
            assert torch.equal(value, ranks[0][name, dtype][key]), f"{key}: the replicas differ"


# ------------------------------------------------------------------------- k nearest neighbours

METRICS = ("euclidean", "manhattan", "chebyshev")


def _knn_data(seed: int) -> dict:
    """Training sets, each as (X, y, rows of rank 0's shard, rank whose shard is passed as an
    empty array of numpy's default dtype or None), and queries."""
    rng = np.random.default_rng(seed)
    # Integer coordinates: many neighbours at equal distances. Rank 1's shard repeats four of
    # rank 0's points (ties across the shards); the labels -1 (first in classes_) and 7 are rank
    # 1's only, 2 rank 0's only.
    X0 = rng.integers(0, 4, (7, 2)).astype(np.float64)
    X1 = np.concatenate([X0[[5, 0, 3, 0]], rng.integers(0, 4, (8, 2))]).astype(np.float64)
    y0 = rng.integers(0, 3, 7)
    y0[rng.integers(0, 7)] = 2
    y1 = np.array([-1, 7, 0, 1, 1, 0, -1, 7, 1, 0, 0, -1])
    ties_queries = np.concatenate([X0[:3], X1[-2:], rng.integers(-1, 5, (6, 2)), rng.normal(1.5, 2, (3, 2))])
    gaussian = rng.normal(size=(15, 3)).astype(np.float32)
    gaussian[9] = gaussian[2]  # a duplicate, for the leave-self-out rule
    names = np.array(["wolf", "dog", "fox", "owl"])[rng.integers(0, 4, 15)]
    gaussian_queries = rng.normal(size=(6, 3)).astype(np.float32)
    # Multi-output: the ties' labels and words (one output of strings, so all are strings), and
    # integer outputs of which rank 0 is passed an empty shard.
    ties_y = np.concatenate([y0, y1])
    multi = np.stack([ties_y.astype(str), np.array(["wolf", "dog", "fox"])[rng.integers(0, 3, 19)]], axis=1)
    return {
        "ties": (np.concatenate([X0, X1]), np.concatenate([y0, y1]), 7, None),
        "regression": (gaussian, rng.normal(size=(15, 2)), 0, 0),
        "strings": (gaussian, names, 15, 1),
        "ties_queries": ties_queries,
        "gaussian_queries": gaussian_queries,
        "multi-output": (np.concatenate([X0, X1]), multi, 7, None),
        "multi-output, an empty shard": (gaussian, rng.integers(0, 4, (15, 3)), 0, 0),
    }


def _outcome(call: Callable):
    """call()'s result, numpy arrays for tensors, or its error as ("raised", type, message)."""
    try:
        result = call()
    except Exception as exc:
        return "raised", type(exc).__name__, str(exc)
    if isinstance(result, (tuple, list)):
        return type(result)(_plain(r) for r in result)
    return _plain(result)


def _plain(value):
    return ("tensor", value.numpy()) if isinstance(value, torch.Tensor) else value


def _knn_answers(seed: int, group=None, rank=None) -> dict:
    """Every answer the tests compare, from estimators fitted on the shards of rank ``rank`` with
    ``group``, or (group None) on the whole training sets in one process, on one backend. The
    measured choice picks a backend per process and per shape class (a shard's, the whole set's)
    by timing, and two backends' float64 distances may differ in the last bit: a rank choosing
    fastml's C++ kernel where the single process chose torch's screen made a 'distance'-weighted
    probability differ by 1e-16 on a loaded 2-core machine. What the ranks exchange must leave no
    trace at all, and that is what these tests check."""
    with fastml.use_backend(_KNN_BACKEND):
        return _knn_answers_on(seed, group, rank)


_KNN_BACKEND = "cpp" if fastml.info(print_report=False)["backends"]["cpp"]["present"] else "reference"


def _knn_answers_on(seed: int, group, rank) -> dict:
    data = _knn_data(seed)

    def training(name):
        X, y, split, empty_rank = data[name]
        if group is None:
            return X, y
        if rank == empty_rank:  # as a user would write it: numpy's default dtype, y of y's shape
            return np.zeros((0, X.shape[1])), np.zeros((0, *y.shape[1:]))
        rows = slice(0, split) if rank == 0 else slice(split, None)
        return X[rows], y[rows]

    answers = {}
    X, y = training("ties")
    queries = data["ties_queries"]
    for metric, weights in itertools.product(METRICS, ("uniform", "distance")):
        clf = KNeighborsClassifier(4, weights=weights, metric=metric, process_group=group).fit(X, y)
        key = ("ties", metric, weights)
        answers[key, "fitted"] = (clf.classes_, clf.n_samples_fit_, clf.n_features_in_)
        for k in (1, 4, 9, 19):
            answers[key, "kneighbors", k] = _outcome(lambda: clf.kneighbors(queries, n_neighbors=k))
        answers[key, "predict_proba"] = _outcome(lambda: clf.predict_proba(queries))
        answers[key, "predict"] = _outcome(lambda: clf.predict(queries))
        answers[key, "score"] = _outcome(lambda: clf.score(queries, np.arange(len(queries)) % 3))
        answers[key, "kneighbors()"] = _outcome(lambda: clf.kneighbors(n_neighbors=3))
        answers[key, "predict(None)"] = _outcome(lambda: clf.predict(None))
    clf = KNeighborsClassifier(20, process_group=group).fit(X, y)  # one more than the 19 points
    answers["too many", "predict"] = _outcome(lambda: clf.predict(queries))
    answers["too many", "kneighbors()"] = _outcome(lambda: clf.kneighbors(n_neighbors=19))
    answers["too many", "kneighbors(19)"] = _outcome(lambda: clf.kneighbors(queries, n_neighbors=19))

    X, y = training("regression")
    gaussian_queries = torch.from_numpy(data["gaussian_queries"])
    for weights in ("uniform", "distance"):
        reg = KNeighborsRegressor(3, weights=weights, process_group=group).fit(X, y)
        key = ("regression", weights)
        answers[key, "fitted"] = (reg.n_samples_fit_, reg._fit_X.dtype)
        answers[key, "kneighbors"] = _outcome(lambda: reg.kneighbors(gaussian_queries, n_neighbors=15))
        answers[key, "predict"] = _outcome(lambda: reg.predict(gaussian_queries))
        answers[key, "score"] = _outcome(lambda: reg.score(gaussian_queries, np.ones((6, 2))))
        answers[key, "kneighbors()"] = _outcome(lambda: reg.kneighbors(n_neighbors=2))

    X, y = training("strings")
    clf = KNeighborsClassifier(5, weights=lambda d: 1 / (1 + d), process_group=group).fit(X, y)
    answers["strings", "classes"] = clf.classes_
    answers["strings", "predict"] = _outcome(lambda: clf.predict(gaussian_queries))
    answers["strings", "predict_proba"] = _outcome(lambda: clf.predict_proba(gaussian_queries))

    for name, queries in (("multi-output", data["ties_queries"]), ("multi-output, an empty shard", gaussian_queries)):
        X, y = training(name)
        for weights in ("uniform", "distance"):
            clf = KNeighborsClassifier(3, weights=weights, process_group=group).fit(X, y)
            key = (name, weights)
            answers[key, "fitted"] = (clf.classes_, clf.outputs_2d_, clf.n_samples_fit_)
            answers[key, "predict"] = _outcome(lambda: clf.predict(queries))
            answers[key, "predict_proba"] = _outcome(lambda: clf.predict_proba(queries))
            answers[key, "predict(None)"] = _outcome(lambda: clf.predict(None))
    return answers


def _knn_worker(rank: int, seed: int) -> dict:
    from sklearn.base import clone as sklearn_clone

    group = dist.group.WORLD
    answers = _knn_answers(seed, group, rank)
    # Calls that only a process group can get wrong: each must raise on both ranks, and leave
    # the group usable (no rank stuck in a collective).
    data = _knn_data(seed)
    X = data["ties"][0][:7] if rank == 0 else data["ties"][0][7:]
    y = data["ties"][1][:7] if rank == 0 else data["ties"][1][7:]
    bad = X.copy()
    bad[2, 1] = np.nan
    errors = {
        "nan on rank 1": _outcome(lambda: KNeighborsClassifier(3, process_group=group).fit(X if rank == 0 else bad, y)),
        "features": _outcome(lambda: KNeighborsClassifier(3, process_group=group).fit(
            X if rank == 0 else np.concatenate([X, X[:, :1]], axis=1), y)),
        "dtypes": _outcome(lambda: KNeighborsClassifier(3, process_group=group).fit(
            X if rank == 0 else X.astype(np.float32), y)),
        "targets": _outcome(lambda: KNeighborsRegressor(3, process_group=group).fit(
            X, y if rank == 0 else np.stack([y, y], axis=1))),
        "outputs": _outcome(lambda: KNeighborsClassifier(3, process_group=group).fit(
            X, y if rank == 0 else np.stack([y, y], axis=1))),
        "not a group": _outcome(lambda: KNeighborsClassifier(3, process_group="world").fit(X, y)),
    }
    clf = KNeighborsClassifier(3, process_group=group).fit(X, y)
    queries = data["ties_queries"]
    errors["query counts"] = _outcome(lambda: clf.kneighbors(queries[:4 + rank]))
    errors["bad query on rank 0"] = _outcome(lambda: clf.kneighbors(queries[:, :1] if rank == 0 else queries))
    errors["still usable"] = _outcome(lambda: clf.kneighbors(queries))
    clone = sklearn_clone(clf)
    params = {
        "get_params": clf.get_params()["process_group"] is group,
        "clone shares the group": clone.process_group is group and not hasattr(clone, "classes_"),
        "repr": repr(clf),
        "set_params": clf.set_params(process_group=None).process_group is None,
    }
    return {"answers": answers, "errors": errors, "params": params}


@pytest.fixture(scope="module")
def knn_runs(tmp_path_factory):
    pytest.importorskip("sklearn", reason="scikit-learn's clone is checked on a distributed estimator")
    seed = _seed()
    return seed, run_on_two_ranks(tmp_path_factory.mktemp("knn"), _knn_worker, seed)


def _assert_same(got, expected, where):
    if isinstance(expected, (tuple, list)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for a, b in zip(got, expected):
            _assert_same(a, b, where)
    elif isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == expected.dtype, f"{where}: {got!r} against {expected!r}"
        np.testing.assert_array_equal(got, expected, err_msg=str(where))
    else:
        assert got == expected, f"{where}: {got!r} against {expected!r}"


@pytest.mark.long  # two gloo processes: seconds each
def test_neighbours_identical_to_one_process_on_the_concatenation(knn_runs):
    seed, ranks = knn_runs
    expected = _knn_answers(seed)
    for rank, run in enumerate(ranks):
        answers = run["answers"]
        assert answers.keys() == expected.keys()
        for key, value in expected.items():
            _assert_same(answers[key], value, (rank, *key))
    # The cases cover what they claim: exact ties, a class of one rank only, errors.
    distances, _ = expected[("ties", "euclidean", "uniform"), "kneighbors", 9]
    assert (distances[:, 1:] == distances[:, :-1]).any()
    np.testing.assert_array_equal(expected[("ties", "euclidean", "uniform"), "fitted"][0], [-1, 0, 1, 2, 7])
    assert expected["too many", "predict"][0] == "raised"
    # (scikit-learn's words: without X each point leaves itself out, so k must be below the count)
    assert "n_neighbors < n_samples_fit, but n_neighbors = 19, n_samples_fit = 19" in expected["too many",
                                                                                           "kneighbors()"][2]
    assert expected[("regression", "uniform"), "kneighbors"][0][0] == "tensor"
    assert expected[("regression", "uniform"), "fitted"][1] == torch.float32
    classes, outputs_2d, _ = expected[("multi-output", "uniform"), "fitted"]
    assert outputs_2d and [list(c) for c in classes] == [["-1", "0", "1", "2", "7"], ["dog", "fox", "wolf"]]
    assert expected[("multi-output, an empty shard", "distance"), "predict"][0] == "tensor"
    assert len(expected[("multi-output, an empty shard", "distance"), "predict_proba"]) == 3


@pytest.mark.long  # two gloo processes: seconds each
def test_distributed_errors_raise_on_every_rank(knn_runs):
    _, ranks = knn_runs
    errors = [run["errors"] for run in ranks]
    assert errors[1]["nan on rank 1"] == ("raised", "ValueError", "Input X contains NaN.")
    assert errors[0]["nan on rank 1"][:2] == ("raised", "RuntimeError")
    assert errors[0]["nan on rank 1"][2] == ("fit failed on rank 1 of the process group: "
                                             "ValueError: Input X contains NaN.")
    for rank in range(WORLD_SIZE):
        for name, message in [("features", "X has 3 features on rank 1 of the process group but 2 on rank 0"),
                              ("dtypes", "X must have one dtype on every rank"),
                              ("targets", "y must have the same shape past its first dimension"),
                              ("outputs", "y must have the same number of outputs on every rank"),
                              ("not a group", "process_group must be a torch.distributed ProcessGroup"),
                              ("query counts", "every rank of the process group must ask for the neighbours of "
                                               "the same queries")]:
            outcome = errors[rank][name]
            assert outcome[0] == "raised" and message in outcome[2], (rank, name, outcome)
        distances, indices = errors[rank]["still usable"]
        assert distances.shape == indices.shape == (len(_knn_data(0)["ties_queries"]), 3)
    assert errors[0]["bad query on rank 0"][:2] == ("raised", "ValueError")
    assert "kneighbors failed on rank 0" in errors[1]["bad query on rank 0"][2]


@pytest.mark.long  # two gloo processes: seconds each
def test_distributed_parameters(knn_runs):
    _, ranks = knn_runs
    for run in ranks:
        params = run["params"]
        assert params["get_params"] and params["clone shares the group"] and params["set_params"]
        assert "process_group=<" in params["repr"]


def test_process_group_needs_torch_distributed_initialized():
    assert not dist.is_initialized()
    clf = KNeighborsClassifier(1, process_group=object())
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        clf.fit([[0.0], [1.0]], [0, 1])
    assert KNeighborsClassifier().get_params()["process_group"] is None
    assert repr(KNeighborsRegressor(3)) == "KNeighborsRegressor(n_neighbors=3)"
    assert fastml.neighbors.KNeighborsClassifier(2).fit([[0.0], [1.0]], [0, 1]).shard_sizes_ == [2]
