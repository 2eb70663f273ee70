"""Shared test machinery: the backend fixture, the per-dtype tolerance table, fresh random inputs.

Every op test runs once per backend. A backend that is absent here is a pytest.skip carrying the
reason fastml.info() gives, never a silent pass. On a machine without a GPU, Triton kernels run
on CPU tensors through the interpreter (TRITON_INTERPRET=1, set below before triton is imported).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The measured choice's decisions (fastml/_tune.py) go to a folder of this test run's own, so a
# run neither reads the decisions of earlier runs nor writes into the user's cache.
os.environ["FASTML_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastml-test-decisions-")
atexit.register(shutil.rmtree, os.environ["FASTML_CACHE_DIR"], ignore_errors=True)

import fastml  # noqa: E402  (after TRITON_INTERPRET is settled)
from fastml import _backend, _tune  # noqa: E402

# Tests check what the measured choice decides with (tests/test_tune.py, on a fake clock, reads
# these constants), never how fast a path is: one short timed round per candidate is enough here,
# and keeps the thousands of shape classes the suite meets from costing minutes of timing.
SHIPPED_TIMING = (_tune.ROUNDS, _tune.SAMPLE_SECONDS)  # test_tune.py checks the rule with these
_tune.ROUNDS, _tune.SAMPLE_SECONDS = 1, 2e-4

# Class counts around one vector of classes (16 float32 or 8 float64 with AVX-512, 8 or 4 with
# AVX2): rows of at most one vector go four at a time through the C++ kernels' rows
# (csrc/cross_entropy_rows.h's cross_entropy_short_rows), longer ones one at a time.
GROUPED_CLASSES = [1, 3, 4, 8, 10, 16, 17]

# (rtol, atol) for comparing a backend's result in `dtype` with the float64 reference.
# float32 sums over many terms drift by ~sqrt(n)·eps; half types keep ~3 significant digits.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

# (rtol, atol) for parameters and optimizer state after 20 steps of a fastml optimizer against
# torch.optim's in the same dtype. A step is a handful of elementwise operations, no sums: a
# kernel that fuses a * b + c where torch rounds twice (or the reverse) drifts by a few units in
# the last place per step. Half types: torch rounds every intermediate to the half type, the
# Triton kernels only the results.
STEP_TOLERANCES = {
    torch.float64: (1e-13, 1e-13),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def pairwise_cover(grid: list[tuple]) -> list[int]:
    """Indices of a subset of ``grid`` (rows of parameter values, one column per parameter) in
    which every value of every column, and every pair of values of two columns that occurs in
    some row, occurs in a chosen row: greedy, each next row the one covering the most pairs not
    yet covered (the first among equals), so the subset is the same in every run."""
    def pairs(row):
        singles = {()} | {(i, value) for i, value in enumerate(row)}  # (): a grid of one row is kept
        return singles | {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(row), 2)}
    wanted = [pairs(row) for row in grid]
    uncovered = set().union(*wanted) if wanted else set()
    chosen = []
    while uncovered:
        best = max(range(len(grid)), key=lambda k: (len(wanted[k] & uncovered), -k))
        chosen.append(best)
        uncovered -= wanted[best]
    return sorted(chosen)


def _grid_columns(params: dict) -> dict:
    """A test's parameters but the backend, as {column: repr of value}: a dict of options (the
    optimizers' grids) gives one column per option, as each option is a branch of the kernel."""
    columns = {}
    for name, value in params.items():
        if name == "backend":
            continue
        if isinstance(value, dict):
            columns.update({f"{name}.{key}": repr(option) for key, option in value.items()})
        else:
            columns[name] = repr(value)
    return columns


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """The Triton interpreter runs a kernel a thousand times slower than the GPU it is written
    for, and it made most of the default run (about 420 of 700 s). Its kernels branch on the
    options a test's grid spans, not on the combination of all of them, so by default each test
    runs on the interpreter only a pairwise cover of its grid (every value of each parameter and
    every pair of two parameters' values, see pairwise_cover); the rest are marked slow and run
    with ``-m slow``. A test marked ``interpreter_slow`` (its point is another backend's
    path, its Triton cases a repeat of others') runs on the interpreter only with ``-m slow``;
    one marked ``interpreter_long(*ids)`` has the cases of those ids (the backend's left out), or
    all cases without ids, that the cover keeps marked long instead: CI runs them after the
    default run.
    On a GPU every case runs."""
    if torch.cuda.is_available():
        return
    grids = defaultdict(list)
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "triton":
            grids[item.nodeid.split("[", 1)[0]].append(item)
    for group in grids.values():
        if group[0].get_closest_marker("interpreter_slow") is not None:
            for item in group:
                item.add_marker(pytest.mark.slow)
            continue
        long_marker = group[0].get_closest_marker("interpreter_long")
        columns = [_grid_columns(item.callspec.params) for item in group]
        names = sorted(set().union(*columns))
        rows = [tuple(row.get(name) for name in names) for row in columns]
        kept = set(pairwise_cover(rows))
        for index, item in enumerate(group):
            if index not in kept:
                item.add_marker(pytest.mark.slow)
            elif long_marker is not None and (not long_marker.args
                                              or item.callspec.id.split("-", 1)[-1] in long_marker.args):
                item.add_marker(pytest.mark.long)  # (a case outside the cover stays slow, not long)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: torch.device

    @property
    def interpreted(self) -> bool:
        """Triton through the interpreter: correct but slow, so tests keep sizes small."""
        return self.name == "triton" and self.device.type == "cpu"

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes this backend's kernels cover (others take the reference path)."""
        if self.name == "triton":
            return (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        return (torch.float32, torch.float64)

    def use(self):
        return fastml.use_backend(self.name)


def _test_backends() -> list[str]:
    """The backends the ``backend`` fixture runs each test on: all of them, or those FASTML_TEST_BACKENDS
    names (comma-separated; tests/test_cache_sizes.py runs the cpp ones on other caches)."""
    named = [name.strip() for name in os.environ.get("FASTML_TEST_BACKENDS", "").split(",") if name.strip()]
    unknown = [name for name in named if name not in _backend.BACKENDS]
    if unknown:
        raise pytest.UsageError(f"FASTML_TEST_BACKENDS names {unknown}; the backends are {list(_backend.BACKENDS)}")
    return named or list(_backend.BACKENDS)


def _backend_in_use(name: str):
    """Backend ``name`` in use (fastml.use_backend) while the test runs; the test skipped where
    the backend is absent."""
    status = _backend.status(name)
    if not status.present:
        pytest.skip(f"backend {name} absent: {status.reason}")
    device = torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")
    with fastml.use_backend(name):
        yield Backend(name, device)


@pytest.fixture(params=_test_backends())
def backend(request) -> Backend:
    yield from _backend_in_use(request.param)


@pytest.fixture
def cpp_backend() -> Backend:
    """The cpp backend alone, in use: for tests of its own blocking, at shapes too large for the
    other backends (the Triton interpreter, numba's loops) in the default run."""
    yield from _backend_in_use("cpp")


def assert_device_side_assert(code: str, *args: str) -> None:
    """Runs ``code`` (a Python script; argv[1:] = args) in a child process and checks that it
    failed a CUDA device-side assertion, as torch's own CUDA kernels do on a bad class index:
    a child, since the failed assertion poisons its process's CUDA context for every later test."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "device-side assert" in done.stderr, done.stderr[-2000:]


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh seed per test run; pytest shows it with a failing test's captured output."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=torch.float32, device="cpu", generator=None, requires_grad=False, scale=1.0):
    """Standard-normal values (never zeros), made on the CPU then moved, so seeds reproduce."""
    t = torch.randn(tuple(shape), dtype=torch.float64, generator=generator) * scale
    t = t.to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def upcast(*tensors):
    """Detached float64 CPU copies that require grad where the originals do."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().to(device="cpu", dtype=torch.float64)
        out.append(c.requires_grad_(t.requires_grad))
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale=None):
    """actual (any dtype / device) against a float64 reference with the dtype's tolerance.

    ``scale``: the magnitude the absolute tolerance is relative to (for sums of many terms whose
    result can be small by cancellation), default 1.
    """
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    if scale is not None:
        atol = atol * float(scale)
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64),
                               rtol=rtol, atol=atol, equal_nan=True)


