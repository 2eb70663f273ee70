"""Linear regression's hot paths: torch beside every fastml backend, one group per op and size.

- fused forward + backward at (N, D, O): torch eager (nn.Linear + nn.MSELoss + backward) vs
  fastml.functional.linear_mse + backward; weight and bias require grad, x does not. Extra info
  gives GB/s under the byte model "one read of x, target, weight, bias; one write of loss,
  grad_weight, grad_bias".
- the course's training step (batch 10, 2 features): nn.Linear + nn.MSELoss + torch.optim.SGD vs
  fastml.nn.LinearMSELoss + the same optimizer; microseconds per step.
- the course's experiment (1000 examples, batch 10, lr 0.03, 3 epochs): its Python loop
  (data_iter, linreg, squared_loss, sgd) vs fastml.linear_model.LinearRegression(solver="sgd").fit.

GPU functions synchronise inside the timed function. Every function is called before timing
(numba's JIT compile and Triton's autotuning stay out of the numbers).

    python -m pytest bench/bench_linear_mse.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

import fastml
from fastml import _bench

pytestmark = pytest.mark.ops("linear_mse")

SHAPES = [(65536, 256, 1), (65536, 256, 8)]
LARGE = (1_048_576, 256, 1)


def _fused_step(impl, x, target, state, sync):
    """One forward + backward of linear + squared loss, gradients reset first (as zero_grad does)."""
    d, o = x.shape[1], target.shape[1]
    if impl == "torch":
        lin = torch.nn.Linear(d, o).to(x.device)
        lin.load_state_dict(state)
        loss_fn = torch.nn.MSELoss()

        def step():
            lin.weight.grad = lin.bias.grad = None
            loss_fn(lin(x), target).backward()
            sync()
        return step
    w = state["weight"].clone().to(x.device).requires_grad_()
    b = state["bias"].clone().to(x.device).requires_grad_()

    def step():
        w.grad = b.grad = None
        fastml.functional.linear_mse(x, w, b, target).backward()
        sync()
    return step


def _record(benchmark, nbytes=None, flops=None, steps=None):
    """Throughput from the median into the JSON's extra_info (--benchmark-json)."""
    median = benchmark.stats.stats.median
    if nbytes:
        benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 3)
    if flops:
        benchmark.extra_info["GFLOP/s"] = round(flops / median / 1e9, 3)
    if steps:
        benchmark.extra_info["us/step"] = round(median / steps * 1e6, 3)


def _fused(benchmark, backend, device, n, d, o, regression_data, sync):
    benchmark.group = f"linear_mse fwd+bwd {device} N={n} D={d} O={o}"
    x, target, state = regression_data(n, d, o)
    step = _fused_step(backend, x, target, state, sync)
    step()
    step()
    benchmark(step)
    nbytes = 4 * (n * d + n * o + o * d + o + 1 + o * d + o)
    _record(benchmark, nbytes=nbytes, flops=4 * n * d * o)


@pytest.mark.parametrize("n,d,o", SHAPES, ids=[f"{n}x{d}x{o}" for n, d, o in SHAPES])
def test_linear_mse(benchmark, backend, device, n, d, o, regression_data, sync):
    _fused(benchmark, backend, device, n, d, o, regression_data, sync)


@pytest.mark.devices("cuda")
def test_linear_mse_large(benchmark, backend, device, regression_data, sync):
    _fused(benchmark, backend, device, *LARGE, regression_data, sync)


def test_toy_step(benchmark, backend, device, sync):
    """The course's step at batch 10, 2 features: zero_grad, loss, backward, SGD step."""
    benchmark.group = f"toy_step {device} batch=10 features=2 (per step)"
    features, labels = _bench.course_data(10, device)
    torch.manual_seed(0)
    if backend == "torch":
        model, loss_fn = torch.nn.Linear(2, 1).to(device), torch.nn.MSELoss()
        forward = lambda: loss_fn(model(features), labels)  # noqa: E731
    else:
        model = fastml.nn.LinearMSELoss(2, 1).to(device)
        forward = lambda: model(features, labels)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.03)

    def step():
        opt.zero_grad()
        forward().backward()
        opt.step()
        sync()
    step()
    step()
    benchmark(step)
    _record(benchmark, steps=1)


def test_linear_regression_fit(benchmark, backend, device, course_data, sync):
    """The course's whole experiment: 3 epochs of minibatch SGD over 1000 examples."""
    exp = _bench.COURSE_EXPERIMENT
    benchmark.group = (f"linear_regression_fit {device} N={exp['num_examples']} batch={exp['batch_size']} "
                       f"epochs={exp['num_epochs']} (per fit)")
    features, labels = course_data
    batch, lr, epochs = exp["batch_size"], exp["lr"], exp["num_epochs"]
    if backend == "torch":
        fit = lambda: _bench.course_linear_regression(features, labels, batch, lr, epochs)  # noqa: E731
    else:
        LinearRegression = getattr(fastml.linear_model, "LinearRegression", None)
        if LinearRegression is None:
            pytest.skip("fastml.linear_model.LinearRegression is not present in this installation")
        fit = lambda: LinearRegression(solver="sgd", lr=lr, batch_size=batch, epochs=epochs).fit(  # noqa: E731
            features, labels)

    def run():
        fit()
        sync()
    run()
    benchmark(run)
    steps = epochs * -(-exp["num_examples"] // batch)
    _record(benchmark, steps=steps)
