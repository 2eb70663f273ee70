"""fastml under torch.distributed, on two gloo processes on the CPU.

DistributedDataParallel: models of fastml.nn modules, trained by fastml.optim on two ranks each
given half of every batch, end with the parameters of one process trained on the whole batches
(the losses take means, so the average of the two half-batch gradients is the whole batch's).

Spawning is slow (each process imports torch and fastml), so one spawn serves all the cases.
Each rank pickles its results to a file and the tests compare them here: a rank that raises
fails the spawn with its traceback, and one that stops early leaves no file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import os
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TOLERANCES
from torch.nn.parallel import DistributedDataParallel

from fastml import nn, optim

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


def _ddp_worker(rank: int, seed: int) -> dict:
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
    return seed, run_on_two_ranks(tmp_path_factory.mktemp("ddp"), _ddp_worker, seed)


@pytest.mark.parametrize("name, dtype", DDP_RUNS)
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
