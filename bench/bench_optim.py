"""Optimizer steps: torch.optim (its default, foreach and fused implementations) beside every
fastml backend, one group per optimizer and size.

- SGD with momentum 0.9 and weight decay 1e-4, and Adam (lr 1e-3), one ``step()`` with the
  gradients already in place (as after backward); the steps keep updating the same parameters.
- CPU: 10M parameters in 20 tensors, and the course's LeNet (61,706 parameters in 10 tensors).
- CUDA: 100M parameters in 100 tensors, and 1,000 tensors of 1,024 elements (launch-bound).

Extra info gives GB/s under the byte model "every array an optimizer step must move, once":
SGD 5 arrays (read param, grad, momentum buffer; write param, buffer), Adam 7 (read param,
grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq). GPU steps synchronise inside
the timed function. Each step is called before timing (numba's JIT compile stays out).

    python -m pytest bench/bench_optim.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest

from fastml import _bench

CPU_SIZES = {"10M params in 20 tensors": [500_000] * 20, "LeNet": list(_bench.LENET_PARAMETER_SIZES)}
CUDA_SIZES = {"100M params in 100 tensors": [1_000_000] * 100, "1000 tensors of 1024": [1024] * 1000}

pytestmark = pytest.mark.baselines("torch-foreach", "torch-fused")


def _step(benchmark, backend, device, kind, label, sizes, sync):
    benchmark.group = f"{kind} step {device} {label}"
    step = _bench.optimizer_step_factory(kind, sizes, device)(backend)

    def timed():
        step()
        sync()

    timed()
    timed()
    benchmark(timed)
    moved = _bench.FLOAT_BYTES * _bench.OPTIMIZER_ARRAY_PASSES[kind] * sum(sizes)
    benchmark.extra_info["GB/s"] = round(moved / benchmark.stats.stats.median / 1e9, 3)


@pytest.mark.ops("sgd", "adam")
@pytest.mark.devices("cpu")
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("label", list(CPU_SIZES))
def test_step_cpu(benchmark, backend, device, kind, label, sync):
    _step(benchmark, backend, device, kind, label, CPU_SIZES[label], sync)


@pytest.mark.ops("sgd", "adam")
@pytest.mark.devices("cuda")
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("label", list(CUDA_SIZES))
def test_step_cuda(benchmark, backend, device, kind, label, sync):
    _step(benchmark, backend, device, kind, label, CUDA_SIZES[label], sync)
