"""Shared machinery of the pytest-benchmark suite.

Every benchmark takes ``device`` and ``impl`` (generated here: on the CPU "torch", "auto", "cpp"
and "numba"; on CUDA "torch", "auto" and "triton"), so each group of the table shows torch beside
what a fastml user gets by default ("auto": the measured choice between fastml's kernel and
torch's, fastml/_tune.py) and beside every fastml backend forced, on the same inputs. The ``backend`` fixture skips, with the reason, an
implementation absent here (a backend not installed, an op without that backend's kernels, no
GPU); the Triton interpreter is never timed. Around a fastml implementation it enters
``fastml.use_backend(impl)``.

Run:  python -m pytest bench/bench_linear_mse.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import fastml
from fastml import _bench

IMPLEMENTATIONS = {"cpu": ("torch", "auto", "cpp", "numba"), "cuda": ("torch", "auto", "triton")}
FASTML_BACKENDS = {"cpp", "numba", "triton"}
CUDA = torch.cuda.is_available()


RESULTS = Path(__file__).resolve().parent / "results"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    # --benchmark-save / --benchmark-autosave keep their runs beside the recorded results, from
    # any working directory (pytest-benchmark's default is ./.benchmarks). Its own configure
    # hook runs last, so it reads the option as set here.
    if getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = f"file://{RESULTS / 'pytest-benchmark'}"


def pytest_generate_tests(metafunc):
    """(device, impl) pairs for every benchmark that takes both; ``@pytest.mark.devices`` narrows
    the devices, ``@pytest.mark.baselines("torch-foreach", "sklearn", ...)`` adds other
    implementations to time beside torch's default ("torch"): variants of torch's own, or
    another library's."""
    if not {"device", "impl"} <= set(metafunc.fixturenames):
        return
    marker = metafunc.definition.get_closest_marker("devices")
    devices = marker.args if marker else ("cpu", "cuda")
    variants = metafunc.definition.get_closest_marker("baselines")
    params = []
    for device in devices:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        torch_impl, *fastml_impls = IMPLEMENTATIONS[device]
        impls = [torch_impl, *(variants.args if variants else ()), *fastml_impls]
        params += [pytest.param(device, impl, id=f"{device}-{impl}", marks=marks) for impl in impls]
    metafunc.parametrize("device,impl", params)


@pytest.fixture
def backend(request, device, impl, benchmark):
    """Skip what cannot be timed here; run the test inside ``fastml.use_backend(impl)``."""
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA GPU visible")
    if impl in FASTML_BACKENDS:
        marker = request.node.get_closest_marker("ops")
        ops = marker.args if marker else ()
        present, missing = _bench.fastml_backends(ops, device)
        if impl not in present:
            pytest.skip(f"fastml backend {impl} absent: {dict(missing).get(impl, 'not a ' + device + ' backend')}")
    benchmark.extra_info.update(backend=impl, device=device, torch=torch.__version__)
    with fastml.use_backend(impl) if impl in FASTML_BACKENDS else contextlib.nullcontext():
        yield impl


@pytest.fixture
def sync(device):
    """Drains the device's queue: called inside every timed GPU function."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@pytest.fixture
def regression_data(device):
    """make(n, d, o) → x (n, d), target (n, o) on ``device``, and the state_dict of an
    nn.Linear(d, o) that every implementation starts from."""
    def make(n, d, o, seed=0):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=gen).to(device)
        target = torch.randn(n, o, generator=gen).to(device)
        torch.manual_seed(seed)
        return x, target, torch.nn.Linear(d, o).state_dict()
    return make


@pytest.fixture
def course_data(device):
    """The course's experiment: features (1000, 2), labels (1000, 1) from w = [2, -3.4], b = 4.2."""
    return _bench.course_data(_bench.COURSE_EXPERIMENT["num_examples"], device)