def assert_steps_close(actual: torch.Tensor, expected: torch.Tensor):
    """A tensor after optimizer steps against torch.optim's, both in actual's dtype."""
    rtol, atol = STEP_TOLERANCES[actual.dtype.to_real()]
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), rtol=rtol, atol=atol, equal_nan=True)


def raised(call) -> Exception | None:
    """The exception ``call()`` raises, or None: a drop-in must raise what its twin raises (the
    same type and message), whatever that is, so the twin's is taken as the expectation."""
    try:
        call()
    except Exception as error:  # noqa: BLE001  (any error: the twin's is the expectation)
        return error
    return None


def grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


def magnitude(t: torch.Tensor) -> float:
    """max(1, max |t|): the scale for absolute tolerances on sums that may cancel (1 if empty)."""
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0


def loss_options(opts, classes, dtype, device, generator):
    """Keyword arguments for a cross-entropy call from a table entry: its options, with
    ``weight=True`` replaced by fresh positive class weights (classes,)."""
    kwargs = {k: v for k, v in opts.items() if k != "weight"}
    if opts.get("weight"):
        kwargs["weight"] = (torch.rand(classes, generator=generator, dtype=torch.float64) + 0.1).to(device, dtype)
    return kwargs


def backward_and_compare(out, ref, pairs, generator):
    """Backpropagates the same random upstream gradient through ``out`` and its float64 oracle
    ``ref``, then compares the gradient of every (name, tensor, oracle copy) in ``pairs`` whose
    tensor requires one."""
    upstream = rand(*out.shape, dtype=out.dtype, device=out.device, generator=generator)
    out.backward(upstream)
    ref.backward(upstream.detach().cpu().double())
    for name, t, r in pairs:
        if t is not None and t.requires_grad:
            assert t.grad is not None, f"no gradient for {name}"
            assert t.grad.shape == t.shape and t.grad.dtype == out.dtype, name
            assert_close(t.grad, r.grad, out.dtype, scale=magnitude(r.grad))


