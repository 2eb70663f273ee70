"""Softmax regression, the MLP's head and a large-vocabulary head: linear + softmax cross-entropy,
forward + backward, torch beside every fastml backend, one group per size.

- torch: eager ``nn.Linear`` + ``nn.CrossEntropyLoss`` (the reference path of torch's
  ``linear_cross_entropy``: the N × C logits whole);
- torch-chunked: ``torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``,
  torch's own chunked path (torch >= 2.13, skipped before);
- fastml: ``fastml.functional.linear_cross_entropy`` (what ``fastml.nn.LinearCrossEntropyLoss``
  runs) on each backend.
Weight and bias (and, at the large size, the input) require grad; gradients are reset first, as
zero_grad does. ``cross_entropy`` groups time the loss alone on given logits (nn.CrossEntropyLoss
against fastml.nn.CrossEntropyLoss). Extra info on the CPU: the peak extra memory of one step,
measured in a child process (its resident set sampled every 0.2 ms during the step, above the
inputs'); on CUDA, torch.cuda.max_memory_allocated above the inputs.

    python -m pytest bench/bench_cross_entropy.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastml

pytestmark = [pytest.mark.ops("linear_cross_entropy", "cross_entropy"), pytest.mark.baselines("torch-chunked")]

# (N, D, C, input requires grad)
SOFTMAX_REGRESSION = (256, 784, 10, False)
MLP_HEAD = (256, 256, 10, True)
CPU_LARGE = (4096, 512, 8192, True)
CUDA_LARGE = (16384, 4096, 128256, True)
LOGITS = [(4096, 10), (4096, 8192)]


def _problem(n, d, c, needs_input_grad, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_(needs_input_grad)
    weight = (torch.randn(c, d, generator=gen) / d ** 0.5).to(device, dtype).requires_grad_()
    bias = torch.zeros(c).to(device, dtype).requires_grad_()
    target = torch.randint(0, c, (n,), generator=gen).to(device)
    return x, weight, bias, target


def _step(impl, x, weight, bias, target):
    """One forward + backward of the implementation ``impl`` (gradients reset first)."""
    params = (x, weight, bias)

    def reset():
        for p in params:
            p.grad = None

    if impl == "torch":
        def step():
            reset()
            F.cross_entropy(F.linear(x, weight, bias), target).backward()
    elif impl == "torch-chunked":
        options_class = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if options_class is None:
            pytest.skip(f"torch {torch.__version__} has no chunked linear_cross_entropy")
        options = options_class()

        def step():
            reset()
            F.linear_cross_entropy(x, weight, target, linear_bias=bias, options=options).backward()
    else:
        def step():
            reset()
            fastml.functional.linear_cross_entropy(x, weight, target, linear_bias=bias).backward()
    return step


def _linear_cross_entropy(benchmark, impl, device, n, d, c, needs_input_grad, sync, dtype=torch.float32,
                          rounds=None):
    benchmark.group = f"linear_cross_entropy fwd+bwd {device} N={n} D={d} C={c} {str(dtype)[6:]}"
    problem = _problem(n, d, c, needs_input_grad, device, dtype)
    step = _step(impl, *problem)

    def timed():
        step()
        sync()
    timed()
    if rounds:
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)
    else:
        benchmark(timed)
    benchmark.extra_info["GFLOP/s"] = round(6 * n * d * c / benchmark.stats.stats.median / 1e9, 2)
    benchmark.extra_info["NxC logits MB"] = round(n * c * problem[0].element_size() / 2**20, 1)
    if device == "cuda":
        del problem, step
        benchmark.extra_info["peak extra MB"] = _cuda_peak_extra_mb(impl, n, d, c, needs_input_grad, dtype)
    elif rounds:
        benchmark.extra_info["peak extra MB"] = _peak_extra_mb(impl, n, d, c, needs_input_grad)


_PEAK_SCRIPT = """
import contextlib, os, sys, threading, time, torch
sys.path.insert(0, sys.argv[1])
import bench_cross_entropy as bench, fastml
impl, n, d, c, needs_input_grad = sys.argv[2], *map(int, sys.argv[3:])
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
problem = bench._problem(n, d, c, bool(needs_input_grad), "cpu")
with fastml.use_backend(impl) if impl in ("cpp", "numba") else contextlib.nullcontext():
    small = bench._problem(8, d, min(c, 64), bool(needs_input_grad), "cpu")
    bench._step(impl, *small)()  # load, compile and allocate once outside the measurement
    step = bench._step(impl, *problem)
    if impl == "auto":
        step()  # the measured choice for this size, outside the measurement
    before, peak, done = resident(), [0], threading.Event()
    def sample():  # the resident set every 0.2 ms while the step runs
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.0002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
print((max(peak[0], resident()) - before) / 2**20)
"""


def _peak_extra_mb(impl, n, d, c, needs_input_grad) -> float:
    """Peak extra resident memory (MB) of one step, in a fresh process."""
    here = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, here, impl, str(n), str(d), str(c),
                           str(int(needs_input_grad))], capture_output=True, text=True, timeout=600)
    return round(float(done.stdout.strip().splitlines()[-1]), 1) if done.returncode == 0 else float("nan")


def _cuda_peak_extra_mb(impl, n, d, c, needs_input_grad, dtype) -> float:
    torch.cuda.empty_cache()
    problem = _problem(n, d, c, needs_input_grad, "cuda", dtype)
    step = _step(impl, *problem)
    step()
    for p in problem[:3]:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("n, d, c, needs_input_grad", [SOFTMAX_REGRESSION, MLP_HEAD],
                         ids=["softmax regression", "MLP head"])
def test_small_heads_cpu(benchmark, backend, device, n, d, c, needs_input_grad, sync):
    _linear_cross_entropy(benchmark, backend, device, n, d, c, needs_input_grad, sync)


@pytest.mark.devices("cpu")
def test_large_head_cpu(benchmark, backend, device, sync):
    _linear_cross_entropy(benchmark, backend, device, *CPU_LARGE, sync, rounds=3)


@pytest.mark.devices("cuda")
@pytest.mark.parametrize("n, d, c, needs_input_grad", [SOFTMAX_REGRESSION, CUDA_LARGE],
                         ids=["softmax regression", "large vocabulary"])
def test_heads_cuda(benchmark, backend, device, n, d, c, needs_input_grad, sync):
    large = c > 10
    _linear_cross_entropy(benchmark, backend, device, n, d, c, needs_input_grad, sync,
                          dtype=torch.bfloat16 if large else torch.float32, rounds=5 if large else None)


@pytest.mark.parametrize("m, c", LOGITS, ids=[f"{m}x{c}" for m, c in LOGITS])
def test_cross_entropy(benchmark, backend, device, m, c, sync):
    if backend == "torch-chunked":
        pytest.skip("no chunked path for the loss alone")
    benchmark.group = f"cross_entropy fwd+bwd {device} M={m} C={c}"
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(m, c, generator=gen).to(device).requires_grad_()
    target = torch.randint(0, c, (m,), generator=gen).to(device)
    loss_fn = torch.nn.CrossEntropyLoss() if backend == "torch" else fastml.nn.CrossEntropyLoss()

    def step():
        logits.grad = None
        loss_fn(logits, target).backward()
        sync()
    step()
    benchmark(step)
    benchmark.extra_info["GB/s"] = round(3 * m * c * 4 / benchmark.stats.stats.median / 1e9, 2)