def sgd_loss_curve(parameters, loss_at, steps, lr=0.1):
    """The losses of ``steps`` steps of torch.optim.SGD on ``parameters``, loss_at(step) giving
    each step's loss: the curve a training test compares between fastml's layers and torch's."""
    opt = torch.optim.SGD(parameters, lr=lr)
    curve = []
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve)


def refreshes_where_no_version_tells(conv: torch.nn.Conv2d, x: torch.Tensor, convolve) -> None:
    """A variant that derives a weight once per weight version (``convolve(layer, input,
    weight)``, no gradient) against torch's convolution, where no version counter tells of a
    change: a write through ``.data``, taken up when the layer switches mode (``eval()``), and
    inference tensors (no version counter at all), derived anew at every call, so that a write in
    inference mode is seen too."""
    layer = copy.deepcopy(conv)
    layer.__class__ = fastml.nn.Conv2d  # as fastml.patch makes it

    def check(weight, bias):
        out = convolve(layer, x, weight)
        expected = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), layer.stride,
                            layer.padding, layer.dilation, layer.groups)
        assert_close(out, expected, scale=magnitude(expected))

    with torch.no_grad():
        check(layer.weight, layer.bias)
        layer.weight.data.mul_(-3)  # no version moves
        layer.eval()
        check(layer.weight, layer.bias)
    with torch.inference_mode():
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())  # an inference tensor
        check(layer.weight, layer.bias)
        layer.weight.mul_(0.5)  # in place, in inference mode: no version to move
        check(layer.weight, layer.bias)


def prefer(monkeypatch, name):
    """A measured choice whose clock says candidate ``name`` is fastest where it is a candidate,
    fastml's side ("fastml": a layer's or the model's routes, the patched model) where it is
    not, and torch's everywhere if ``name`` is "reference" (each candidate still runs once)."""
    def measure(names, run, device, rounds=None):
        for candidate in names:
            run(candidate)
        fastest = name if name in names else "fastml" if "fastml" in names and name != "reference" else "reference"
        return {candidate: (1.0 if candidate == fastest else 2.0) for candidate in names}

    _tune.clear_tuning(persisted=True)
    monkeypatch.setattr(_tune, "measure", measure)


def patched_pair(model: torch.nn.Module, train: bool, batch_norm: torch.nn.BatchNorm2d):
    """(``model``, a patched deep copy), both in mode ``train``, after ``batch_norm`` (one of the
    model's) got running statistics away from their defaults, so that a fold's arithmetic shows."""
    with torch.no_grad():
        batch_norm.running_mean.uniform_(-1, 1)
        batch_norm.running_var.uniform_(0.5, 2)
    patched = copy.deepcopy(model)
    fastml.patch(patched)
    return model.train(train), patched.train(train)


def patched_eval_run(unpatched: torch.nn.Module, x: torch.Tensor):
    """(a patched copy of ``unpatched``, its output for ``x`` on its second call, the unpatched
    model's in float64), without gradients: the first call makes the measured choice."""
    model = copy.deepcopy(unpatched)
    fastml.patch(model)
    with torch.no_grad():
        model(x)
        out = model(x)
        expected = unpatched.double()(x.double())
    return model, out, expected


def eval_conv_bn_relu(generator: torch.Generator, channels: tuple[int, int] = (4, 6),
                      groups: int = 1) -> torch.nn.Sequential:
    """Conv2d(*channels, 3, padding=1, groups=groups) → BatchNorm2d → ReLU in eval mode, with
    random running statistics (so the fold changes the weight): the run fastml.patch folds into
    one convolution."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    run = torch.nn.Sequential(torch.nn.Conv2d(*channels, 3, padding=1, groups=groups),
                              torch.nn.BatchNorm2d(channels[1]), torch.nn.ReLU()).eval()
    with torch.no_grad():
        run[1].running_mean.uniform_(-1, 1)
        run[1].running_var.uniform_(0.5, 1.5)
    return run


class FunctionRecorder(torch.overrides.TorchFunctionMode):
    """A torch-function mode that records every function called under it (``seen``): what a
    tensor subclass or a tracer would be shown."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))
